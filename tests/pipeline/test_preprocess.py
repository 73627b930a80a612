"""pipeline.preprocess on real image bytes: the broken-file zoo, modes, orientation, parity."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import Preprocessing
from pipeline.preprocess import (
    ImageError,
    ImageLimits,
    decode_in_threads,
    decode_rgb,
    load_image,
    to_rgb,
)
from pipeline.shards import Record
from tests.pipeline import imagegen

PP = Preprocessing()  # 224 crop of a 256 short side, mean = std = 0.5
SMALL = Preprocessing(input_size=32, crop_fraction=0.8)  # 40 short side, 32 crop: fast


def pixels(array: np.ndarray, pre: Preprocessing = PP) -> np.ndarray:
    """Undo the normalization: (3, H, W) -> (H, W, 3) in 0..255."""
    mean = np.asarray(pre.mean)[:, None, None]
    std = np.asarray(pre.std)[:, None, None]
    return ((array * std + mean) * 255).transpose(1, 2, 0)


def quadrant_colors(array: np.ndarray) -> list[int]:
    """Index into imagegen.QUADRANTS of the color nearest each quadrant (TL, TR, BL, BR)."""
    img = pixels(array)
    h, w = img.shape[0] // 2, img.shape[1] // 2
    found = []
    for q in (img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:]):
        mean = q[h // 4 : -h // 4, w // 4 : -w // 4].reshape(-1, 3).mean(axis=0)
        found.append(int(np.argmin([np.abs(mean - c).sum() for c in imagegen.QUADRANTS])))
    return found


@pytest.mark.parametrize("name", sorted(imagegen.broken_zoo()))
def test_broken_file_zoo(name):
    item = imagegen.broken_zoo()[name]
    if item.expect == "ok":
        array = load_image(item.data, PP)
        assert array.shape == (3, 224, 224) and array.dtype == np.float32
        assert np.isfinite(array).all() and -1.0 - 1e-6 <= array.min() <= array.max() <= 1.0 + 1e-6
    else:
        with pytest.raises(ImageError) as err:
            load_image(item.data, PP)
        message = str(err.value)
        print(f"{name}: {message}")
        assert item.error_contains in message.lower() and "\n" not in message


def test_error_messages_say_what_is_wrong():
    cases = {
        b"": "empty file (0 bytes)",
        b"plain words, not pixels\n" * 3: "not an image (text/plain?)",
        b"<!DOCTYPE html><html><body>404</body></html>": "not an image (text/html?)",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj": "not an image (application/pdf?)",
        bytes(range(256)) * 4: "not an image (application/octet-stream?)",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1": "unsupported image format (image/heic)",
        imagegen.jpeg_bytes()[:12]: "corrupt image: truncated JPEG",
        imagegen.png_bytes()[:30]: "corrupt image: damaged or truncated PNG header",
        imagegen.truncate(imagegen.jpeg_bytes(200, 150), 0.5): "corrupt image: truncated JPEG",
        imagegen.truncate(imagegen.png_bytes(200, 150), 0.5): "corrupt image: truncated PNG",
        imagegen.bomb_png(): "too large: 100000x100000 pixels exceeds limit 89478485",
    }
    for data, expected in cases.items():
        with pytest.raises(ImageError) as err:
            load_image(data, PP)
        assert str(err.value) == expected


# As in production (pipeline.preprocess sets this filter; pytest resets filters per test).
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_limits_are_checked_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too large: 100000x100000 pixels"):
        load_image(imagegen.bomb_png(100_000, 100_000), PP)
    # Between Pillow's warning and error thresholds: refused too, not decoded.
    with pytest.raises(ImageError, match="too large: 10000x10000 pixels exceeds limit 89478485"):
        load_image(imagegen.bomb_png(10_000, 10_000), PP)
    assert time.perf_counter() - start < 1.0  # nothing was allocated for those pixels
    with pytest.raises(ImageError, match="too large: 64x48 pixels exceeds limit 1000"):
        load_image(imagegen.png_bytes(64, 48), PP, ImageLimits(max_pixels=1000))
    data = imagegen.jpeg_bytes(64, 48)
    with pytest.raises(ImageError, match=f"file too large: {len(data)} bytes exceeds limit 100"):
        load_image(data, PP, ImageLimits(max_bytes=100))


def test_matches_torchvision_resize_crop_normalize():
    transforms = pytest.importorskip("torchvision.transforms", reason="torchvision not installed")
    reference = transforms.Compose(
        [
            transforms.Resize(PP.resize_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(PP.input_size),
            transforms.ToTensor(),
            transforms.Normalize(PP.mean, PP.std),
        ]
    )
    for width, height in [(300, 200), (200, 300), (257, 256), (1000, 40), (224, 224), (50, 70)]:
        data = imagegen.png_bytes(width, height, seed=width)
        expected = reference(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        ours = load_image(data, PP)
        # Resampling only the crop window rounds to uint8 once instead of twice: <= 1 level.
        assert np.abs(ours - expected).max() <= 2 / 255 + 1e-6, (width, height)


def test_exif_orientation_is_applied():
    # 128x64 landscape with orientation 6 (rotate 90 degrees clockwise to display): the
    # displayed image is portrait, and its quadrants move clockwise.
    stored = load_image(imagegen.jpeg_bytes(128, 64), PP)
    rotated = load_image(imagegen.jpeg_bytes(128, 64, exif_orientation=6), PP)
    assert quadrant_colors(stored) == [0, 1, 2, 3]  # red, green / blue, yellow
    assert quadrant_colors(rotated) == [2, 0, 3, 1]  # blue, red / yellow, green
    upright = decode_rgb(imagegen.jpeg_bytes(128, 64, exif_orientation=6))
    assert upright.size == (64, 128)


@pytest.mark.parametrize(
    ("data", "mode"),
    [
        (imagegen.jpeg_bytes(96, 64, mode="CMYK"), "CMYK"),
        (imagegen.png_bytes(96, 64, mode="P"), "P"),
        (imagegen.png_bytes(96, 64, mode="I;16"), "I;16"),
        (imagegen.png_bytes(96, 64, mode="L"), "L"),
        (imagegen.webp_bytes(96, 64), "RGB"),
    ],
    ids=["cmyk-jpeg", "palette-png", "16bit-png", "gray-png", "webp"],
)
def test_modes_convert_to_the_right_colors(data, mode):
    assert Image.open(io.BytesIO(data)).mode == mode
    reference = imagegen.pattern_image(96, 64)
    if mode in ("I;16", "L"):
        reference = reference.convert("L").convert("RGB")
    expected = pixels(load_image(imagegen.encode(reference, "PNG"), PP))
    got = pixels(load_image(data, PP))
    # JPEG/WebP/quantization noise only; a clipped 16-bit image or a CMYK mix-up is off by >60.
    assert np.abs(got - expected).mean() < 12, np.abs(got - expected).mean()


def test_sixteen_bit_is_scaled_not_clipped():
    gray = np.full((8, 8), 32768, dtype=np.uint16)  # half of the 16-bit range
    image = to_rgb(Image.fromarray(gray))
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    # The left quarter of imagegen's alpha images is fully transparent.
    image = decode_rgb(imagegen.png_bytes(96, 64, mode=mode))
    rgb = np.asarray(image)
    assert image.mode == "RGB"
    assert (rgb[:, :20] == 255).all()  # transparent -> white
    assert rgb[:, 40:].mean() < 200  # opaque pixels keep their color


def test_palette_transparency_is_composited_on_white():
    data = imagegen.png_bytes(96, 64, mode="P", transparency=True)
    source = Image.open(io.BytesIO(data))
    clear = np.asarray(source.convert("RGBA"))[:, :, 3] == 0
    assert clear.any() and not clear.all()
    rgb = np.asarray(decode_rgb(data))
    assert (rgb[clear] == 255).all()
    assert (rgb[~clear] == np.asarray(source.convert("RGB"))[~clear]).all()


def test_big_jpeg_is_decoded_at_a_reduced_scale_close_to_full():
    data = imagegen.jpeg_bytes(2048, 1536)
    drafted = decode_rgb(data, min_side=PP.resize_size)
    assert drafted.size == (1024, 768)  # 1/2 scale keeps >= 2 x 256 on the short side
    assert decode_rgb(data).size == (2048, 1536)
    full = load_image(data, PP)  # drafted inside
    reference = pixels(load_image_full(data))
    assert np.abs(pixels(full) - reference).mean() < 3.0  # gray levels


def load_image_full(data: bytes) -> np.ndarray:
    """load_image without the JPEG draft, for comparison."""
    from pipeline.preprocess import resize_center_crop, to_array

    return to_array(resize_center_crop(decode_rgb(data), PP), PP)


def test_extreme_aspect_ratios_and_tiny_images_are_fine():
    for width, height in [(4000, 3), (3, 4000), (1, 1)]:
        start = time.perf_counter()
        array = load_image(imagegen.png_bytes(width, height), PP)
        assert array.shape == (3, 224, 224) and np.isfinite(array).all()
        assert time.perf_counter() - start < 1.0  # only the crop window is resampled


def test_decode_in_threads_keeps_order_and_reports_errors():
    zoo = imagegen.broken_zoo()
    records = [Record(f"good-{i}", imagegen.jpeg_bytes(40, 30, seed=i)) for i in range(6)]
    records += [Record(name, item.data) for name, item in zoo.items()]
    records += [Record("from-reader", None, error="truncated tar: member data cut off")]
    records += [Record("no-data", None)]
    out = list(decode_in_threads(records, SMALL, threads=3, limits=ImageLimits()))
    assert [r.key for r, _, _ in out] == [r.key for r in records]
    for record, array, error in out:
        expect = zoo[record.key].expect if record.key in zoo else "ok"
        if record.key in ("from-reader", "no-data"):
            expect = "error"
        if expect == "ok":
            assert error is None and array.shape == (3, 32, 32), (record.key, error)
        else:
            assert array is None and error and "\n" not in error, record.key
    errors = {r.key: e for r, _, e in out}
    assert errors["from-reader"] == "truncated tar: member data cut off"
    assert errors["no-data"] == "no image data"
    np.testing.assert_array_equal(out[0][1], load_image(records[0].data, SMALL))


def test_decode_in_threads_reads_ahead_boundedly_and_stops_early():
    pulled = []
    closed = threading.Event()

    def records():
        try:
            for i in range(1000):
                pulled.append(i)
                yield Record(f"k{i}", imagegen.jpeg_bytes(16, 16))
        finally:
            closed.set()

    decoded = decode_in_threads(records(), SMALL, threads=2, ahead=4)
    first = [next(decoded) for _ in range(3)]
    time.sleep(0.3)
    assert [r.key for r, _, _ in first] == ["k0", "k1", "k2"]
    assert len(pulled) <= 3 + 4 + 2  # consumed + in flight + the one being handed over
    decoded.close()
    assert closed.wait(5)  # the reader (a shard stream) was closed


def test_decode_in_threads_raises_a_reader_failure_after_the_records_before_it():
    def records():
        yield Record("a", imagegen.jpeg_bytes(16, 16))
        yield Record("b", b"")
        raise ConnectionError("storage went away")

    seen = []
    with pytest.raises(ConnectionError, match="storage went away"):
        for record, _, _ in decode_in_threads(records(), SMALL, threads=2):
            seen.append(record.key)
    assert seen == ["a", "b"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_zoo_shard_from_storage_gives_one_outcome_per_image(backend, tmp_path, request):
    """The data plane end to end, without the model: tar in storage -> records -> arrays."""
    from pipeline.shards import list_shards, read_records
    from pipeline.storage import open_storage

    if backend == "local":
        root = str(tmp_path / "in")
    else:
        root = f"s3://{request.getfixturevalue('s3_bucket')}/in"
    storage = open_storage(root)
    samples = imagegen.image_samples(3) + imagegen.zoo_samples()
    storage.put_atomic(storage.join(root, "zoo.tar"), imagegen.tar_bytes(samples))
    (shard,) = list_shards(storage, root)
    out = list(decode_in_threads(read_records(storage, shard), SMALL, threads=2))
    assert [r.key for r, _, _ in out] == [key for key, _ in samples]
    zoo = imagegen.broken_zoo()
    for record, array, error in out:
        item = zoo.get(record.key.removeprefix("zoo-"))
        if item is None or item.expect == "ok":
            assert array is not None and error is None, (record.key, error)
        else:
            assert array is None and item.error_contains in error.lower(), (record.key, error)
