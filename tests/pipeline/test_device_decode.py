"""`--decode device` on the CPU: torchvision's decode + tensor preprocessing against Pillow's.

The same code runs on CUDA with nvJPEG; here device "cpu" makes CI exercise every branch:
the batched call, each per-image fallback, EXIF orientation, the limits checked from the
header, exactly-once with the broken-file zoo, and agreement with the Pillow path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import Preprocessing
from pipeline.device_decode import DeviceBatcher, batchable, prepare, resolve_decode
from pipeline.preprocess import ImageLimits, load_image, open_image
from pipeline.shards import Record
from tests.pipeline import imagegen

pytest.importorskip("torchvision", reason="the dev extra installs torchvision")

PP = Preprocessing(input_size=32, crop_fraction=0.875)
LIMITS = ImageLimits()
# Pixels: a device-path image differs from Pillow's by decoder and resampler rounding. Resizing
# in uint8 (the CPU default) torch uses Pillow's fixed-point kernels; in float32 (CUDA) it does
# not round and clip to 8 bits between the horizontal and vertical passes as Pillow does, which
# shows at sharp edges when bicubic's overshooting kernel upscales. Measured on the photos
# below, in 8-bit levels (1/127.5 at mean = std = 0.5): bilinear max 1 (uint8 and float32),
# bicubic max 2 (uint8) and 10 (float32); mean at most 0.22 in every case.
MAX_ABS = {
    ("bilinear", "uint8"): 1.5 / 127.5,
    ("bilinear", "float32"): 1.5 / 127.5,
    ("bicubic", "uint8"): 2.5 / 127.5,
    ("bicubic", "float32"): 12 / 127.5,
}
MEAN_ABS = 0.4 / 127.5


def _build(records, pp=PP, limits=LIMITS):
    prepared = [prepare(r, pp, limits) for r in records]
    return prepared, DeviceBatcher(pp, "cpu", limits).build(prepared)


def _photos() -> list[tuple[str, bytes]]:
    """Real-size JPEG photos cut from scikit-learn's two sample photos (427x640 each)."""
    sklearn = pytest.importorskip("sklearn.datasets", reason="the demo extra has scikit-learn")
    photos = [Image.fromarray(a) for a in sklearn.load_sample_images().images]
    out = []
    for p, photo in enumerate(photos):
        variants = {
            "full": photo,
            "500x375": photo.resize((500, 375)),
            "375x500": photo.crop((100, 0, 420, 427)).resize((375, 500)),
            "crop-213x160": photo.crop((300, 200, 513, 360)),
            "up-1024x683": photo.resize((1024, 683)),
            "strip-600x90": photo.crop((0, 150, 600, 240)),
            "small-90x70": photo.resize((90, 70)),
            "gray": photo.convert("L"),
        }
        for name, image in variants.items():
            for quality, subsampling, progressive in (
                (90, 2, False),
                (60, 1, True),
                (95, 0, False),
            ):
                data = imagegen.encode(
                    image, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive
                )
                out.append((f"photo{p}-{name}-q{quality}-s{subsampling}", data))
    return out


@pytest.mark.parametrize("dtype", ["uint8", "float32"])  # float32: CUDA's resize
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_batch_is_the_pillow_batch_up_to_rounding(interpolation, dtype) -> None:
    import torch

    pp = Preprocessing(input_size=224, crop_fraction=0.875, interpolation=interpolation)
    photos = _photos()
    records = [Record(key, data) for key, data in photos]
    prepared = [prepare(r, pp, LIMITS) for r in records]
    batcher = DeviceBatcher(pp, "cpu", LIMITS, resize_dtype=getattr(torch, dtype))
    built = batcher.build(prepared)
    assert all(p.jpeg is not None for p in prepared)  # all went through the batched call
    for row, record in enumerate(records):
        diff = np.abs(built.batch[row].numpy() - load_image(record.data, pp))
        assert diff.max() <= MAX_ABS[interpolation, dtype], (record.key, float(diff.max()))
        assert diff.mean() <= MEAN_ABS, (record.key, float(diff.mean()))


