"""Artifact text and tables: what a person reads about a run."""

from __future__ import annotations

import dataclasses
import re

from flows.artifacts import (
    artifact_key,
    class_count_rows,
    class_table_description,
    drift_markdown,
    redact_uri,
    summary_markdown,
)
from flows.drift import PartitionStats, compare

SUMMARY = {
    "run_id": "run-1",
    "input_uri": "s3://images/incoming/",
    "output_uri": "s3://labels/mixer/date=2024-05-02/",
    "date": "2024-05-02",
    "model": "tiny",
    "model_sha256": "ab" * 32,
    "backend": "torch",
    "precision": "fp32",
    "images": 1200,
    "errors": 3,
    "seconds": 4.0,
    "images_per_s": 300.0,
    "shards_total": 4,
    "shards_done": 3,
    "shards_skipped": 1,
    "shards_failed": 0,
    "failed_shards": [],
    "failed_files": [],
    "class_counts": {"cat": 700, "dog": 497},
}


def test_artifact_keys_are_valid_prefect_keys_and_differ_per_output():
    a = artifact_key("labeling-summary", "s3://Labels/mixer/")
    b = artifact_key("labeling-summary", "/tmp/out dir/labels")
    assert re.fullmatch(r"[a-z0-9-]+", a) and re.fullmatch(r"[a-z0-9-]+", b)
    assert a == "labeling-summary-s3-labels-mixer" and a != b


def test_uris_lose_credentials():
    assert redact_uri("s3://AKIA:secret@bucket/x") == "s3://bucket/x"
    assert "secret" not in artifact_key("k", "s3://AKIA:secret@bucket/x")


def test_summary_names_counts_speed_model_backend_and_output():
    text = summary_markdown(SUMMARY, None)
    assert text.startswith("# Labeling run 2024-05-02: completed")
    for expected in (
        "| images | 1,200 |",
        "| errors | 3 (0.2%) |",
        "| images/s | 300.0 |",
        "3 labeled, 1 skipped (already done), 0 failed",
        "`" + "ab" * 32 + "`",
        "| backend | torch (fp32) |",
        "`s3://labels/mixer/date=2024-05-02/`",
    ):
        assert expected in text, expected
    assert "DRIFT" not in text
    # Every table's header row names its columns: no empty header cells.
    lines = text.splitlines()
    header_rows = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("|---")]
    assert header_rows and all("| |" not in row and "||" not in row for row in header_rows)
    assert "Failed files" not in text


def test_summary_shows_actors_and_nodes_over_time():
    history = [
        {"t_s": 0.0, "actors": 0, "nodes": 0},
        {"t_s": 4.2, "actors": 1, "nodes": 1},
        {"t_s": 31.0, "actors": 3, "nodes": 2},
        {"t_s": 95.5, "actors": 1, "nodes": 1},
    ]
    nodes = {"aa" * 28: 10, "bb" * 28: 5}
    text = summary_markdown({**SUMMARY, "actors": 3, "nodes": nodes, "pool_history": history})
    assert "| actors | 3 at most, on 2 node(s) |" in text
    assert "| nodes that labeled | 2 |" in text
    assert "## Actors and nodes over time" in text
    assert "| 31.0 s | 3 | 2 |" in text and "| 95.5 s | 1 | 1 |" in text
    # A summary from before the pool history (or a pool that never changed) has no table.
    assert "over time" not in summary_markdown(SUMMARY)
    churn = [{"t_s": float(t), "actors": t % 3, "nodes": t % 3} for t in range(50)]
    text = summary_markdown({**SUMMARY, "pool_history": churn})
    assert "| (30 changes) | | |" in text and "| 49.0 s | 1 | 1 |" in text
    assert "| 10.0 s |" not in text


def test_summary_names_the_first_failed_files_with_their_reasons():
    failed = [
        {"file": f"img-{i:04d}.jpg", "shard": "train-000001", "error": "truncated JPEG"}
        for i in range(20)
    ]
    text = summary_markdown({**SUMMARY, "errors": 53, "failed_files": failed})
    assert "## Failed files (first 20 of 53)" in text
    assert "- `img-0000.jpg` in `train-000001`: truncated JPEG" in text
    assert "- `img-0019.jpg` in `train-000001`: truncated JPEG" in text
    few = summary_markdown({**SUMMARY, "errors": 2, "failed_files": failed[:2]})
    assert "## Failed files (2)" in few and "img-0002" not in few


def test_summary_lists_failed_shards_and_puts_drift_warnings_at_the_top():
    failed = {
        **SUMMARY,
        "shards_failed": 1,
        "failed_shards": [{"shard": "train-000002", "error": "truncated"}],
    }
    drift = compare(
        PartitionStats("2024-05-02", {"cat": 95, "dog": 5}, 0.5),
        PartitionStats("2024-05-01", {"cat": 5, "dog": 95}, 0.9),
    )
    text = summary_markdown(failed, drift)
    lines = text.splitlines()
    assert "1 shard(s) failed" in lines[0]
    assert lines[2].startswith("> **⚠️ DRIFT WARNING:** class distribution drifted")
    assert lines[3].startswith("> **⚠️ DRIFT WARNING:** mean score moved -0.400")
    assert "- `train-000002`: truncated" in text
    assert "## Drift against 2024-05-01" in text


def test_drift_section_without_history_says_so():
    drift = compare(PartitionStats("2024-05-02", {"cat": 1}, 0.5), None)
    assert "No earlier partition" in drift_markdown(drift)


