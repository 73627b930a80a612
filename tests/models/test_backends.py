"""models.backends: every backend and precision against the paper-exact fp32 model (tiny preset)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.backends import BackendError, LocalCacheStore, available_backends, create
from models.backends.auto import choose
from models.backends.hardware import CpuInfo, GpuInfo, onednn_isa_cap, parse_cpuinfo
from models.backends.torch_fused import FusedMixer, gelu_table
from models.checkpoints import load_checkpoint, save_checkpoint
from models.mixer import build_preset

OFFICIAL = Path(__file__).parent / "data" / "official_small" / "params.npz"


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def reference(model, images):
    with torch.inference_mode():
        return model(images), model.forward_features(images)


# --- the fused module is the same network -----------------------------------------------------


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_fused_mixer_fp32_equals_the_paper_model(images, gelu):
    model = build_preset("tiny", gelu=gelu)
    logits, features = reference(model, images)
    with torch.inference_mode():
        fused_logits, fused_features = FusedMixer(model, torch.float32)(images)
    assert (fused_logits - logits).abs().max() < 1e-5
    assert (fused_features - features).abs().max() < 1e-5


def test_fused_mixer_runs_the_official_checkpoint():
    model = load_checkpoint(OFFICIAL)
    size = model.config.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    logits, _ = reference(model, x)
    with torch.inference_mode():
        fused, _ = FusedMixer(model, torch.float32)(x)
    assert (fused - logits).abs().max() < 1e-4


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_table_is_gelu_rounded_to_bf16_for_every_input(approximate):
    table = gelu_table(approximate)
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(values)
    expected = F.gelu(values.float(), approximate=approximate).to(torch.bfloat16)
    assert torch.equal(table[finite], expected[finite])
    model = build_preset("tiny", gelu="tanh" if approximate == "tanh" else "erf")
    fused = FusedMixer(model, torch.bfloat16, gelu_by_table=True)
    x = torch.randn(1000).to(torch.bfloat16) * 4
    assert torch.equal(fused.gelu(x), F.gelu(x.float(), approximate=approximate).bfloat16())
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        by_table, _ = fused(images)
        computed, _ = FusedMixer(model, torch.bfloat16)(images)
    assert (by_table - computed).abs().max() < 0.02


@pytest.mark.parametrize("flag", ["gelu_in_gemm", "token_gelu_in_gemm"])
def test_gelu_in_gemm_is_refused_for_an_erf_model(flag):
    # cuBLASLt's epilogue computes the tanh form: an erf model would silently change.
    with pytest.raises(ValueError, match="tanh GELU"):
        FusedMixer(build_preset("tiny", gelu="erf"), torch.float32, **{flag: True})


@pytest.mark.parametrize("flag", ["gelu_in_gemm", "token_gelu_in_gemm"])
def test_mlps_with_gelu_in_the_gemm_compute_the_same_model(flag):
    # Where the GEMM's epilogue computes the GELU, the token MLP runs transposed; on the CPU
    # the op computes the erf form (within 1e-3 of tanh), so only the layout can differ here:
    # a bias on the wrong axis or a transposed weight would move the logits far more.
    model = build_preset("tiny")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, _ = FusedMixer(model, torch.float32)(images)
        logits, _ = FusedMixer(model, torch.float32, **{flag: True})(images)
    assert (logits - expected).abs().max() < 1e-2
    assert F.cosine_similarity(logits, expected).min() > 0.9999


# --- every backend and precision on the CPU ----------------------------------------------------

CPU_CASES = [
    ("torch", "fp32", 1e-5, 0.9999),
    ("torch", "bf16", 0.05, 0.999),
    ("torch", "int8", 0.1, 0.995),
    ("onnxruntime", "fp32", 1e-4, 0.9999),
]


@pytest.mark.parametrize(("backend", "precision", "tolerance", "min_cosine"), CPU_CASES)
def test_cpu_predictors_match_fp32(
    tiny, images, tmp_path, backend, precision, tolerance, min_cosine
):
    logits, features = reference(tiny, images)
    predictor = create(tiny, backend, precision, "cpu", cache_dir=tmp_path)
    assert (predictor.name, predictor.precision, predictor.device) == (backend, precision, "cpu")
    assert predictor.preferred_batch_size >= 1
    got_logits, got_features = predictor.predict_with_features(images)
    assert got_logits.dtype == got_features.dtype == torch.float32
    assert got_logits.shape == (24, 10) and got_features.shape == (24, 64)
    scale = logits.abs().max()
    print(f"{backend} {precision}: max logit diff {(got_logits - logits).abs().max():.2e}")
    assert (got_logits - logits).abs().max() <= tolerance * max(1.0, float(scale))
    assert F.cosine_similarity(got_logits, logits).min() >= min_cosine
    assert torch.equal(predictor.predict(images), got_logits)


def test_auto_on_this_machine_is_a_real_choice(tiny, images):
    predictor = create(tiny)
    print(f"auto: {predictor.choice}")
    assert predictor.choice.backend in available_backends(predictor.device)
    agreement = (predictor.predict(images).argmax(1) == tiny(images).argmax(1)).float().mean()
    assert agreement >= 0.95


def test_create_takes_a_checkpoint_path_and_a_preset_name(tiny, tmp_path, images):
    path = tmp_path / "tiny.safetensors"
    digest = save_checkpoint(tiny, path)
    from_file = create(path, "torch", "fp32", "cpu")
    assert from_file.sha256 == digest
    assert from_file.label_names == tiny.label_names
    assert torch.allclose(from_file.predict(images), tiny(images), atol=1e-5)
    from_preset = create("tiny", "torch", "fp32", "cpu")
    assert torch.allclose(from_preset.predict(images), tiny(images), atol=1e-5)
    assert tiny.stem.weight.device.type == "cpu"  # a model passed in is never released


def test_compiled_torch_runs_any_batch_size_with_one_shape(tiny, images):
    predictor = create(tiny, "torch", "bf16", "cpu", batch_size=8, compile=True)
    assert predictor.compiled, "torch.compile failed here (see the log)"
    expected = create(tiny, "torch", "bf16", "cpu", compile=False).predict(images)
    for n in (1, 8, 19):  # smaller (padded), equal, larger (split and padded)
        got = predictor.predict(images[:n])
        assert got.shape == (n, 10)
        assert (got - expected[:n]).abs().max() < 0.05


def test_empty_batch_gives_empty_outputs(tiny):
    logits, features = create(tiny, "torch", "fp32", "cpu").predict_with_features(
        torch.zeros(0, 3, 32, 32)
    )
    assert logits.shape == (0, 10) and features.shape == (0, 64)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (torch.zeros(2, 3, 32), "shape (2, 3, 32)"),
        (torch.zeros(2, 1, 32, 32), "expected (N, 3, 32, 32)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.float64), "dtype torch.float64"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_batches_name_what_is_wrong(tiny, batch, message):
    predictor = create(tiny, "torch", "fp32", "cpu")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predictor.predict(batch)


def test_bad_arguments_name_what_is_wrong(tiny):
    with pytest.raises(ValueError, match="backend must be"):
        create(tiny, "tflite")
    with pytest.raises(ValueError, match="precision must be"):
        create(tiny, "torch", "fp4")
    with pytest.raises(ValueError, match="unknown predictor option"):
        create(tiny, "torch", "fp32", "cpu", batchsize=4)
    with pytest.raises(BackendError, match="fp16"):
        create(tiny, "torch", "fp16", "cpu")
    with pytest.raises(BackendError, match="onnxruntime on CPU runs fp32"):
        create(tiny, "onnxruntime", "bf16", "cpu")
    with pytest.raises(ValueError, match="device must be"):
        create(tiny, "torch", "fp32", "tpu")


# --- the auto rule on hardware that is not here -----------------------------------------------

XEON_AMX = CpuInfo("Xeon (SPR)", frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8"}), "AVX512")
EPYC_AVX2 = CpuInfo("AMD EPYC 7B12", frozenset({"avx2", "fma"}), "AVX2")
ZEN4 = CpuInfo("AMD EPYC 9R14", frozenset({"avx2", "avx512_bf16", "avx512_vnni"}), "AVX512")
OLD = CpuInfo("old", frozenset({"sse4_2"}), "DEFAULT")


@pytest.mark.parametrize(
    ("cpu", "precision"), [(XEON_AMX, "bf16"), (ZEN4, "bf16"), (EPYC_AVX2, "int8"), (OLD, "fp32")]
)
def test_auto_rule_on_cpus(cpu, precision):
    # Without torchao's static int8; with it, see tests/models/test_torch_int8.py.
    choice = choose(available=("torch", "onnxruntime"), device="cpu", cpu=cpu, static_int8=False)
    print(choice.reason)
    assert (choice.backend, choice.precision, choice.device) == ("torch", precision, "cpu")


@pytest.mark.parametrize(
    ("capability", "backends", "expected"),
    [
        ((9, 0), ("torch", "tensorrt"), ("tensorrt", "bf16")),
        ((8, 9), ("torch",), ("torch", "bf16")),
        ((7, 5), ("torch", "tensorrt"), ("tensorrt", "fp16")),
        ((6, 1), ("torch",), ("torch", "fp32")),
    ],
)
def test_auto_rule_on_gpus(capability, backends, expected):
    gpu = GpuInfo("Some GPU", capability)
    choice = choose(available=backends, device="cuda:0", gpu=gpu)
    assert (choice.backend, choice.precision) == expected


def test_auto_never_picks_what_the_software_cannot_use():
    no_avx2_build = CpuInfo("EPYC, torch built without AVX2", EPYC_AVX2.flags, "DEFAULT")
    assert choose(available=("torch",), device="cpu", cpu=no_avx2_build).precision == "fp32"
    below_bf16 = dataclasses.replace(XEON_AMX, isa_cap="AVX512_CORE_VNNI")
    assert choose(available=("torch",), device="cpu", cpu=below_bf16).precision == "int8"
    amx = dataclasses.replace(XEON_AMX, isa_cap="AVX512_CORE_AMX")
    without_torchao = choose(available=("torch",), device="cpu", cpu=amx, static_int8=False)
    assert without_torchao.precision == "bf16"


def test_the_onednn_isa_cap_is_read_from_the_environment_once(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert onednn_isa_cap() == "AVX2"
    info = parse_cpuinfo("flags : avx2 amx_bf16\n", "AVX512", 2, onednn_isa_cap())
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "ALL")  # later changes do not reach the facts
    assert info.isa_cap == "AVX2" and not info.native_bf16


def test_auto_precision_follows_an_explicit_backend():
    cpu = choose("onnxruntime", available=("torch", "onnxruntime"), device="cpu", cpu=XEON_AMX)
    assert cpu.precision == "fp32"  # no bf16 GEMM in onnxruntime's CPU provider
    gpu = choose(
        "onnxruntime", device="cuda:0", available=("onnxruntime",), gpu=GpuInfo("H", (9, 0))
    )
    assert gpu.precision == "fp16"


def test_parse_cpuinfo_reads_model_and_flags():
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
        "flags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n"
    )
    info = parse_cpuinfo(text, "AVX512", 2)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8488C"
    assert info.native_bf16 and info.amx and "fpu" in info.flags
    assert info.describe()["flags"] == ["amx_bf16", "avx2"]


# --- caches -------------------------------------------------------------------------------------


def test_local_cache_store_round_trip_and_refuses_paths(tmp_path):
    store = LocalCacheStore(tmp_path / "c")
    assert store.get("a.plan") is None
    store.put("a.plan", b"x" * 10)
    store.put("a.plan", b"y")  # replaced atomically, no temp files left behind
    assert store.get("a.plan") == b"y"
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["a.plan"]
    for bad in ("../a", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not a plain file name"):
            store.put(bad, b"")


def test_onnx_export_is_cached_by_weights_and_precision(tiny, tmp_path):
    from models.backends.onnx_graph import export_cached

    first = export_cached(tiny, "fp32", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert export_cached(tiny, "fp32", tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # not exported again
    other = build_preset("tiny", seed=1)
    assert export_cached(other, "fp32", tmp_path) != first
    assert export_cached(tiny, "fp16", tmp_path) != first


def test_the_local_cache_writes_atomically_with_the_umask_permissions(tmp_path):
    import os

    from models.backends.cache import LocalCacheStore, atomic_file

    store = LocalCacheStore(tmp_path)
    old = os.umask(0o022)
    try:
        store.put("entry.json", b"{}")
    finally:
        os.umask(old)
    assert store.get("entry.json") == b"{}"
    # Readable by the other users and services of a node that share the cache (not 0600).
    assert (tmp_path / "entry.json").stat().st_mode & 0o777 == 0o644
    # A write that fails leaves the old entry and no partial file behind.
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "entry.json") as f:
        f.write(b"torn")
        raise RuntimeError("the build died")
    assert store.get("entry.json") == b"{}" and sorted(os.listdir(tmp_path)) == ["entry.json"]
