"""pipeline.writer: the Parquet contract (columns, types, nulls, metadata) and footer reads."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.writer import (
    FOOTER_TAIL_BYTES,
    ShardTable,
    output_schema,
    parse_footer_metadata,
    read_file_metadata,
    to_parquet_bytes,
)

LABELS = ["cat", "dog", "eel"]
METADATA = {"model_name": "tiny", "model_sha256": "ab" * 32, "input_etag": "e1", "run_id": "r"}


def _table(embeddings: bool = False) -> ShardTable:
    table = ShardTable("shard-000001", LABELS, embeddings=embeddings)
    features = np.arange(8, dtype=np.float32).reshape(2, 4) if embeddings else None
    # Rows in input order: ok, error, ok.
    table.add_rows(
        ["a", "b", "c"],
        [None, "truncated image", None],
        [1, 0, None],
        np.array([[1, 0], [2, 1]]),
        np.array([[0.7, 0.2], [0.6, 0.3]]),
        features,
    )
    return table


def test_columns_types_and_error_rows() -> None:
    table = _table().to_table(METADATA)
    assert table.column_names == [
        "key",
        "shard",
        "label",
        "label_name",
        "score",
        "topk_labels",
        "topk_scores",
        "error",
        "true_label",
    ]
    assert table.schema.field("label").type == pa.int32()
    assert table.schema.field("score").type == pa.float32()
    assert table.schema.field("topk_labels").type == pa.list_(pa.int32())
    assert table.schema.field("topk_scores").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["label"] == 1 and rows[0]["label_name"] == "dog"
    assert rows[0]["topk_labels"] == [1, 0]
    assert rows[0]["score"] == pytest.approx(0.7)
    assert rows[2]["label_name"] == "eel" and rows[2]["error"] is None
    # An error row keeps its key and carries nulls, never a made-up prediction.
    assert rows[1]["error"] == "truncated image"
    assert rows[1]["label"] is None and rows[1]["score"] is None
    assert rows[1]["topk_labels"] is None and rows[1]["label_name"] is None
    assert [r["true_label"] for r in rows] == [1, 0, None]
    assert all(r["shard"] == "shard-000001" for r in rows)


def test_embeddings_are_float16_lists_and_true_label_only_with_ground_truth() -> None:
    table = ShardTable("s", LABELS, embeddings=True)
    table.add_rows(["x"], [None], [None], np.array([[2]]), np.array([[0.9]]), np.ones((1, 4)))
    arrow = table.to_table()
    assert arrow.schema.field("embedding").type == pa.list_(pa.float16())
    assert "true_label" not in arrow.column_names
    assert arrow.column("embedding").to_pylist() == [[1.0, 1.0, 1.0, 1.0]]
    with_errors = _table(embeddings=True).to_table()
    assert with_errors.column("embedding").to_pylist()[1] is None


def test_class_counts_and_error_count() -> None:
    table = _table()
    assert table.class_counts() == {"dog": 1, "eel": 1}
    assert table.error_count() == 1
    assert len(table) == 3


def test_failed_files_name_the_first_error_rows_in_input_order() -> None:
    table = ShardTable("shard-000002", LABELS)
    errors = [None, "truncated", None, "not an image", "too large"]
    top = np.zeros((2, 1))
    table.add_rows(list("abcde"), errors, [None] * 5, top, top)
    assert table.failed_files(2) == [
        {"file": "b", "shard": "shard-000002", "error": "truncated"},
        {"file": "d", "shard": "shard-000002", "error": "not an image"},
    ]
    assert len(table.failed_files(20)) == 3


def test_rejects_predictions_that_do_not_match_rows() -> None:
    table = ShardTable("s", LABELS)
    with pytest.raises(ValueError, match="2 predictions for 1 rows"):
        table.add_rows(["a", "b"], [None, "bad"], [None, None], np.zeros((2, 1)), np.zeros((2, 1)))


def test_empty_and_all_error_shards_still_write_valid_files() -> None:
    empty = pq.read_table(io.BytesIO(to_parquet_bytes(ShardTable("s", LABELS).to_table())))
    assert empty.num_rows == 0
    assert empty.schema.equals(output_schema(), check_metadata=False)
    errors = ShardTable("s", LABELS)
    errors.add_rows(["a"], ["empty file"], [None], np.zeros((0, 5)), np.zeros((0, 5)))
    rows = pq.read_table(io.BytesIO(to_parquet_bytes(errors.to_table()))).to_pylist()
    assert rows == [
        {
            "key": "a",
            "shard": "s",
            "label": None,
            "label_name": None,
            "score": None,
            "topk_labels": None,
            "topk_scores": None,
            "error": "empty file",
        }
    ]


def test_metadata_round_trips_through_the_footer_alone() -> None:
    data = to_parquet_bytes(_table().to_table(METADATA))
    assert parse_footer_metadata(data[-4096:]) == METADATA
    assert pq.read_metadata(io.BytesIO(data)).metadata[b"model_name"] == b"tiny"
    assert parse_footer_metadata(data[-10:]) is None  # too short: the caller reads more
    with pytest.raises(ValueError, match="not a Parquet file"):
        parse_footer_metadata(b"hello world, not parquet")


def test_read_file_metadata_uses_ranged_reads_only(tmp_path) -> None:
    from pipeline.storage import open_storage

    # A footer larger than the first ranged read forces the second, exact-size read.
    big = {**METADATA, "padding": "x" * (FOOTER_TAIL_BYTES + 10)}
    data = to_parquet_bytes(_table().to_table(big))
    path = str(tmp_path / "part.parquet")
    storage = open_storage(path)
    storage.put_atomic(path, data)

    class CountingStorage:
        def __init__(self) -> None:
            self.ranges: list[tuple[int | None, int | None]] = []

        def get(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
            self.ranges.append((start, end))
            return storage.get(uri, start, end)

    counting = CountingStorage()
    assert read_file_metadata(counting, path, len(data)) == big
    assert len(counting.ranges) == 2 and all(start > 0 for start, _ in counting.ranges)