def test_drift_section_of_a_stable_night_shows_psi_and_scores():
    drift = compare(
        PartitionStats("d2", {"cat": 50, "dog": 50}, 0.80),
        PartitionStats("d1", {"cat": 50, "dog": 50}, 0.79),
    )
    text = drift_markdown(drift)
    assert "| class PSI | 0.0000 |" in text
    assert "| mean score | 0.8000 | 0.7900 | +0.0100 |" in text
    assert text.rstrip().endswith("Within thresholds.")


def test_drift_section_ends_with_the_trend_of_the_last_nights():
    history = (
        PartitionStats("2024-05-02", {"cat": 90, "dog": 10}, 0.6, errors=2),
        PartitionStats("2024-05-01", {"cat": 50, "dog": 50}, 0.8),
    )
    drift = dataclasses.replace(compare(history[0], history[1]), history=history)
    lines = drift_markdown(drift).splitlines()
    start = lines.index("### Last 2 night(s)")
    assert lines[start + 2] == (
        "| night | images | error % | mean score | PSI against the night before |"
    )
    assert lines[start + 4].startswith("| 2024-05-02 | 102 | 1.96 | 0.6000 | 0.")
    assert lines[start + 5] == "| 2024-05-01 | 100 | 0.00 | 0.8000 | - |"
    # The first night has no earlier one, and still shows its trend row.
    first = drift_markdown(dataclasses.replace(compare(history[0], None), history=history[:1]))
    assert "No earlier partition" in first and "| 2024-05-02 | 102 |" in first


def test_class_count_rows_most_frequent_first_with_shares():
    rows = class_count_rows({"b": 1, "a": 3})
    empty = {"previous_share": None, "change_points": None}
    assert rows == [
        {"class": "a", "count": 3, "share": 0.75, **empty},
        {"class": "b", "count": 1, "share": 0.25, **empty},
    ]
    assert class_count_rows({}) == []


def test_class_table_title_names_the_night_its_previous_share_is_from():
    current, previous = PartitionStats("d2", {"a": 1}, 0.5), PartitionStats("d1", {"a": 2}, 0.5)
    assert "share on d1 (previous_share)" in class_table_description(
        "d2", compare(current, previous)
    )
    assert "no earlier night" in class_table_description("d2", compare(current, None))
    assert "no earlier night" in class_table_description("d2", None)


def test_shard_progress_throttles_but_always_reports_the_end_and_logs_each_shard(
    prefect_server,
):
    import logging

    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.artifacts import ShardProgress
    from pipeline.progress import ProgressTracker
    from pipeline.runspec import ShardResult
    from pipeline.shards import Shard

    def progress_artifact(artifact_id):
        with get_client(sync_client=True) as client:
            (artifact,) = [a for a in client.read_artifacts() if a.id == artifact_id]
        return artifact

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("test-shard-progress")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    shards = [
        Shard(f"in#s{i}", f"s{i}", "e", 4000, "images", tuple(f"{i}-{j}.jpg" for j in range(4)))
        for i in range(3)
    ]

    @flow
    def three_shards() -> list:
        progress = ShardProgress(3, "s3://labels/progress-test", logger, min_interval_s=600)
        tracker = ProgressTracker([progress])
        seen = [progress_artifact(progress.artifact_id)]
        for shard in shards:
            tracker.listed(shard, skipped=shard is shards[0])
        tracker.listing_done()
        tracker.finished(ShardResult(shards[0], "o", skipped=True))
        tracker.finished(ShardResult(shards[1], "o", failed=True, error="gone"))
        # The first update went through; the second fell inside the interval.
        seen.append(progress_artifact(progress.artifact_id))
        tracker.finished(ShardResult(shards[2], "o", images=4, errors=1, started_at=1.0))
        tracker.end()
        return [*seen, progress_artifact(progress.artifact_id)]

    start, first, last = three_shards()
    assert float(start.data) == 0.0 and start.description == "starting: 3 shards planned"
    assert first.description.startswith("0/8 images, 1/3 shards (1 already done)")
    assert float(last.data) == 100.0
    # The failed shard left the image total: a finished run ends at 100%.
    assert last.description.startswith("4/4 images, 3/3 shards (1 already done), 1 failed")
    assert "1 error," in last.description and last.description.endswith("ETA 0 s")
    assert handler.lines[0] == "WARNING shard 1/2: FAILED s1: gone"
    assert re.fullmatch(r"INFO shard 2/2: 4 images, 1 error, [\d,]+ img/s \(s2\)", handler.lines[1])
    assert len(handler.lines) == 2  # the skipped shard is counted, not logged


def test_summary_says_what_auto_chose_and_the_measurements():
    auto = {
        "chose": "torch int8",
        "source": "measured",
        "candidates": [
            {
                "backend": "torch",
                "precision": "fp32",
                "images_per_s": 10.0,
                "top1_agreement": 1.0,
                "passed": True,
            },
            {
                "backend": "torch",
                "precision": "int8",
                "images_per_s": 17.5,
                "top1_agreement": 0.995,
                "passed": True,
            },
            {
                "backend": "torch",
                "precision": "bf16",
                "images_per_s": 30.0,
                "top1_agreement": 0.9,
                "passed": False,
            },
        ],
    }
    text = summary_markdown({**SUMMARY, "auto": auto}, None)
    row = next(line for line in text.splitlines() if line.startswith("| auto |"))
    assert "chose torch int8 (measured)" in row and "int8 17.5 img/s top-1 99.5%" in row
    assert "bf16 30.0 img/s top-1 90.0% (failed)" in row
    assert "| auto |" not in summary_markdown(SUMMARY, None)
