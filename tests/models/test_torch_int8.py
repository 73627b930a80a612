"""Static int8 (torch_int8.py): agreement with fp32 on a trained model, the fallback, the rule."""

from __future__ import annotations

import dataclasses
import logging
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F

from models.backends import BackendError, create
from models.backends.auto import choose
from models.backends.calibration import blob_images, calibration_images
from models.backends.hardware import CpuInfo, cpu_info, torchao_version
from models.backends.torch_int8 import (
    ENGINE,
    quantize_static,
    static_int8_available,
    static_int8_usable,
)
from models.checkpoints import save_checkpoint
from models.mixer import build_preset
from tests.models.fresh_worker import load_cached_in_fresh_process

XEON_AMX = CpuInfo("Xeon (SPR)", frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8"}), "AVX512")
ZEN4 = CpuInfo("AMD EPYC 9R14", frozenset({"avx2", "avx512_bf16", "avx512_vnni"}), "AVX512")


def bar_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class task a tiny Mixer learns in seconds: the column of a bright bar, on noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = 0.3 * torch.randn(count, 3, 32, 32, generator=generator) - 0.5
    for i, label in enumerate(labels.tolist()):
        column = 1 + 3 * label
        images[i, :, 4:28, column : column + 2] += 1.5
    return images.clamp(-1, 1), labels


@pytest.fixture(scope="module")
def trained():
    """The tiny preset trained to high accuracy on bar_images (about 5 s on 2 cores)."""
    model = build_preset("tiny").train()
    images, labels = bar_images(512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = slice(32 * (step % 16), 32 * (step % 16 + 1))
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def needs_static_int8() -> None:
    if not static_int8_usable():
        pytest.skip("static int8 needs torchao (pip install torchao) and a VNNI/AMX CPU")


def test_static_int8_agrees_with_fp32_on_a_trained_model(trained, tmp_path):
    needs_static_int8()
    images, labels = bar_images(96, seed=1)
    with torch.no_grad():
        reference = trained(images)
    accuracy = float((reference.argmax(1) == labels).float().mean())
    assert accuracy >= 0.9, f"the test model did not learn its task ({accuracy:.2f})"
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(trained, path)
    # From a path: create() owns the fp32 weights and releases them once quantized.
    predictor = create(path, "torch", "int8", "cpu", compile="jit")
    assert predictor.describe()["int8_engine"] == ENGINE
    assert predictor.compiled and not predictor.aot and predictor.max_batch_size == 16
    logits, features = predictor.predict_with_features(images)  # 96 = 6 full batches
    agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    cosine = float(F.cosine_similarity(logits, reference).min())
    print(f"static int8: top-1 agreement {agree:.3f}, min logits cosine {cosine:.4f}")
    assert logits.dtype == features.dtype == torch.float32 and features.shape == (96, 64)
    assert agree >= 0.98
    assert cosine >= 0.99
    short = predictor.predict(images[:5])  # padded to the compiled batch, cut back
    assert torch.allclose(short, logits[:5], atol=1e-4)


@pytest.fixture(scope="module")
def int8_package(trained, tmp_path_factory):
    """The trained model's static int8 AOT package, built once from a checkpoint path."""
    needs_static_int8()
    folder = tmp_path_factory.mktemp("int8-aot")
    path = folder / "tiny.safetensors"
    save_checkpoint(trained, path)
    cache_dir = folder / "cache"
    predictor = create(
        path, "torch", "int8", "cpu", batch_size=8, compile="aot", cache_dir=cache_dir
    )
    return predictor, path, cache_dir


def test_int8_package_is_built_once_then_loaded_and_agrees_with_fp32_like_jit(
    trained, int8_package
):
    built, path, cache_dir = int8_package
    assert built.aot and built.aot_info["source"] == "built"
    assert built.aot_info["key"].startswith("aoti-int8-b8-")
    assert built.describe()["int8_engine"] == ENGINE and built.max_batch_size == 8
    cached = create(path, "torch", "int8", "cpu", batch_size=8, compile="aot", cache_dir=cache_dir)
    assert cached.aot_info["source"] == "local"
    assert cached.aot_info["key"] == built.aot_info["key"]
    images, _ = bar_images(44, seed=3)  # 5 full batches and a padded one
    logits, features = cached.predict_with_features(images)
    assert torch.equal(logits, built.predict(images))
    assert logits.dtype == features.dtype == torch.float32 and features.shape == (44, 64)
    with torch.no_grad():
        reference = trained(images)
    agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    cosine = float(F.cosine_similarity(logits, reference).min())
    print(f"static int8 AOT: top-1 agreement {agree:.3f}, min logits cosine {cosine:.4f}")
    assert agree >= 0.98 and cosine >= 0.99
    jit = create(trained, "torch", "int8", "cpu", batch_size=8, compile="jit")
    assert not jit.aot and jit.describe()["int8_engine"] == ENGINE
    # The same quantized graph and kernels; the package was calibrated in another process.
    assert (logits - jit.predict(images)).abs().max() < 0.05


def test_int8_package_calls_onednn_int8_kernels_through_the_c_shim(int8_package):
    """Every GEMM is lowered to oneDNN's int8 kernels and called without Python (no proxy
    executor, which would need the op's Python registration: torchao at load time)."""
    predictor, _, cache_dir = int8_package
    with zipfile.ZipFile(cache_dir / "aoti" / predictor.aot_info["key"]) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".wrapper.cpp")]
        source = archive.read(name).decode()
    linears = source.count("aoti_torch_cpu__qlinear_pointwise")
    assert linears == 1 + 4 * 2  # the head and four Linears in each of two blocks
    assert source.count("aoti_torch_cpu__qconv_pointwise") == 1  # the stem
    assert "call_function(" not in source


