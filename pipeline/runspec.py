"""What a labeling run is asked to do (RunConfig) and what it reports (ShardResult, RunSummary).

Plain dataclasses with no Ray or S3 inside, so the driver, the actors and the CLI share them and
they pickle cheaply. `pipeline.run` re-exports them; callers import them from there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.settings import SettingError, check_at_least, check_one_of

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
FAILED_FILES_LISTED = 20  # failed images a summary names (the Parquet error rows hold all)


class RunError(Exception):
    """A run that cannot start; the message names the model, URI or setting that is wrong."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; defaults that work on one machine."""

    input_uri: str
    output_uri: str
    model: str  # checkpoint path, s3:// URI of one, or a preset name ("B/16")
    backend: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    ray_address: str | None = None
    actors: int | None = None  # a fixed pool of this many; None: elastic (min/max_actors)
    # The elastic pool's bounds. min_actors (None: 1) is the floor of the resource request and
    # of the idle actors stopped at the end; max_actors (None: no bound, and no request to the
    # autoscaler) caps the actors and what the run asks the autoscaler for.
    min_actors: int | None = None
    max_actors: int | None = None
    # What an elastic pool's actors run on: "gpu" (one per GPU; the autoscaler is asked for GPUs
    # even before a GPU node has joined), "cpu" (one per node, GPUs unused), or "auto" (GPUs
    # once the cluster has any, else CPU nodes).
    actor_device: str = "auto"
    # The output partition; None: today (UTC), read once when the config is made, so every
    # file of the run (Parquet and _SUCCESS.json) lands in one partition even past midnight.
    date: str | dt.date | None = None
    force: bool = False
    s3_endpoint_url: str | None = None
    images_per_shard: int = 1000
    image_column: str | None = None
    topk: int = 5
    embeddings: bool = False
    # A shard is tried this many times (actor crash, lost node, read error) before it is
    # reported in failed_shards; the other shards finish either way.
    max_attempts: int = 3
    decode_threads: int | None = None  # per actor; None: from the actor's CPUs
    # auto, cpu (Pillow in threads) or device (batched JPEG decode on the predictor's device,
    # pipeline.device_decode); auto picks device where the predictor is on CUDA.
    decode: str = "auto"
    # s3:// prefix or folder every node can reach: compiled models (CPU AOT packages,
    # TensorRT engines) are built once for the cluster there; None: per node, locally.
    compile_cache: str | None = None
    # How long one storage call keeps retrying throttling, 5xx, resets and stalls before the
    # shard fails (and is retried elsewhere); see pipeline/storage/retry.py.
    storage_retry_s: float = 60.0

    def __post_init__(self) -> None:
        # Names and numbers are checked here, on construction, with nothing heavy imported:
        # a wrong value fails before Ray, torch or any storage is touched.
        from models.names import BACKENDS, PRECISIONS

        check_one_of("backend", self.backend, ("auto", *BACKENDS))
        check_one_of("precision", self.precision, ("auto", *PRECISIONS))
        check_one_of("decode", self.decode, ("auto", "cpu", "device"))
        if self.actor_device not in ("auto", "cpu", "gpu"):
            raise SettingError(
                "actor_device", f"must be auto, cpu or gpu, not {self.actor_device!r}"
            )
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("actors", self.actors, 1, optional=True)
        if self.actors is not None and (self.min_actors, self.max_actors) != (None, None):
            raise SettingError(
                "actors",
                "is a fixed pool size; min_actors/max_actors bound an elastic one: "
                "give one or the other",
            )
        check_at_least("min_actors", self.min_actors, 0, optional=True)
        if self.max_actors is not None and self.max_actors < max(1, self.min_actors or 0):
            raise SettingError(
                "max_actors", f"must be at least 1 and at least min_actors, not {self.max_actors}"
            )
        check_at_least("topk", self.topk, 1)
        check_at_least("images_per_shard", self.images_per_shard, 1)
        check_at_least("max_attempts", self.max_attempts, 1)
        check_at_least("decode_threads", self.decode_threads, 1, optional=True)
        if not self.model or not str(self.model).strip():
            raise SettingError("model", "is empty (a checkpoint file, an s3:// URI or a preset)")
        if self.decode == "device":
            # Before any work: without torchvision every actor would fail at start.
            from pipeline.device_decode import torchvision_problem

            problem = torchvision_problem()
            if problem:
                raise SettingError("decode", problem.removeprefix("decode="))
        if self.storage_retry_s <= 0:
            raise SettingError("storage_retry_s", f"must be positive, not {self.storage_retry_s}")
        self._check_uris()
        if self.date is None:  # resolved once: the clock is read here and never again
            today = dt.datetime.now(dt.timezone.utc).date().isoformat()
            object.__setattr__(self, "date", today)
        self.partition_date()  # fail on a bad date now, not after the actors started

    def _check_uris(self) -> None:
        """Refuse (redacted) any URI that carries a credential: it would be printed and stored."""
        from pipeline.storage.errors import StorageError
        from pipeline.storage.uris import check_uri

        named = [("input", self.input_uri), ("output", self.output_uri)]
        if "://" in self.model:
            named.append(("model", self.model))
        if self.compile_cache:
            named.append(("compile cache", self.compile_cache))
        if self.s3_endpoint_url:
            named.append(("S3 endpoint", self.s3_endpoint_url))
        for what, uri in named:
            try:
                check_uri(uri, what)
            except StorageError as err:
                raise SettingError(what, str(err), names_itself=True) from None

    def partition_date(self) -> str:
        """The `date=` partition as YYYY-MM-DD (fixed when the config was made)."""
        if isinstance(self.date, dt.date):
            return self.date.isoformat()
        if not _DATE.match(self.date):
            raise SettingError("date", f"must look like YYYY-MM-DD, not {self.date!r}")
        try:
            dt.date.fromisoformat(self.date)  # rejects 2024-02-31
        except ValueError as err:
            raise SettingError("date", f"{self.date!r} is not a calendar date: {err}") from None
        return self.date

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class ShardResult:
    """The outcome of one shard: labeled, skipped (already done) or failed."""

    shard: Any  # pipeline.shards.Shard
    output_uri: str
    images: int = 0
    errors: int = 0  # error rows (images that could not be labeled), not a failed shard
    # The first error rows: {"file": key, "shard": name, "error": reason}
    failed_files: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    class_counts: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    failed: bool = False
    error: str | None = None  # why the shard failed (or was skipped)
    backend: str | None = None
    precision: str | None = None
    auto: dict[str, Any] | None = None  # the predictor's auto_decision, when auto measured
    attempts: int = 1
    model_seconds: float = 0.0  # inside the predictor
    wait_seconds: float = 0.0  # the model loop waiting for downloaded, decoded images
    started_at: float | None = None  # epoch seconds when the worker began the shard
    worker_pid: int | None = None  # the process that labeled it (debugging, fault tests)
    worker_node: str | None = None  # its Ray node id, when it ran under Ray
    worker_device: str | None = None  # the GPU's name, or the CPU's model