def test_png_cmyk_and_webp_fall_back_to_pillow_and_give_its_exact_pixels() -> None:
    zoo = imagegen.broken_zoo()
    names = ["cmyk", "palette_transparent", "rgba", "gray16", "webp"]
    records = [Record(name, zoo[name].data) for name in names]
    prepared, built = _build(records)
    assert all(p.jpeg is None and p.array is not None for p in prepared)
    for row, record in enumerate(records):
        np.testing.assert_array_equal(built.batch[row].numpy(), load_image(record.data, PP))


def _scan_start(data: bytes) -> int:
    return data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2 :][:2])


def test_a_jpeg_the_batched_call_raises_on_is_decoded_alone_then_by_pillow() -> None:
    good = imagegen.jpeg_bytes(128, 96)
    start = _scan_start(good)
    # A frame marker inside the scan data: the header is fine (baseline, 4:2:0, ends in EOI),
    # libjpeg-turbo in torchvision refuses the stream ("Unsupported JPEG process").
    bad = good[: start + 60] + b"\xff\xc7" + good[start + 62 :]
    records = [
        Record("before", imagegen.jpeg_bytes(64, 48, seed=1)),
        Record("bad", bad),
        Record("after", imagegen.jpeg_bytes(48, 64, seed=2)),
    ]
    prepared, built = _build(records)
    assert all(p.jpeg is not None for p in prepared[::2]) and batchable(open_image(bad), bad)
    assert built.fallbacks == {"pillow_after_device_error": 1}
    # The bad one gets exactly what the Pillow path gives today: its pixels or its error row.
    from pipeline.preprocess import decode_record

    _, array, error = decode_record(records[1], PP, LIMITS)
    assert built.errors[1] == error and built.errors[0] is None and built.errors[2] is None
    rows = [i for i, e in enumerate(built.errors) if e is None]
    for row, i in enumerate(rows):
        expect = array if i == 1 else load_image(records[i].data, PP)
        assert np.abs(built.batch[row].numpy() - expect).max() <= MAX_ABS["bilinear", "uint8"], i


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured(orientation) -> None:
    data = imagegen.jpeg_bytes(64, 32, exif_orientation=orientation)
    (prepared,), built = _build([Record("r", data)])
    assert prepared.jpeg is not None and prepared.orientation == orientation
    expect = load_image(data, PP)
    assert np.abs(built.batch[0].numpy() - expect).max() <= MAX_ABS["bilinear", "uint8"]
    if orientation != 1:  # the pattern's quadrants show a missed rotation or flip
        upright = load_image(imagegen.jpeg_bytes(64, 32), PP)
        assert np.abs(built.batch[0].numpy() - upright).max() > 0.5


def test_limits_are_checked_from_the_header_before_any_decode() -> None:
    jpeg = imagegen.jpeg_bytes(64, 48)
    (small,), built = _build([Record("r", jpeg)], limits=ImageLimits(max_pixels=1000))
    assert small.jpeg is None and small.array is None
    assert small.error == "too large: 64x48 pixels exceeds limit 1000"
    assert built.errors == [small.error] and len(built.batch) == 0
    (over,), _ = _build([Record("r", jpeg)], limits=ImageLimits(max_bytes=100))
    assert over.error == f"file too large: {len(jpeg)} bytes exceeds limit 100"
    (bomb,), _ = _build([Record("r", imagegen.bomb_png())])
    assert bomb.error.startswith("too large: 100000x100000 pixels")


