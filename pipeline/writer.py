"""One shard's predictions as a Parquet file: rows, schema, file metadata, footer reads.

The columns are the public data contract (`../shared/design.md`); error rows keep their key and
carry null prediction columns. File metadata says which model, backend and input made the file,
and is what resume reads back (from the footer alone) to decide that a shard is already done.
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Keys of the Parquet key-value metadata; values are strings.
METADATA_KEYS = (
    "model_name",
    "model_sha256",
    "backend",
    "precision",
    "input_uri",
    "input_etag",
    "run_id",
    "code_version",
    "created_at",
    "worker_node",  # the Ray node id (hex) of the actor that labeled the shard ("" outside Ray)
    "worker_device",  # the GPU's name, or the CPU's model
)

FOOTER_TAIL_BYTES = 64 * 1024  # one ranged read fetches the footer of any normal shard file


def output_schema(embedding_dim: int | None = None, true_label: bool = False) -> pa.Schema:
    """The Parquet schema; `embedding` only when asked for, `true_label` only with ground truth."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk_labels", pa.list_(pa.int32())),
        pa.field("topk_scores", pa.list_(pa.float32())),
    ]
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float16())))
    fields.append(pa.field("error", pa.string()))
    if true_label:
        fields.append(pa.field("true_label", pa.int32()))
    return pa.schema(fields)


class ShardTable:
    """Collects one shard's rows in input order, then builds the Arrow table in one go."""

    def __init__(self, shard_name: str, label_names: Sequence[str], embeddings: bool = False):
        self.shard_name = shard_name
        self.label_names = list(label_names)
        self.embeddings = embeddings
        self.keys: list[str] = []
        self.errors: list[str | None] = []
        self.true_labels: list[int | None] = []
        # Prediction arrays hold only the rows without an error, in order.
        self._top_labels: list[np.ndarray] = []
        self._top_scores: list[np.ndarray] = []
        self._features: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add_rows(
        self,
        keys: Sequence[str],
        errors: Sequence[str | None],
        true_labels: Sequence[int | None],
        top_labels: np.ndarray,
        top_scores: np.ndarray,
        features: np.ndarray | None = None,
    ) -> None:
        """Append rows; prediction arrays (rows, k) cover exactly the rows whose error is None."""
        if not len(keys) == len(errors) == len(true_labels):
            raise ValueError("keys, errors and true_labels differ in length")
        ok = sum(error is None for error in errors)
        if len(top_labels) != ok or len(top_scores) != ok:
            raise ValueError(f"{len(top_labels)} predictions for {ok} rows without an error")
        if self.embeddings and (features is None or len(features) != ok):
            raise ValueError("embeddings asked for but features missing for some rows")
        self.keys.extend(keys)
        self.errors.extend(errors)
        self.true_labels.extend(true_labels)
        if ok:
            self._top_labels.append(np.asarray(top_labels, dtype=np.int32))
            self._top_scores.append(np.asarray(top_scores, dtype=np.float32))
            if self.embeddings:
                self._features.append(np.asarray(features, dtype=np.float16))

    def error_count(self) -> int:
        return sum(error is not None for error in self.errors)

    def failed_files(self, limit: int) -> list[dict[str, str]]:
        """The first `limit` error rows as {"file", "shard", "error"}, in input order."""
        failed = (
            {"file": key, "shard": self.shard_name, "error": error}
            for key, error in zip(self.keys, self.errors, strict=True)
            if error is not None
        )
        return list(itertools.islice(failed, limit))

    def class_counts(self) -> dict[str, int]:
        """Top-1 label name → rows, for the run summary."""
        if not self._top_labels:
            return {}
        labels = np.concatenate([t[:, 0] for t in self._top_labels])
        values, counts = np.unique(labels, return_counts=True)
        return {self.label_names[v]: int(c) for v, c in zip(values, counts, strict=True)}

    def to_table(self, metadata: Mapping[str, str] | None = None) -> pa.Table:
        """The Arrow table with the contract's schema and the given file metadata."""
        n = len(self.keys)
        valid = np.array([error is None for error in self.errors], dtype=bool)
        k = self._top_labels[0].shape[1] if self._top_labels else 1
        top_labels = _scatter(self._top_labels, valid, (k,), np.int32)
        top_scores = _scatter(self._top_scores, valid, (k,), np.float32)
        nulls = pa.array(~valid) if n else None
        label = top_labels[:, 0] if n else np.zeros(0, np.int32)
        columns: dict[str, pa.Array] = {
            "key": pa.array(self.keys, pa.string()),
            "shard": pa.array([self.shard_name] * n, pa.string()),
            "label": pa.array(label, pa.int32(), mask=~valid),
            "label_name": pa.array(
                [self.label_names[v] if ok else None for v, ok in zip(label, valid, strict=True)],
                pa.string(),
            ),
            "score": pa.array(top_scores[:, 0] if n else [], pa.float32(), mask=~valid),
            "topk_labels": _lists(top_labels, nulls),
            "topk_scores": _lists(top_scores, nulls),
        }
        embedding_dim = None
        if self.embeddings:
            embedding_dim = self._features[0].shape[1] if self._features else 0
            features = _scatter(self._features, valid, (embedding_dim,), np.float16)
            columns["embedding"] = _lists(features, nulls)
        columns["error"] = pa.array(self.errors, pa.string())
        has_truth = any(label is not None for label in self.true_labels)
        if has_truth:
            columns["true_label"] = pa.array(self.true_labels, pa.int32())
        schema = output_schema(embedding_dim, has_truth)
        table = pa.Table.from_pydict(columns, schema=schema)
        return table.replace_schema_metadata(dict(metadata or {}))