def test_int8_package_constants_are_all_realigned(int8_package):
    """The int8 lowering names every activation scale "x_scale": each must still be realigned
    (a constant left in the runner's buffer keeps it, and its misaligned weights, alive)."""
    constants = int8_package[0]._forward.constants
    int8_weights = [t for t in constants.values() if t.dtype == torch.int8]
    assert len(int8_weights) == 2 + 4 * 2  # stem, head, four Linears in each of two blocks
    assert sum(t.dim() == 0 for t in constants.values()) >= 8  # the per-GEMM x_scale / x_zp
    for name, tensor in constants.items():
        mkldnn = tensor.layout == torch._mkldnn
        address = torch.ops.mkldnn.data_ptr(tensor) if mkldnn else tensor.data_ptr()
        assert address % 64 == 0, name


def test_loading_an_int8_package_imports_neither_torchao_nor_the_compiler(int8_package):
    """The worker's memory claim: torchao (215 MB) and Inductor stay out of a loading process."""
    _, path, cache_dir = int8_package
    never = ("torchao", "torch._inductor", "torch._dynamo", "sympy")
    load_cached_in_fresh_process(str(path), "int8", 8, cache_dir, 3, never)


def test_int8_aot_without_torchao_is_refused_by_name(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(BackendError, match="compile='aot' int8 needs static int8"):
        create(trained, "torch", "int8", "cpu", compile="aot")


def test_without_torchao_int8_falls_back_to_dynamic_quantization(trained, monkeypatch, caplog):
    # Hide torchao (and anything of it already imported) so importing it fails.
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert not static_int8_available()
    with caplog.at_level(logging.INFO, logger="models.backends.torch_backend"):
        predictor = create(trained, "torch", "int8", "cpu", compile=True)
    assert predictor.describe()["int8_engine"].startswith("dynamic-")
    assert not predictor.compiled and predictor.max_batch_size is None
    assert "dynamic" in caplog.text
    images, _ = bar_images(32, seed=2)
    with torch.no_grad():
        reference = trained(images)
    logits = predictor.predict(images)
    assert F.cosine_similarity(logits, reference).min() >= 0.99
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    # ... and auto does not pick int8 on an AMX Xeon then.
    assert choose(available=("torch",), device="cpu", cpu=XEON_AMX).precision == "bf16"


def test_auto_rule_with_static_int8():
    def precision(cpu, **kw):
        return choose(available=("torch",), device="cpu", cpu=cpu, **kw).precision

    assert precision(XEON_AMX, static_int8=True) == "int8"
    assert precision(XEON_AMX, static_int8=False) == "bf16"
    assert precision(ZEN4, static_int8=True) == "bf16"  # VNNI-only int8 vs bf16: not measured
    onnx = choose("onnxruntime", available=("onnxruntime",), device="cpu", cpu=XEON_AMX)
    assert onnx.precision == "fp32"
    if static_int8_available():  # probed: a model too small to compile gets no static int8
        assert precision(XEON_AMX, gflop=0.01) == "bf16"
        assert precision(XEON_AMX, gflop=25.2) == "int8"


def test_auto_takes_bf16_when_its_int8_would_only_be_dynamic(caplog):
    """auto picks int8 for the static path; without it (here: compile=False) bf16 is faster."""
    model = build_preset("S/32")  # about 2 GFLOP per image: big enough for static int8
    if not cpu_info().amx_int8 or not static_int8_available():
        pytest.skip("auto picks int8 for its static path only with AMX int8 and torchao")
    with caplog.at_level(logging.WARNING, logger="models.backends"):
        predictor = create(model, "torch", "auto", "cpu", batch_size=2, compile=False)
    assert predictor.precision == "bf16" and "bf16 instead" in predictor.choice.reason
    assert "auto falls back to bf16" in caplog.text
    explicit = create(model, "torch", "int8", "cpu", batch_size=2, compile=False)
    assert explicit.precision == "int8" and explicit.int8_engine.startswith("dynamic")


def test_capped_onednn_isa_gets_no_amx_int8():
    capped = dataclasses.replace(XEON_AMX, isa_cap="AVX512_CORE_BF16")
    assert XEON_AMX.amx_int8 and not capped.amx_int8
    assert choose(available=("torch",), device="cpu", cpu=capped, static_int8=True).precision == (
        "bf16"
    )


def test_calibration_images_are_deterministic_normalized_and_have_edges():
    config = build_preset("tiny").config
    first, again = calibration_images(config), calibration_images(config)
    assert first.shape == (32, 3, 32, 32) and torch.equal(first, again)
    assert first.min() >= -1 and first.max() <= 1
    blobs = blob_images(4, 32, seed=0)
    steps = (blobs[..., 1:] - blobs[..., :-1]).abs()
    assert steps.max() > 0.1 and (steps == 0).float().mean() > 0.5  # flat areas, sharp edges


def test_quantized_graph_keeps_no_fp32_weights():
    needs_static_int8()
    import torchao.utils

    model = build_preset("tiny")
    quantized = quantize_static(model, batch_size=4)
    weights = [p for p in quantized.parameters() if p.dim() >= 2]
    int8 = [t for t in quantized.state_dict().values() if t.dtype == torch.int8]
    assert weights == [] and len(int8) == 2 + 4 * len(model.blocks)  # stem, head, 4 per block
    assert torchao.utils._assert_and_get_unique_device.cache_info().currsize == 0


@pytest.mark.skipif(torchao_version() is None, reason="torchao is not installed here")
def test_importing_the_quantizer_prints_nothing():
    import subprocess

    code = "from models.backends.torch_int8 import import_quantizer; import_quantizer()"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout == "" and done.stderr == "", done.stderr[-2000:]
