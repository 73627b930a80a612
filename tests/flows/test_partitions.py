"""Reading a night's partition back for drift: counts and mean score of labeled rows only."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.partitions import (
    previous_in,
    previous_partition_stats,
    read_partition_stats,
    recent_partition_stats,
)
from pipeline.storage import LocalStorage


def write_shard(folder: Path, name: str, rows: list[tuple[str | None, float | None, str | None]]):
    folder.mkdir(parents=True, exist_ok=True)
    names, scores, errors = zip(*rows, strict=True)
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(len(rows))],
            "label_name": pa.array(names, pa.string()),
            "score": pa.array(scores, pa.float32()),
            "error": pa.array(errors, pa.string()),
        }
    )
    pq.write_table(table, folder / name)


def test_partition_stats_count_labeled_rows_and_skip_error_rows(tmp_path: Path):
    part = tmp_path / "date=2024-05-02"
    write_shard(part, "a.parquet", [("cat", 0.5, None), ("dog", 1.0, None), (None, None, "bad")])
    write_shard(part, "b.parquet", [("cat", 0.75, None)])
    (part / "_SUCCESS.json").write_text("{}")
    stats = read_partition_stats(LocalStorage(), str(tmp_path), "2024-05-02")
    assert stats.class_counts == {"cat": 2, "dog": 1}
    assert stats.mean_score == pytest.approx(0.75)
    assert stats.images == 3 and stats.date == "2024-05-02"
    assert stats.errors == 1 and stats.rows == 4


def test_a_missing_partition_reads_as_none(tmp_path: Path):
    assert read_partition_stats(LocalStorage(), str(tmp_path), "2024-05-02") is None


def test_previous_partition_bridges_skipped_nights_but_not_forever(tmp_path: Path):
    write_shard(tmp_path / "date=2024-04-28", "a.parquet", [("cat", 0.9, None)])
    write_shard(tmp_path / "date=2024-05-02", "a.parquet", [("dog", 0.9, None)])
    found = previous_partition_stats(LocalStorage(), str(tmp_path), "2024-05-02")
    assert found is not None and found.date == "2024-04-28"
    assert previous_partition_stats(LocalStorage(), str(tmp_path), "2024-05-02", 3) is None


def test_recent_partitions_newest_first_up_to_the_count_and_the_lookback(tmp_path: Path):
    for date in ("2024-04-01", "2024-04-20", "2024-04-29", "2024-05-01", "2024-05-02"):
        write_shard(tmp_path / f"date={date}", "a.parquet", [("cat", 0.5, None)])
    write_shard(tmp_path / "date=2024-04-30", "a.parquet", [(None, None, "truncated")])
    storage = LocalStorage()
    history = recent_partition_stats(storage, str(tmp_path), "2024-05-02", 3)
    assert [s.date for s in history] == ["2024-05-02", "2024-05-01", "2024-04-30"]
    assert history[2].images == 0 and history[2].errors == 1
    # 2024-04-01 lies outside the 28 days looked at.
    history = recent_partition_stats(storage, str(tmp_path), "2024-05-02")
    assert [s.date for s in history][-1] == "2024-04-20" and len(history) == 5
    # The previous night for drift is the latest earlier one with a labeled image.
    assert previous_in(history, "2024-05-02").date == "2024-05-01"
    assert previous_in(history[2:], "2024-05-02").date == "2024-04-29"
    assert previous_in(history[4:], "2024-05-02") is None  # 12 days back: beyond a week