def _scatter(
    chunks: list[np.ndarray], valid: np.ndarray, tail: tuple[int, ...], dtype
) -> np.ndarray:
    """Rows for every input row: predictions where valid, zeros (masked as null later) elsewhere."""
    out = np.zeros((len(valid), *tail), dtype=dtype)
    if chunks:
        out[valid] = np.concatenate(chunks)
    return out


def _lists(values: np.ndarray, nulls: pa.Array | None) -> pa.Array:
    """A 2-D array as a list<...> column, with null lists where `nulls` is true."""
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    flat = pa.array(values.reshape(-1))
    return pa.ListArray.from_arrays(offsets, flat, mask=nulls)


def to_parquet_bytes(table: pa.Table) -> bytes:
    """The whole file in memory, for one atomic PUT (a shard's predictions are small)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def parse_footer_metadata(tail: bytes) -> dict[str, str] | None:
    """Key-value metadata from the last bytes of a Parquet file; None if the tail is too short.

    Raises ValueError when the bytes are not the end of a Parquet file.
    """
    if tail[-4:] != b"PAR1":
        raise ValueError("not a Parquet file (no PAR1 magic at the end)")
    if len(tail) < 8:
        return None
    (footer_len,) = struct.unpack("<I", tail[-8:-4])
    if footer_len + 8 > len(tail):
        return None
    # The footer never points into the data pages for reading metadata, so magic + footer is a
    # valid-enough file for pyarrow's metadata reader.
    footer = b"PAR1" + tail[-(footer_len + 8) :]
    metadata = pq.read_metadata(pa.BufferReader(footer)).metadata or {}
    return {
        k.decode(): v.decode(errors="replace")
        for k, v in metadata.items()
        if not k.startswith(b"ARROW:")
    }


def footer_length(tail: bytes) -> int:
    """Bytes the footer plus its 8-byte trailer take at the end of the file."""
    (footer_len,) = struct.unpack("<I", tail[-8:-4])
    return footer_len + 8


def read_file_metadata(storage, uri: str, size: int) -> dict[str, str]:
    """The key-value metadata of a Parquet object, from ranged reads of its tail only."""
    tail = storage.get(uri, start=max(0, size - FOOTER_TAIL_BYTES))
    metadata = parse_footer_metadata(tail)
    if metadata is None:  # a footer larger than the first read: fetch exactly what it needs
        tail = storage.get(uri, start=max(0, size - footer_length(tail)))
        metadata = parse_footer_metadata(tail)
    if metadata is None:
        raise ValueError(f"{uri}: Parquet footer is longer than the file")
    return metadata
