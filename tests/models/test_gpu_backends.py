"""CUDA backends: torch (graphs, compile), onnxruntime's CUDA provider, TensorRT engines.

These run where CUDA (and tensorrt with its builder) are present and skip with the reason
elsewhere. The tiny preset keeps builds to seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.backends import BackendError, create
from models.backends.hardware import onnxruntime_providers as providers_available
from models.backends.torch_fused import FusedMixer

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible to torch here"
)


def fp8_missing() -> str | None:
    from models.backends.torch_fp8 import check_fp8_device

    try:
        check_fp8_device("cuda:0")
    except BackendError as err:
        return str(err)
    return None


requires_fp8 = pytest.mark.skipif(fp8_missing() is not None, reason=f"{fp8_missing()}")


def tensorrt_missing() -> str | None:
    from models.backends.tensorrt_backend import import_tensorrt

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch here"
    try:
        import_tensorrt()
    except BackendError as err:
        return str(err)
    return None


requires_tensorrt = pytest.mark.skipif(
    tensorrt_missing() is not None, reason=f"tensorrt unusable: {tensorrt_missing()}"
)


class DictStore:
    """A CacheStore in memory that counts its writes (a real store, as pipeline's S3 one)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.puts: list[str] = []

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.data[key] = data


@pytest.fixture(scope="module")
def images():
    return torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def check_close(predictor, model, images, tolerance):
    logits, features = predictor.predict_with_features(images)
    with torch.inference_mode():
        expected, expected_features = model(images), model.forward_features(images)
    print(f"{predictor}: max logit diff {(logits - expected).abs().max():.2e}")
    assert logits.device.type == "cpu" and logits.dtype == torch.float32
    assert (logits - expected).abs().max() < tolerance
    assert (features - expected_features).abs().max() < 4 * tolerance
    assert F.cosine_similarity(logits, expected).min() > 0.99


@requires_cuda
@pytest.mark.parametrize(
    ("precision", "tolerance"), [("fp32", 1e-3), ("bf16", 5e-2), ("fp16", 1e-2)]
)
def test_torch_cuda_graphs(tiny, images, precision, tolerance):
    predictor = create(tiny, "torch", precision, "cuda", batch_size=8, compile=False)
    assert predictor.device == "cuda:0" and predictor.cuda_graphs
    check_close(predictor, tiny, images, tolerance)  # 20 = 8 + 8 + 4 (padded)


@requires_cuda
def test_torch_cuda_compiled(tiny, images):
    predictor = create(tiny, "torch", "bf16", "cuda", batch_size=16, compile=True)
    assert predictor.compiled
    check_close(predictor, tiny, images, 5e-2)


@requires_cuda
def test_gemm_epilogue_gelu_is_the_tanh_form_on_cuda():
    """FusedMixer(gelu_in_gemm=True) relies on cuBLASLt's epilogue computing the tanh GELU."""
    generator = torch.Generator().manual_seed(0)
    a, w = torch.randn(256, 64, generator=generator), torch.randn(128, 64, generator=generator)
    bias = torch.randn(128, generator=generator)
    out = torch._addmm_activation(bias.cuda(), a.cuda(), w.cuda().t(), use_gelu=True).cpu()
    linear = a.double() @ w.double().t() + bias.double()
    tanh_error = (out - F.gelu(linear, approximate="tanh")).abs().max().item()
    erf_error = (out - F.gelu(linear)).abs().max().item()
    print(f"epilogue GELU: vs tanh {tanh_error:.1e}, vs erf {erf_error:.1e}")
    assert tanh_error < erf_error and tanh_error < 2e-3  # tf32 may round the product


@requires_cuda
@pytest.mark.parametrize(
    "flags",
    [
        ("gelu_in_gemm",),
        ("gelu_in_gemm", "token_gelu_in_gemm"),
        ("residual_in_gemm",),
        ("gelu_in_gemm", "token_gelu_in_gemm", "residual_in_gemm"),
    ],
)
def test_fused_gelu_in_gemm_matches_the_separate_gelu(tiny, images, flags):
    plain = FusedMixer(tiny, torch.float32).cuda()
    in_gemm = FusedMixer(tiny, torch.float32, **dict.fromkeys(flags, True)).cuda()
    with torch.inference_mode():
        expected, _ = plain(images.cuda())
        logits, _ = in_gemm(images.cuda())
    assert (logits - expected).abs().max().item() < 1e-3


@requires_fp8
@pytest.mark.parametrize("compile", [False, True])
def test_torch_fp8_on_cuda_is_its_cpu_simulation(tiny, images, compile):
    """`torch._scaled_mm` computes what tests/models/test_torch_fp8.py simulates on the CPU."""
    from models.backends.torch_fp8 import Fp8Mixer

    predictor = create(tiny, "torch", "fp8", "cuda", batch_size=8, compile=compile)
    assert predictor.precision == "fp8" and predictor.cuda_graphs
    logits = predictor.predict(images)
    with torch.inference_mode():
        simulated, _ = Fp8Mixer(tiny, simulate=True)(images)
    difference = (logits - simulated).abs().max().item()
    print(f"fp8 on {torch.cuda.get_device_name()} vs CPU simulation: max diff {difference:.2e}")
    assert F.cosine_similarity(logits, simulated).min() > 0.999
    check_close(predictor, tiny, images, 0.2)


@requires_cuda
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in providers_available(),
    reason="onnxruntime here has no CUDAExecutionProvider",
)
def test_onnxruntime_cuda_fp16(tiny, images, tmp_path):
    check_close(create(tiny, "onnxruntime", "fp16", "cuda", cache_dir=tmp_path), tiny, images, 2e-2)


@requires_tensorrt
@pytest.mark.parametrize(
    ("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 2e-2), ("bf16", 5e-2)]
)
def test_tensorrt_engine_matches_and_is_built_once(tiny, images, tmp_path, precision, tolerance):
    store = DictStore()
    options = dict(cache_dir=tmp_path, cache_store=store, batch_size=8, max_batch_size=16)
    first = create(tiny, "tensorrt", precision, "cuda", **options)
    plans = [k for k in store.puts if k.endswith(".plan")]
    assert len(plans) == 1 and any(k.startswith("timing-") for k in store.puts)
    assert first.key.precision == precision and first.key.max_batch == 16
    check_close(first, tiny, images, tolerance)  # 20 > 16: split into two runs
    second = create(tiny, "tensorrt", precision, "cuda", **options)
    assert [k for k in store.puts if k.endswith(".plan")] == plans  # loaded, not rebuilt
    assert torch.equal(second.predict(images), first.predict(images))


@requires_tensorrt
def test_tensorrt_rebuilds_a_corrupt_cached_engine(tiny, images, tmp_path):
    store = DictStore()
    first = create(tiny, "tensorrt", "fp16", "cuda", cache_dir=tmp_path, cache_store=store)
    name = first.key.file_name()
    store.data[name] = b"not an engine"
    again = create(tiny, "tensorrt", "fp16", "cuda", cache_dir=tmp_path, cache_store=store)
    assert store.puts.count(name) == 2 and store.data[name] != b"not an engine"
    check_close(again, tiny, images, 2e-2)


@requires_tensorrt
def test_auto_picks_tensorrt_on_a_gpu(tiny, tmp_path):
    predictor = create(tiny, cache_dir=tmp_path)
    print(predictor.choice)
    assert predictor.name == "tensorrt"
