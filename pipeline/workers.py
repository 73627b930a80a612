"""The labeling worker: load the model once, label whole shards, write one Parquet per shard.

`ShardLabeler` is a plain class (tested without Ray); `actor_class()` wraps it as a Ray actor.
Inside a shard, reading and decoding run in a thread pool ahead of the model (decode_in_threads),
so the device does not wait for I/O; rows keep the shard's input order. With decode "device"
(pipeline.device_decode) the threads only download and check headers, and JPEGs are decoded
and preprocessed in batches on the predictor's device, one batch ahead of the model.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.runspec import FAILED_FILES_LISTED, ShardResult

if TYPE_CHECKING:
    from pipeline.writer import ShardTable


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor is told once, at creation; picklable, no credentials inside."""

    model: str  # checkpoint path, s3:// URI or preset name
    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    decode: str = "auto"  # auto, cpu (Pillow in threads), device (pipeline.device_decode)
    batch_size: int = 64
    topk: int = 5
    embeddings: bool = False
    image_column: str | None = None
    storage_options: object | None = None  # pipeline.storage.StorageOptions
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    decode_threads: int | None = None  # None: the pool picks from the actor's CPUs
    compile_cache: str | None = None  # shared prefix for compiled models (RunConfig)
    run_id: str = ""
    code_version: str = ""


def compile_cache_store(spec: WorkerSpec):
    """The cluster-wide store for compiled models named by `spec.compile_cache`, or None."""
    if not spec.compile_cache:
        return None
    from pipeline.engine_cache import StorageCacheStore

    return StorageCacheStore(spec.compile_cache, spec.storage_options)


class ShardLabeler:
    """Holds one predictor; `label_shard` turns a shard into its Parquet file."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from models.backends import create
        from pipeline.model_cache import local_model

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        # Created from the path, not a loaded model: create() then frees the fp32 weights once
        # converted (240 MB for B/16), and the predictor carries name, sha256, labels and
        # preprocessing. The run's batch size is the predictor's: a compiled graph has one shape.
        self.predictor = create(
            local_model(spec.model, spec.storage_options),
            spec.backend,
            spec.precision,
            spec.device,
            batch_size=spec.batch_size,
            threads=spec.threads,
            cache_store=compile_cache_store(spec),
        )
        from pipeline.device_decode import resolve_decode

        # Resolved here, once: a device decode that cannot work fails the actor's start (one
        # line, before any shard), not every shard.
        self.decode = resolve_decode(
            spec.decode, self.predictor.device, self.predictor.preprocessing
        )
        self._model_stream = (
            torch.cuda.Stream(self.predictor.device)
            if self.predictor.device.startswith("cuda")
            else None
        )
        self._storages: dict[str, object] = {}
        # A GPU actor labels two shards at once (see pipeline.pool); the model runs one batch
        # at a time while the other shard's images decode.
        self._predict_lock = threading.Lock()
        self.node_id = _ray_node_id()
        self.device_name = device_name(str(self.predictor.device))

    def ping(self) -> int:
        """The worker's process id, once the model is loaded (used as a liveness check)."""
        return os.getpid()

    def storage(self, uri: str):
        """One storage client per scheme, reused across shards (connection pools stay warm)."""
        from pipeline.storage import open_storage

        scheme = "s3" if uri.startswith("s3://") else "file"
        if scheme not in self._storages:
            self._storages[scheme] = open_storage(uri, self.spec.storage_options)
        return self._storages[scheme]

    def label_shard(self, shard, output_uri: str) -> ShardResult:
        """Label every image of `shard` and write `output_uri` atomically."""
        # Imported here: the hot loop (label_into) runs without pyarrow (bench/gpu_pipeline.py).
        from pipeline.writer import ShardTable, to_parquet_bytes

        started_at, start = time.time(), time.perf_counter()
        table = ShardTable(shard.name, self.predictor.label_names, self.spec.embeddings)
        timing = self.label_into(shard, table)
        metadata = file_metadata(self, shard)
        self.storage(output_uri).put_atomic(output_uri, to_parquet_bytes(table.to_table(metadata)))
        return ShardResult(
            shard=shard,
            output_uri=output_uri,
            images=len(table),
            errors=table.error_count(),
            failed_files=table.failed_files(FAILED_FILES_LISTED),
            seconds=time.perf_counter() - start,
            class_counts=table.class_counts(),
            backend=self.predictor.name,
            precision=self.predictor.precision,
            auto=self.predictor.auto_decision,
            model_seconds=timing.model_s,
            wait_seconds=timing.wait_s,
            started_at=started_at,
            worker_pid=os.getpid(),
            worker_node=self.node_id,
            worker_device=self.device_name,
        )

    def label_into(self, shard, table, decode: str | None = None) -> Timing:
        """The hot loop: read the shard's records, decode, run the model, add rows to `table`.

        table: a pipeline.writer.ShardTable, or anything with its `add_rows` and `embeddings`
        (bench/gpu_pipeline.py counts rows without pyarrow). decode: "cpu" or "device",
        default the mode resolved at start.
        """
        from pipeline.preprocess import ImageLimits, decode_in_threads
        from pipeline.shards import read_records

        decode_threads = self.spec.decode_threads or 2
        # Loose-image shards are latency-bound GETs: a few in flight per decode thread keep the
        # decoders fed; many more only add GIL contention next to the model.
        # Every read of the shard stops retrying at a deadline scaled from its size, so a shard
        # whose storage stalls fails (and is retried elsewhere) instead of holding the run.
        deadline = time.monotonic() + shard_deadline_s(self.spec, shard)
        records = read_records(
            self.storage(shard.uri).with_deadline(deadline),
            shard,
            self.spec.image_column,
            fetch_threads=4 * decode_threads,
        )
        predictor = _Serialized(self.predictor, self._predict_lock)
        if (decode or self.decode) == "device":
            return self._label_on_device(records, predictor, table, decode_threads)
        decoded = decode_in_threads(
            records, self.predictor.preprocessing, decode_threads, ImageLimits()
        )
        return label_decoded(decoded, predictor, table, self.spec.batch_size, self.spec.topk)

    def _label_on_device(self, records, predictor, table, threads: int) -> Timing:
        """Threads download and check headers; one thread decodes batch k+1 on the device
        while this one runs batch k through the model (pipeline.device_decode)."""
        import functools

        from pipeline.background import background_map
        from pipeline.device_decode import DeviceBatcher, prepare
        from pipeline.preprocess import ImageLimits

        limits = ImageLimits()
        batcher = DeviceBatcher(self.predictor.preprocessing, self.predictor.device, limits)
        check = functools.partial(
            prepare, preprocessing=batcher.preprocessing, limits=limits, pin=batcher.cuda
        )
        batch_size = self.spec.batch_size
        prepared = background_map(check, records, threads, max(128, 2 * batch_size), "header")
        batches = background_map(
            batcher.build, batcher.windows(prepared, batch_size), 0, 2, "device-decode"
        )
        return label_batches(batches, predictor, table, self.spec.topk, self._model_stream)


