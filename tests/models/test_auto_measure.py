"""auto by measurement (models/backends/auto_measure.py): who wins, the cache, when it measures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.backends import auto_measure, create
from models.backends.auto import Choice, candidates
from models.backends.auto_measure import (
    Measurement,
    agreement,
    decide,
    decided_images,
    decision_facts,
    decision_key,
    pick,
)
from models.backends.cache import LocalCacheStore
from models.backends.hardware import CpuInfo, GpuInfo, Runtimes

EPYC_AVX2 = CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), "AVX2", 2)
ZEN4 = CpuInfo("AMD EPYC 9R14", frozenset({"avx2", "avx512_bf16", "avx512_vnni"}), "AVX512", 2)
XEON_AMX = CpuInfo("Xeon (SPR)", frozenset({"avx2", "amx_bf16", "amx_int8"}), "AVX512", 2)


def measured(precision: str, images_per_s: float, top1: float = 1.0, cosine: float = 1.0):
    return Measurement("torch", precision, images_per_s, top1, cosine)


class FakeMeasurer:
    """Injected timings and agreements; counts what it was asked to measure."""

    def __init__(self, table: dict[str, Measurement]) -> None:
        self.table, self.calls = table, []

    def __call__(self, choice: Choice):
        self.calls.append(choice.precision)
        return self.table[choice.precision], None


def cpu_candidates(cpu: CpuInfo = EPYC_AVX2) -> list[Choice]:
    return candidates("cpu", ("torch",), cpu, None, static_int8=False)


def facts(cpu: CpuInfo = EPYC_AVX2, sha256: str = "ab" * 32, batch: int = 16) -> dict:
    runtimes = Runtimes(torchao="0.18.0", compiler=True)
    return decision_facts("cpu", cpu, None, runtimes, sha256, batch, {"compile": "None"})


def test_the_fastest_passing_candidate_wins():
    fp32, int8 = measured("fp32", 10.0), measured("int8", 17.0, 0.995, 0.999)
    bf16 = measured("bf16", 14.0)
    assert pick([fp32, bf16, int8]) is int8


def test_a_candidate_failing_agreement_never_wins_however_fast():
    fp32 = measured("fp32", 10.0)
    low_top1 = measured("int8", 50.0, top1=0.98)
    low_cosine = measured("bf16", 40.0, cosine=0.95)
    broken = Measurement("torch", "fp16", 99.0, 1.0, 1.0, error="cannot build")
    assert pick([fp32, low_top1, low_cosine, broken]) is fp32
    assert pick([low_top1, broken]) is None


def test_decide_measures_caches_and_the_cached_decision_is_reused_without_measuring(tmp_path):
    local = LocalCacheStore(tmp_path / "auto")
    table = {"fp32": measured("fp32", 10.0), "int8": measured("int8", 16.0, 0.99, 0.995)}
    first = FakeMeasurer(table)
    decision, _ = decide(cpu_candidates(), facts(), local, None, first, "synthetic")
    assert first.calls == ["fp32", "int8"] and decision.source == "measured"
    assert (decision.backend, decision.precision) == ("torch", "int8")
    assert local.get(decision_key(facts())) is not None

    again = FakeMeasurer({})  # any measuring would fail: KeyError
    cached, predictor = decide(cpu_candidates(), facts(), local, None, again, "synthetic")
    assert again.calls == [] and predictor is None
    assert cached.source == "local" and cached.precision == "int8"
    assert [m.to_dict() for m in cached.measurements] == [m.to_dict() for m in table.values()]
    summary = cached.summary()
    assert summary["chose"] == "torch int8" and summary["candidates"][1]["images_per_s"] == 16.0


def test_another_worker_reads_the_decision_from_the_compile_cache(tmp_path):
    shared = LocalCacheStore(tmp_path / "s3-like")  # any CacheStore: the --compile-cache
    table = {"fp32": measured("fp32", 10.0), "int8": measured("int8", 12.0)}
    decide(
        cpu_candidates(),
        facts(),
        LocalCacheStore(tmp_path / "a"),
        shared,
        FakeMeasurer(table),
        "synthetic",
    )
    other = FakeMeasurer({})
    decision, _ = decide(
        cpu_candidates(), facts(), LocalCacheStore(tmp_path / "b"), shared, other, "synthetic"
    )
    assert decision.source == "store" and other.calls == []
    assert LocalCacheStore(tmp_path / "b").get(decision.key) is not None  # kept locally


@pytest.mark.parametrize(
    "change",
    [
        {"cpu": ZEN4},
        {"cpu": dataclasses.replace(EPYC_AVX2, cpus=4)},
        {"cpu": dataclasses.replace(EPYC_AVX2, isa_cap="AVX2")},
        {"sha256": "cd" * 32},
        {"batch": 32},
    ],
)
def test_a_different_machine_or_model_measures_again(tmp_path, change):
    local = LocalCacheStore(tmp_path / "auto")
    table = {p: measured(p, 10.0 + i) for i, p in enumerate(("fp32", "bf16", "int8"))}
    decide(cpu_candidates(), facts(), local, None, FakeMeasurer(table), "synthetic")
    other = facts(**change)
    assert decision_key(other) != decision_key(facts())
    measurer = FakeMeasurer(table)
    decision, _ = decide(
        cpu_candidates(change.get("cpu", EPYC_AVX2)), other, local, None, measurer, "synthetic"
    )
    assert measurer.calls and decision.source == "measured"


def test_candidates_are_what_the_hardware_runs_natively():
    def names(found):
        return [f"{c.backend} {c.precision}" for c in found]

    assert names(cpu_candidates(EPYC_AVX2)) == ["torch fp32", "torch int8"]  # bf16 emulated
    assert names(cpu_candidates(ZEN4)) == ["torch fp32", "torch bf16", "torch int8"]
    old = CpuInfo("old", frozenset({"sse4_2"}), "DEFAULT")
    assert names(cpu_candidates(old)) == ["torch fp32"]
    capped = dataclasses.replace(XEON_AMX, isa_cap="AVX512_CORE_VNNI")  # oneDNN without bf16
    assert "torch bf16" not in names(cpu_candidates(capped))
    h100 = GpuInfo("H100", (9, 0))
    gpu = candidates("cuda:0", ("torch", "tensorrt"), XEON_AMX, h100, False)
    assert names(gpu) == [
        "torch fp32",
        "torch fp16",
        "torch bf16",
        "torch fp8",
        "tensorrt fp16",
        "tensorrt bf16",
        "tensorrt fp8",
    ]
    a100 = candidates("cuda:0", ("torch",), XEON_AMX, GpuInfo("A100", (8, 0)), False)
    assert names(a100) == ["torch fp32", "torch fp16", "torch bf16"]  # fp8 needs cc >= 8.9
    t4 = candidates("cuda:0", ("torch",), XEON_AMX, GpuInfo("T4", (7, 5)), False)
    assert names(t4) == ["torch fp32", "torch fp16"]
    only = candidates("cuda:0", ("torch",), XEON_AMX, h100, False, runs={"torch": ("fp32",)})
    assert names(only) == ["torch fp32"]


def test_fp32_ties_are_not_disagreements():
    reference = torch.tensor([[5.0, 1.0, 0.0, -1.0], [2.0, 1.9999, -3.0, 0.0]])
    flipped_tie = torch.tensor([[5.0, 1.0, 0.0, -1.0], [1.9999, 2.0, -3.0, 0.0]])
    assert agreement(reference, flipped_tie)[0] == 1.0
    flipped_clear = torch.tensor([[1.0, 5.0, 0.0, -1.0], [2.0, 1.9999, -3.0, 0.0]])
    assert agreement(reference, flipped_clear)[0] == 0.5


def test_on_random_weights_no_label_is_decided_so_the_cosine_check_decides():
    # A random-weight preset: 1000 logits close together, every probability near 0.001.
    reference = 0.2 * torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    assert decided_images(reference) == 0
    noisy = reference + 0.01 * torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    top1, cosine = agreement(reference, noisy)
    assert (noisy.argmax(1) != reference.argmax(1)).any()  # plain argmax flips ...
    assert top1 == 1.0 and cosine > 0.99  # ... between classes fp32 did not decide between
    shuffled = reference[:, torch.randperm(1000, generator=torch.Generator().manual_seed(2))]
    assert not Measurement("torch", "int8", 1.0, *agreement(reference, shuffled)).passed
    # A decided image (one class well ahead) keeps its label strictly.
    decided = torch.zeros(1, 1000)
    decided[0, 3] = 8.0
    assert decided_images(decided) == 1
    assert agreement(decided, decided.roll(1, dims=1))[0] == 0.0


def test_a_trained_model_is_checked_on_the_real_images_beside_it(tmp_path):
    import shutil

    import numpy as np

    from tests.models.demo_model import CHECKPOINT, trained_demo

    _, images, _ = trained_demo()
    checkpoint = tmp_path / "model" / CHECKPOINT.name
    checkpoint.parent.mkdir()
    shutil.copy(CHECKPOINT, checkpoint)
    np.save(checkpoint.parent / "calibration.npy", images[::4].numpy().astype(np.float16))
    predictor = create(str(checkpoint), device="cpu", batch_size=8, cache_dir=tmp_path / "cache")
    decision = predictor.describe()["auto"]
    assert decision["calibration"] == "calibration.npy"
    ran = [c for c in decision["candidates"] if "error" not in c]
    # Real digits: the trained model decides nearly every one, so top-1 is checked strictly,
    # and a reduced precision still keeps its labels.
    assert all(c["decided_images"] >= 0.9 * len(images[::4]) for c in ran)
    reduced = [c for c in ran if c["precision"] != "fp32"]
    assert not reduced or any(c["passed"] for c in reduced), decision["candidates"]


def test_an_explicit_backend_or_precision_never_measures(tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measured although a backend or precision was given")

    monkeypatch.setattr(auto_measure, "decide", refuse)
    assert create(tiny, "torch", "fp32", "cpu").auto_decision is None
    assert create(tiny, "auto", "fp32", "cpu").precision == "fp32"
    explicit_backend = create(tiny, "torch", "auto", "cpu")
    assert explicit_backend.auto_decision is None and "auto" not in explicit_backend.describe()


def test_create_measures_once_then_reads_its_decision(tmp_path, monkeypatch):
    predictor = create("tiny", device="cpu", batch_size=8, cache_dir=tmp_path)
    decision = predictor.describe()["auto"]
    assert decision["source"] == "measured" and decision["calibration"].startswith("synthetic")
    measured_pairs = [(c["backend"], c["precision"]) for c in decision["candidates"]]
    assert measured_pairs[0] == ("torch", "fp32")
    assert decision["chose"] == f"{predictor.name} {predictor.precision}"
    chosen = next(
        c
        for c in decision["candidates"]
        if c["passed"] and (c["backend"], c["precision"]) == (predictor.name, predictor.precision)
    )
    assert all(
        chosen["images_per_s"] >= c["images_per_s"] for c in decision["candidates"] if c["passed"]
    )
    assert list((tmp_path / "auto").glob("auto-cpu-b8-*.json"))

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although the decision was cached")

    monkeypatch.setattr(auto_measure, "measurer", lambda *a, **k: refuse)
    again = create("tiny", device="cpu", batch_size=8, cache_dir=tmp_path)
    assert again.auto_decision["source"] == "local"
    assert (again.name, again.precision) == (predictor.name, predictor.precision)


class CountingPredictor:
    """A real predictor that records the size of every batch it is given."""

    def __init__(self, predictor) -> None:
        self.predictor, self.batches = predictor, []

    def predict(self, batch):
        self.batches.append(len(batch))
        return self.predictor.predict(batch)

    def __getattr__(self, name):
        return getattr(self.predictor, name)


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [
        (16, [16] * 6 + [4]),  # one pass over the check set: 5 timed batches after a warm-up
        (64, [64, 36, 64, 64, 64]),  # one full batch (the warm-up), then 3 more to time
        (128, [100, 128, 128, 128, 128]),  # no full batch: a warm-up and 3 timed
    ],
)
def test_the_check_pass_is_also_the_timing(tiny, batch_size, expected):
    from models.backends.auto_measure import measurer
    from models.backends.calibration import calibration_images

    images = calibration_images(tiny.config, 100, seed=7)
    counting = CountingPredictor(create(tiny, "torch", "fp32", "cpu", batch_size=batch_size))
    measure = measurer(tiny, images, batch_size, lambda choice: counting)
    result, predictor = measure(Choice("torch", "fp32", "cpu", "test"))
    assert counting.batches == expected
    assert predictor is counting and result.passed and result.images_per_s > 0
    assert result.check_s > 0 and result.build_s >= 0
    assert result.top1_agreement == 1.0 and result.decided_images is not None