def test_jpeg_kinds_the_batched_call_cannot_take_are_routed_to_pillow() -> None:
    base = imagegen.jpeg_bytes(64, 48)
    assert batchable(open_image(base), base)
    arithmetic = base.replace(b"\xff\xc0", b"\xff\xc9", 1)  # SOF9: arithmetic coding
    assert not batchable(open_image(arithmetic), arithmetic)
    sof = base.index(b"\xff\xc0")
    odd = bytearray(base)
    odd[sof + 11] = 0x31  # luma sampled 3x1: no standard chroma subsampling
    assert not batchable(open_image(bytes(odd)), bytes(odd))
    cut = imagegen.truncate(base, 0.6)  # no EOI: Pillow says "truncated", as today
    assert not batchable(open_image(cut), cut)
    (prepared,), built = _build([Record("cut", cut)])
    assert prepared.jpeg is None and "truncated" in built.errors[0]
    cmyk = imagegen.jpeg_bytes(64, 48, mode="CMYK")
    assert not batchable(open_image(cmyk), cmyk)


def test_auto_is_device_only_on_cuda_and_lanczos_is_refused(monkeypatch) -> None:
    import torch

    from pipeline import device_decode

    if not torch.cuda.is_available():  # the probe decodes one JPEG there, and says why not
        problem = device_decode.cuda_decode_problem("cuda:0")
        assert problem.startswith("decode=device: torchvision cannot decode JPEGs on cuda:0")
        assert resolve_decode("auto", "cuda:0", PP) == "cpu"
        with pytest.raises(ValueError, match="cannot decode JPEGs on cuda:0"):
            resolve_decode("device", "cuda:0", PP)
    monkeypatch.setattr(device_decode, "cuda_decode_problem", lambda device: None)
    assert resolve_decode("auto", "cpu", PP) == "cpu"
    assert resolve_decode("auto", "cuda:0", PP) == "device"
    assert resolve_decode("device", "cpu", PP) == "device"
    assert resolve_decode("cpu", "cuda:0", PP) == "cpu"
    lanczos = Preprocessing(input_size=32, interpolation="lanczos")
    assert resolve_decode("auto", "cuda:0", lanczos) == "cpu"
    with pytest.raises(ValueError, match="lanczos"):
        resolve_decode("device", "cpu", lanczos)
    with pytest.raises(ValueError, match="decode must be one of"):
        resolve_decode("gpu", "cpu", PP)


# --------------------------------------------------------------------------- with the model


def _label(tmp_path, model_path, decode: str, shards, batch_size=8, embeddings=True):
    import pyarrow.parquet as pq

    from pipeline.workers import ShardLabeler, WorkerSpec

    spec = WorkerSpec(
        str(model_path), device="cpu", decode=decode, batch_size=batch_size, embeddings=embeddings
    )
    labeler = ShardLabeler(spec)
    assert labeler.decode == decode
    rows = []
    for shard in shards:
        out = tmp_path / decode / f"{shard.name}.parquet"
        labeler.label_shard(shard, str(out))
        rows += pq.read_table(out).to_pylist()
    return rows


def _tar_shards(tmp_path, samples_per_shard):
    from pipeline.shards import list_shards
    from pipeline.storage import open_storage

    root = str(tmp_path / "in")
    storage = open_storage(root)
    for i, samples in enumerate(samples_per_shard):
        storage.put_atomic(storage.join(root, f"s{i}.tar"), imagegen.tar_bytes(samples))
    return list(list_shards(storage, root))


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# Pre-head embeddings (fp16 in the Parquet) of a random-weight 224 px Mixer, device decode vs
# Pillow, on the 48 photo variants: measured min 0.99989, median 0.99996 (one 8-bit level added
# to every pixel gives a median 0.9999). The test takes the minimum over all images, so a wrong
# transform fails it by far: mirrored, shifted 8 px or BGR inputs give median cosines of 0.948,
# 0.969 and 0.887 on the same photos. 0.999 leaves room for other CPUs' libjpeg-turbo SIMD paths.
MIN_COSINE = 0.999