def shard_deadline_s(spec: WorkerSpec, shard) -> float:
    """How long reading one shard may take, from its size and the storage retry policy."""
    from pipeline.storage import RetryPolicy

    policy = getattr(spec.storage_options, "retry", None) or RetryPolicy()
    return policy.shard_deadline_s(getattr(shard, "size", 0) or 0)


class _Serialized:
    """A predictor whose calls take a lock: one batch on the device at a time."""

    def __init__(self, predictor, lock: threading.Lock) -> None:
        self._predictor = predictor
        self._lock = lock

    def predict(self, batch):
        with self._lock:
            return self._predictor.predict(batch)

    def predict_with_features(self, batch):
        with self._lock:
            return self._predictor.predict_with_features(batch)


def _ray_node_id() -> str | None:
    """The Ray node this process runs on, or None outside Ray (plain tests, scripts)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside a worker the context may be incomplete; the id is optional
        return None


def file_metadata(labeler: ShardLabeler, shard) -> dict[str, str]:
    """The Parquet key-value metadata of one shard's file (see pipeline.writer.METADATA_KEYS)."""
    return {
        "model_name": labeler.predictor.model_name,
        "model_sha256": labeler.predictor.sha256,
        "backend": str(labeler.predictor.name),
        "precision": str(labeler.predictor.precision),
        "input_uri": shard.uri,
        "input_etag": shard.etag or "",
        "run_id": labeler.spec.run_id,
        "code_version": labeler.spec.code_version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "worker_node": labeler.node_id or "",
        "worker_device": labeler.device_name,
    }


def device_name(device: str) -> str:
    """What labeled a shard, for lineage: the GPU's name ("NVIDIA H200"), or the CPU's model."""
    from models.backends.hardware import cpu_info, gpu_info

    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        gpu = gpu_info(index)
        if gpu is not None:
            return gpu.name
    return cpu_info().model_name


@dataclass
class Timing:
    """Where a shard's time went: in the model, or waiting for decoded images."""

    model_s: float = 0.0
    wait_s: float = 0.0