@dataclass
class RunSummary:
    """What a run did; printed at the end and written as `_SUCCESS.json`."""

    run_id: str
    input_uri: str
    output_uri: str  # the root given to the run
    date: str
    model: str
    model_sha256: str
    backend: str | None = None
    precision: str | None = None
    auto: dict[str, Any] | None = None  # how auto chose the backend (Predictor.auto_decision)
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    failed_shards: list[dict[str, str]] = field(default_factory=list)
    failed_files: list[dict[str, str]] = field(default_factory=list)  # the first error rows
    class_counts: dict[str, int] = field(default_factory=dict)
    partition_uri: str = ""  # output_uri/date=YYYY-MM-DD, where the Parquet files are
    actors: int = 0  # the most actors alive at once
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id (hex) -> shards labeled
    # How the pool changed: {"t_s": seconds into labeling, "actors": alive, "nodes": theirs}.
    pool_history: list[dict[str, float]] = field(default_factory=list)
    # Summed over shards (all actors): wait_seconds near 0 means the model never starved.
    shard_seconds: float = 0.0
    model_seconds: float = 0.0
    wait_seconds: float = 0.0
    first_shard_started_s: float | None = None  # from the start of the run

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.shards_failed == 0

    def add(self, result: ShardResult) -> None:
        """Fold one shard's result into the totals."""
        if result.skipped:
            self.shards_skipped += 1
            if not self.shards_done:  # until a shard is labeled: what made the outputs found
                self.backend = self.backend or result.backend
                self.precision = self.precision or result.precision
            return
        if result.failed:
            self.shards_failed += 1
            self.failed_shards.append({"shard": result.shard.name, "error": result.error or ""})
            return
        if not self.shards_done:  # the backend of this run, not of the outputs it found
            self.backend, self.precision = result.backend, result.precision
            self.auto = result.auto
        self.shards_done += 1
        if result.worker_node:
            self.nodes[result.worker_node] = self.nodes.get(result.worker_node, 0) + 1
        self.images += result.images
        self.shard_seconds += result.seconds
        self.model_seconds += result.model_seconds
        self.wait_seconds += result.wait_seconds
        self.errors += result.errors
        room = FAILED_FILES_LISTED - len(self.failed_files)
        self.failed_files.extend(result.failed_files[: max(0, room)])
        for name, count in result.class_counts.items():
            self.class_counts[name] = self.class_counts.get(name, 0) + count

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["images_per_s"] = round(self.images_per_s, 3)
        for key in ("seconds", "shard_seconds", "model_seconds", "wait_seconds"):
            data[key] = round(data[key], 3)
        data["class_counts"] = dict(sorted(self.class_counts.items(), key=lambda kv: -kv[1]))
        return data
