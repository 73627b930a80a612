"""pipeline.runspec: how shard results fold into the run summary."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.runspec import FAILED_FILES_LISTED, RunSummary, ShardResult


def _summary() -> RunSummary:
    return RunSummary("run", "in", "out", "2024-05-01", "tiny", "ab" * 32)


def _shard(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)


def test_a_rerun_that_skips_everything_reports_the_backend_of_the_outputs_found():
    summary = _summary()
    for name in ("s0", "s1"):
        summary.add(
            ShardResult(
                _shard(name), f"{name}.parquet", skipped=True, backend="torch", precision="fp32"
            )
        )
    assert (summary.backend, summary.precision) == ("torch", "fp32")
    assert summary.to_dict()["backend"] == "torch"


def test_a_labeled_shard_names_the_backend_even_after_skipped_ones_of_another():
    summary = _summary()
    summary.add(ShardResult(_shard("s0"), "s0.parquet", skipped=True, backend="onnxruntime"))
    summary.add(
        ShardResult(_shard("s1"), "s1.parquet", images=3, backend="torch", precision="bf16")
    )
    summary.add(ShardResult(_shard("s2"), "s2.parquet", skipped=True, backend="onnxruntime"))
    assert (summary.backend, summary.precision) == ("torch", "bf16")


def test_failed_files_are_capped_across_shards():
    summary = _summary()
    for i in range(3):
        failed = [{"file": f"{i}-{j}", "shard": f"s{i}", "error": "bad"} for j in range(15)]
        summary.add(ShardResult(_shard(f"s{i}"), "x", images=15, errors=15, failed_files=failed))
    assert summary.errors == 45
    assert len(summary.failed_files) == FAILED_FILES_LISTED == 20
    assert summary.failed_files[15] == {"file": "1-0", "shard": "s1", "error": "bad"}