def label_decoded(
    decoded: Iterable[tuple[object, np.ndarray | None, str | None]],
    predictor,
    table: ShardTable,
    batch_size: int,
    topk: int,
) -> Timing:
    """Run the model over decoded records in batches and add one row per record to `table`.

    `decoded` yields (Record, image or None, error or None) in input order. A window of records
    is flushed when it holds `batch_size` images, so error rows stay in place between the
    predictions around them. Returns the time spent in the model and waiting for input.
    """
    timing = Timing()
    window: list[tuple[object, np.ndarray | None, str | None]] = []
    images = 0
    iterator = iter(decoded)
    while True:
        start = time.perf_counter()
        item = next(iterator, None)
        timing.wait_s += time.perf_counter() - start
        if item is None:
            break
        window.append(item)
        images += item[1] is not None
        if images == batch_size:
            timing.model_s += _flush(window, predictor, table, topk)
            window, images = [], 0
    if window:
        timing.model_s += _flush(window, predictor, table, topk)
    return timing


def _flush(window, predictor, table: ShardTable, topk: int) -> float:
    keys = [record.key for record, _, _ in window]
    truth = [getattr(record, "label", None) for record, _, _ in window]
    errors = [_row_error(record, image, error) for record, image, error in window]
    arrays = [image for (_, image, _), e in zip(window, errors, strict=True) if e is None]
    start = time.perf_counter()
    top_labels, top_scores, features = predict_topk(predictor, arrays, topk, table.embeddings)
    seconds = time.perf_counter() - start
    table.add_rows(keys, errors, truth, top_labels, top_scores, features)
    return seconds


def _row_error(record, image: np.ndarray | None, error: str | None) -> str | None:
    if error is not None:
        return error
    if getattr(record, "error", None):
        return record.error
    if image is None:
        return "no image data"
    return None


def label_batches(batches, predictor, table: ShardTable, topk: int, stream=None) -> Timing:
    """Add the rows of device batches (pipeline.device_decode.DeviceBatch) to `table`.

    stream: the CUDA stream the model runs on; each batch is waited for by its event there, so
    the decode stream and the model stream overlap and only the logits come back to the host.
    """
    import contextlib

    import torch

    timing = Timing()
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        item = next(iterator, None)
        timing.wait_s += time.perf_counter() - start
        if item is None:
            return timing
        keys = [p.record.key for p in item.items]
        truth = [p.record.label for p in item.items]
        start = time.perf_counter()
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context:
            if item.event is not None:
                current = torch.cuda.current_stream(item.batch.device)
                current.wait_event(item.event)
                item.batch.record_stream(current)  # the allocator must not reuse it early
            labels, scores, features = predict_batch(predictor, item.batch, topk, table.embeddings)
        timing.model_s += time.perf_counter() - start
        table.add_rows(keys, item.errors, truth, labels, scores, features)


def predict_topk(
    predictor, arrays: list[np.ndarray], topk: int, embeddings: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Top-k class ids and softmax probabilities (and pooled features) for a list of images."""
    import torch

    if not arrays:
        return predict_batch(predictor, None, topk, embeddings)
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays), dtype=np.float32))
    return predict_batch(predictor, batch, topk, embeddings)


def predict_batch(
    predictor, batch, topk: int, embeddings: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """predict_topk for a ready (N, 3, S, S) float32 tensor on any device (None: no images)."""
    import torch

    if batch is None or len(batch) == 0:
        empty = np.zeros((0, topk), np.int32)
        return empty, empty.astype(np.float32), np.zeros((0, 0), np.float16) if embeddings else None
    features = None
    if embeddings:
        logits, feats = predictor.predict_with_features(batch)
        features = feats.float().cpu().numpy()
    else:
        logits = predictor.predict(batch)
    probs = torch.softmax(logits.float(), dim=1)
    scores, labels = probs.topk(min(topk, probs.shape[1]), dim=1)
    return labels.to(torch.int32).numpy(), scores.numpy(), features


def actor_class(max_restarts: int = 4):
    """`ShardLabeler` as a Ray actor class that Ray restarts when its process or node dies.

    max_task_retries stays 0: the driver resubmits a shard whose actor died, to whichever actor
    is alive, and counts the attempts per shard, so a shard that kills every worker it touches
    ends in failed_shards instead of being retried forever. It also means Ray fails a task
    sent to an unreachable actor at once (RayActorError) instead of holding it for a restart
    that may never come (a lost node, no room elsewhere).
    """
    import ray

    return ray.remote(max_restarts=max_restarts, max_task_retries=0)(ShardLabeler)