def test_zoo_exactly_once_and_photo_embeddings_agree_under_both_decodes(tmp_path) -> None:
    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset

    model_path = tmp_path / "m224.safetensors"
    save_checkpoint(build_preset("tiny", image_size=224, patch_size=32), model_path)
    photos = [(key, {"jpg": data}) for key, data in _photos()]
    zoo = imagegen.zoo_samples()
    shards = _tar_shards(tmp_path, [photos[:20] + zoo, photos[20:]])
    rows = {d: _label(tmp_path, model_path, d, shards) for d in ("cpu", "device")}
    expected = [key for key, _ in photos[:20] + zoo + photos[20:]]
    for decode in rows:  # every input exactly once, in input order
        assert [r["key"] for r in rows[decode]] == expected
        assert Counter(r["key"] for r in rows[decode]) == Counter(expected)
    by_zoo = imagegen.broken_zoo()
    cosines = []
    for cpu, device in zip(rows["cpu"], rows["device"], strict=True):
        assert cpu["error"] == device["error"], cpu["key"]  # the same error rows as today
        name = cpu["key"].removeprefix("zoo-")
        if name in by_zoo and by_zoo[name].expect == "error":
            assert by_zoo[name].error_contains in device["error"].lower()
        if cpu["error"] is None:
            cosines.append((_cosine(cpu["embedding"], device["embedding"]), cpu["key"]))
    worst = min(cosines)
    assert worst[0] >= MIN_COSINE, worst
    assert len(cosines) == len(photos) + sum(z.expect == "ok" for z in by_zoo.values())


def test_demo_model_top1_is_the_same_image_by_image_under_both_decodes(tmp_path) -> None:
    from pipeline.demo_data import DigitsSpec, write_demo_data
    from pipeline.shards import list_shards
    from pipeline.storage import open_storage
    from pipeline.train import TrainConfig, train

    data = str(tmp_path / "digits")
    write_demo_data(data, DigitsSpec(limit=200, images_per_shard=32))
    model_dir = tmp_path / "model"
    train(data, model_dir, TrainConfig(epochs=2, name="mixer-demo-test"), log=lambda line: None)
    model_path = next(p for p in model_dir.iterdir() if p.suffix == ".safetensors")
    storage = open_storage(data)
    shards = list(list_shards(storage, storage.join(data, "test")))
    rows = {d: _label(tmp_path, model_path, d, shards, 16, False) for d in ("cpu", "device")}
    assert [r["key"] for r in rows["cpu"]] == [r["key"] for r in rows["device"]]
    labelled = [(c, d) for c, d in zip(rows["cpu"], rows["device"], strict=True) if c["label"]]
    assert len(labelled) >= 30
    assert [c["label"] for c, _ in labelled] == [d["label"] for _, d in labelled]
    assert [c["error"] for c in rows["cpu"]] == [d["error"] for d in rows["device"]]


# --------------------------------------------------------------------------- without torchvision

_HIDE_TORCHVISION = """
import sys
sys.modules["torchvision"] = None  # as if the gpu extra were not installed
from console.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_decode_device_without_torchvision_fails_before_any_work_naming_the_gpu_extra(
    tmp_path,
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["run", str(tmp_path), str(out), "--model", "tiny", "--decode", "device"]
    done = subprocess.run(
        [sys.executable, "-c", _HIDE_TORCHVISION, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "torchvision" in lines[0] and "mixer-label[gpu]" in lines[0]
    assert not out.exists()  # nothing was written, no Ray started


def test_the_gpu_extra_pins_a_torchvision_built_for_its_torch() -> None:
    """torchvision 0.N is built against torch 2.(N - 15); a mismatched pair does not import."""
    import re
    from pathlib import Path

    import tomllib
    import torch
    import torchvision

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    gpu = pyproject["project"]["optional-dependencies"]["gpu"]
    spec = {re.split(r"[<>=!~ ]", req, maxsplit=1)[0]: req for req in gpu}
    torch_minor = re.fullmatch(r"torch>=2\.(\d+),<2\.(\d+)", spec["torch"]).groups()
    vision_minor = re.fullmatch(r"torchvision>=0\.(\d+),<0\.(\d+)", spec["torchvision"]).groups()
    assert [int(v) - 15 for v in vision_minor] == [int(t) for t in torch_minor]
    # The pair installed here (requirements/dev.txt) follows the same rule and imports.
    installed = int(torchvision.__version__.split(".")[1]) - 15
    assert installed == int(torch.__version__.split(".")[1])
