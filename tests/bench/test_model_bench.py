"""mixer-label bench: measurement kernels and a whole run on the tiny preset (no timing asserts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench.measure import (
    Timing,
    agreement,
    gemm_ceiling,
    gemm_peaks,
    gemm_rate,
    load_inputs,
    memory_in_fresh_process,
    memory_probe,
    model_gemms,
    repeat_to,
    synthetic_images,
    time_batches,
    timm_reference_name,
)
from bench.model_bench import BenchOptions, configurations, format_markdown
from console.main import main as cli_main
from models.mixer import PRESETS


def test_timing_statistics():
    timing = Timing(8, [0.1, 0.4, 0.2, 0.2, 0.3])
    assert timing.images_per_s == pytest.approx(8 / 0.2)
    assert timing.best_images_per_s == pytest.approx(80)
    assert timing.percentile_ms(0.5) == pytest.approx(200)
    assert timing.percentile_ms(0.9) == pytest.approx(400)
    assert timing.to_dict()["runs"] == 5


def test_time_batches_warms_up_then_runs_at_least_min_runs():
    calls = []
    timing = time_batches(lambda: calls.append(1), batch_size=4, seconds=0.0, min_runs=3, warmup=2)
    assert len(calls) == 5 and len(timing.latencies_s) == 3
    assert all(t >= 0 for t in timing.latencies_s)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_gemm_rate_measures_a_real_gemm(kind):
    rate = gemm_rate(kind, 64, 64, 128, seconds=0.05)
    print(f"{kind} 64x64x128: {rate:.1f} GFLOP/s")
    assert math.isfinite(rate) and rate > 0


def test_fp8_gemm_rate_pads_an_unaligned_gemm_as_fp8_linear_does():
    # K = 196 (B/16's tokens) is no multiple of 16: the rate pads it as the model does.
    # torch >= 2.10 has a CPU kernel for the op; the GPU run measures the real one.
    try:
        rate = gemm_rate("fp8", 64, 196, 40, seconds=0.05)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch {torch.__version__} has no CPU _scaled_mm for fp8: {err}")
    print(f"fp8 64x196x40 on the CPU: {rate:.1f} GFLOP/s")
    assert math.isfinite(rate) and rate > 0


def test_gemm_peaks_use_the_channel_mlp_shape():
    config = PRESETS["tiny"]
    peaks = gemm_peaks(config, [2], ["fp32"], 0.05, "cpu")
    assert list(peaks["fp32"]) == [f"{2 * config.num_tokens}x64x128"]


@pytest.mark.parametrize("name", ["tiny", "S/32", "B/16", "L/16"])
def test_model_gemms_are_all_the_multiply_adds(name):
    config = PRESETS[name]
    gemms = model_gemms(config, batch=3)
    assert sum(m * k * n * calls for _, m, k, n, calls in gemms) == 3 * config.macs_per_image()
    work = {gemm: m * k * n * calls for gemm, m, k, n, calls in gemms}
    if name != "tiny":  # whose stem (K = 3 * 8 * 8) outweighs its channel MLP
        assert work["channel fc1"] == max(work.values())  # the shape gemm_peaks times


def test_gemm_ceiling_sums_each_shape_at_its_own_rate():
    config = PRESETS["tiny"]
    ceiling = gemm_ceiling(config, 2, "fp32", 0.05, "cpu")
    gemms = ceiling["gemms"]
    assert [g["name"] for g in gemms] == [g[0] for g in model_gemms(config, 2)]
    assert gemms[1]["shape"] == f"{2 * 64}x{config.num_tokens}x32"
    seconds = sum(
        g["calls"] * 2 * math.prod(map(int, g["shape"].split("x"))) / (g["gflops"] * 1e9)
        for g in gemms
    )
    assert ceiling["images_per_s"] == pytest.approx(2 / seconds)
    assert all(g["gflops"] > 0 for g in gemms)


def test_agreement_of_identical_and_of_flipped_logits():
    reference = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.5, 0.0]])
    same = agreement(reference, reference.clone())
    assert same == {
        "top1_agreement": 1.0,
        "top1_exact": 1.0,
        "decided_images": 4,
        "max_prob_diff": 0.0,
        "min_cosine": pytest.approx(1.0),
        "mean_cosine": pytest.approx(1.0),
    }
    flipped = reference.clone()
    flipped[1] = torch.tensor([2.0, 0.0, 1.0])
    result = agreement(reference, flipped)
    assert result["top1_agreement"] == result["top1_exact"] == 0.75
    assert result["max_prob_diff"] > 0.3 and result["min_cosine"] < 0.9


def test_synthetic_images_are_fixed_normalized_and_smooth():
    a, b = synthetic_images(4, 32), synthetic_images(4, 32)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)  # the same inputs every run
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, synthetic_images(4, 32, seed=1))


def test_load_inputs_reads_npy_and_refuses_bad_files(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((5, 3, 32, 32), np.float32))
    assert load_inputs(good, 32).shape == (5, 3, 32, 32)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected \(N, 3, 32, 32\)"):
        load_inputs(wrong, 32)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_inputs(pickled, 32)


def test_repeat_to_fills_a_batch():
    images = torch.arange(3.0).view(3, 1, 1, 1)
    assert repeat_to(images, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert repeat_to(images, 2).flatten().tolist() == [0, 1]


def test_timm_reference_is_the_same_geometry():
    assert timm_reference_name(PRESETS["B/16"]) == "mixer_b16_224"
    assert timm_reference_name(PRESETS["S/32"]) == "mixer_s32_224"
    assert timm_reference_name(PRESETS["tiny"]) is None


def test_memory_probe_reports_weights_and_peak():
    result = memory_probe("tiny", "torch", "fp32", 4, "cpu")
    params = sum(
        p.numel() for p in __import__("models.mixer").mixer.build_preset("tiny").parameters()
    )
    assert result["weights_mb"] == pytest.approx(params * 4 / 2**20)
    assert result["peak_mb"] >= 0 and result["activations_mb"] > 0


def test_fresh_process_peak_is_its_own_not_the_parents():
    parent = bytearray(300 * 2**20)  # resident: bytearray zero-fills its pages
    result = memory_in_fresh_process("tiny", "torch", "fp32", 4, "cpu")
    assert len(parent) and result["peak_mb"] < 200  # ru_maxrss would say >= 300


def test_configurations_put_auto_first_and_run_each_pair_once():
    options = BenchOptions(
        backends=("auto", "torch", "tensorrt"), precisions=("bf16", "fp16", "int8")
    )
    pairs = configurations(options, "cpu")
    assert pairs[0] == ("auto", "auto") and len(pairs) == len(set(pairs))
    assert ("torch", "fp16") not in pairs  # not a CPU precision
    assert any("tensorrt" in note for note in options.notes)


def test_whole_run_on_tiny_gives_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = cli_main(
        [
            "bench",
            "--model",
            "tiny",
            "--seconds",
            "0.05",
            "--agreement-images",
            "8",
            "--backends",
            "auto,torch,onnxruntime",
            "--precisions",
            "fp32,bf16",
            "--batch-sizes",
            "4",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| backend | precision | batch | img/s (median) | img/s (best) | % of limit |" in out
    report = json.loads(path.read_text())
    rows = {(r["backend"], r["precision"]) for r in report["results"]}
    assert {("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32")} <= rows
    assert report["results"][0]["auto"] and "(auto) | 4 |" in out
    # auto measured its candidates at the run's batch size; the table and JSON say how.
    decision = report["auto"]
    assert decision["source"] == "measured" and decision["candidates"][0]["precision"] == "fp32"
    chose = f"{report['results'][0]['backend']} {report['results'][0]['precision']}"
    assert decision["chose"] == chose and f"auto chose **{chose}** by measurement" in out
    assert "ratio_to_fastest" in report["auto_vs_fastest"]
    for row in report["results"]:
        assert row["batch_size"] == 4 and row["images_per_s"] > 0
        assert 0 <= row["top1_agreement"] <= 1 and row["percent_of_limit"] > 0
    assert set(report["gemm"]) == {"fp32", "bf16", "int8"}
    assert report["limit"]["images_per_s"] > 0
    ceiling = report["gemm_ceiling"]
    assert ceiling["images_per_s"] > 0 and len(ceiling["gemms"]) == 6
    assert ceiling["kind"] == report["limit"]["kind"] and ceiling["percent_of_limit"] > 0
    assert all(row["percent_of_gemm_ceiling"] > 0 for row in report["results"])
    assert "GEMM-only ceiling:" in out and "| % of GEMM-only |" in out
    assert report["memory"]["backend"] == "torch" and report["memory"]["peak_mb"] >= 0
    assert report["machine"]["cpu"]["cpus"] >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "x"], "--batch-sizes must be integers"),
        (["--backends", "tflite"], "unknown backend 'tflite'"),
        (["--precisions", "fp4"], "unknown precision 'fp4'"),
        (["--model", "no-such-model"], "neither a checkpoint file nor a preset"),
        (["--seconds", "0"], "--seconds must be positive"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, message, capsys):
    assert cli_main(["bench", "--no-memory", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("mixer-label bench: error:")


def test_markdown_of_a_report_without_gemm_or_memory():
    report = {
        "date": "2026-01-01",
        "machine": {
            "cpu": {"model": "X", "cpus": 2, "flags": [], "torch_capability": "AVX2"},
            "device": "cpu",
            "threads": 2,
            "torch": "2",
        },
        "model": {"name": "m", "parameters": 10, "gflop_per_image": 1.0},
        "results": [
            {
                "backend": "torch",
                "precision": "fp32",
                "batch_size": 2,
                "images_per_s": 3.0,
                "best_images_per_s": 4.0,
                "p50_ms": 1,
                "p90_ms": 2,
                "setup_s": 0,
            }
        ],
        "notes": ["n"],
    }
    text = format_markdown(report)
    assert "| torch | fp32 | 2 | 3.0 | 4.0 | - |" in text and "- n" in text


def test_the_trained_models_code_fingerprint_reads_no_benchmark_file(monkeypatch):
    """Editing a benchmark must not make the demo retrain: bench/ is outside what
    pipeline.train.code_fingerprint hashes (models/ and a few pipeline modules)."""
    from pathlib import Path

    from pipeline import train

    read: list[Path] = []
    original = Path.read_bytes

    def recording(self: Path) -> bytes:
        read.append(self.resolve())
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", recording)
    train.code_fingerprint()
    bench_dir = Path(__file__).resolve().parents[2] / "bench"
    assert read and any(p.name == "mixer.py" for p in read)
    assert not [p for p in read if bench_dir in p.parents or p.name.endswith("bench.py")]
