"""A labeling run: check, plan (list shards, skip those done), label on the actor pool, summarize.

`run_labeling(config)` is the whole run. Everything that can fail for a reason the user can fix
(model, input, output, credentials) is checked on the driver before any actor starts. Planning
streams: the listing runs in a background thread and the pool starts labeling the first shard
while the rest of a large prefix is still being listed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.elastic import Elastic, RequestHook, ray_request_resources
from pipeline.pool import Feed, ShardPool, Work, plan_actors
from pipeline.progress import ProgressCallback, ProgressTracker
from pipeline.ray_quiet import init_options, quiet_ray
from pipeline.runspec import RunConfig, RunError, RunSummary, ShardResult
from pipeline.storage import one_line
from pipeline.workers import WorkerSpec
from pipeline.writer import read_file_metadata

__all__ = [
    "PlannedShard",
    "RunConfig",
    "RunError",
    "RunStorages",
    "RunSummary",
    "ShardResult",
    "label_shards",
    "plan_shards",
    "run_labeling",
]

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
FAILED_FILE = "_FAILED.json"  # the summary of a run with failed shards (no _SUCCESS.json)


@dataclass(frozen=True)
class PlannedShard:
    """One input shard, where its output goes, and why it is skipped (None: label it)."""

    shard: object  # pipeline.shards.Shard
    output_uri: str
    skip_reason: str | None = None
    found: dict[str, str] | None = None  # the footer metadata of the output that is done


@dataclass(frozen=True)
class ModelIdentity:
    """What the driver knows of the model: enough for planning, metadata and the summary."""

    spec: str  # what workers load: an absolute path, an s3:// URI or a preset name
    name: str
    sha256: str


def identify_model(config: RunConfig) -> ModelIdentity:
    """The model's name and sha256 from its checkpoint header; RunError if it cannot be read.

    The driver never builds the network (the workers do): a checkpoint's header gives the
    name and its bytes, hashed as a stream, the sha256.
    """
    from models.checkpoints import CheckpointError, model_identity
    from pipeline.model_cache import local_model
    from pipeline.storage import StorageError

    spec = config.model
    if "://" not in spec and Path(spec).exists():
        spec = str(Path(spec).resolve())  # workers do not share the driver's working directory
    try:
        identity = model_identity(local_model(spec, _storage_options(config)))
    except (CheckpointError, StorageError, OSError) as err:
        message = str(err)
        # Most of these messages begin with the file or URI already: name it once.
        named = config.model in message or spec in message
        raise RunError(message if named else f"model {config.model}: {message}") from None
    return ModelIdentity(spec, identity.name, identity.sha256)


@dataclass(frozen=True)
class RunStorages:
    """The input and output storages of one run, opened once and passed along its path."""

    input: Any  # pipeline.storage.Storage
    output: Any
    partition_uri: str  # OUTPUT/date=YYYY-MM-DD

    @classmethod
    def open(cls, config: RunConfig) -> RunStorages:
        from pipeline.storage import open_storage

        options = _storage_options(config)
        source = open_storage(config.input_uri, options)
        out = open_storage(config.output_uri, options)
        partition = out.join(config.output_uri, f"date={config.partition_date()}")
        return cls(source, out, partition)


def partition_uri(config: RunConfig, storages: RunStorages | None = None) -> str:
    """OUTPUT/date=YYYY-MM-DD, where this run's Parquet files go."""
    return (storages or RunStorages.open(config)).partition_uri


def plan_shards(
    config: RunConfig,
    model_sha256: str | None = None,
    shards: Iterable | None = None,
    storages: RunStorages | None = None,
) -> Iterator[PlannedShard]:
    """Every input shard with its output URI; skip_reason set when the output is already done.

    Done means: the output exists and its footer names the same input ETag and model sha256.
    Only the footer is read (ranged reads of the file's tail). `force` redoes everything.
    """
    from pipeline.shards import list_shards

    storages = storages or RunStorages.open(config)
    out, partition = storages.output, storages.partition_uri
    if model_sha256 is None:
        model_sha256 = identify_model(config).sha256
    if shards is None:
        shards = list_shards(storages.input, config.input_uri, config.images_per_shard)
    # One listing of the partition instead of a HEAD per shard; it holds outputs, not images.
    existing = {} if config.force else {info.uri: info for info in out.list(partition)}
    for shard in shards:
        output_uri = out.join(partition, f"{shard.name}.parquet")
        info = existing.pop(output_uri, None)
        found = None if info is None else _done_metadata(out, info, shard, model_sha256)
        yield PlannedShard(shard, output_uri, DONE_REASON if found else None, found)


DONE_REASON = "done: output has the same input ETag and model sha256"


def _done_metadata(storage, info, shard, model_sha256: str) -> dict[str, str] | None:
    """The output's footer metadata when it is done for this input and model, else None."""
    from pipeline.storage import StorageError

    try:
        metadata = read_file_metadata(storage, info.uri, info.size)
    except StorageError:
        # Storage failing after its retry budget says nothing about the file: relabeling a
        # finished shard would be wrong, so the run stops here with the storage's message.
        raise
    except Exception as err:  # a torn or foreign file is redone, not trusted
        log.warning("%s: unreadable footer, labeling again: %s", info.uri, err)
        return None
    if metadata.get("input_etag") != (shard.etag or ""):
        return None
    if metadata.get("model_sha256") != model_sha256:
        return None
    return metadata


def label_shards(
    planned: Iterable[PlannedShard],
    config: RunConfig,
    on_shard_done: Callable[[ShardResult], None] | None = None,
    *,
    model: ModelIdentity | None = None,
    run_id: str | None = None,
    started: float | None = None,
    on_progress: ProgressCallback | None = None,
    request_resources: RequestHook | None = ray_request_resources,
    storages: RunStorages | None = None,
) -> RunSummary:
    """Label the planned shards on a pool of actors on the connected Ray cluster.

    `on_shard_done` gets each ShardResult; `on_progress` a ProgressEvent (images done and
    total, rate, ETA, actors) after each shard, when the pool changes and at the end. The pool
    is `config.actors` fixed actors, or else elastic (pipeline.elastic) and then, with
    `config.max_actors`, asks the autoscaler for what it can use through `request_resources`.
    """
    import ray

    started = time.monotonic() if started is None else started
    started_epoch = time.time() - (time.monotonic() - started)
    model = model or identify_model(config)
    summary = RunSummary(
        run_id=run_id or new_run_id(),
        input_uri=config.input_uri,
        output_uri=config.output_uri,
        date=config.partition_date(),
        model=model.name,
        model_sha256=model.sha256,
        partition_uri=partition_uri(config, storages),
    )
    spec = WorkerSpec(
        model=model.spec,
        backend=config.backend,
        precision=config.precision,
        batch_size=config.batch_size,
        topk=config.topk,
        embeddings=config.embeddings,
        image_column=config.image_column,
        storage_options=_storage_options(config),
        decode_threads=config.decode_threads,
        decode=config.decode,
        compile_cache=config.compile_cache,
        run_id=summary.run_id,
        code_version=code_version(),
    )
    tracker = ProgressTracker([on_progress])
    elastic = None
    if config.actors:
        plans = plan_actors(ray.nodes(), config.actors)
    else:
        plans = []  # the elastic pool starts actors on the alive nodes at its first look
        elastic = Elastic(
            min_actors=1 if config.min_actors is None else config.min_actors,
            max_actors=config.max_actors,
            request=request_resources,
            gpu_cluster=config.actor_device == "gpu",
            cpu_only=config.actor_device == "cpu",
        )
    pool = ShardPool(
        spec,
        plans,
        max_attempts=config.max_attempts,
        elastic=elastic,
        on_change=tracker.pool_changed,
    )
    feed = Feed(_as_work(tracker.track(planned)))
    try:
        for result in pool.run(feed):
            summary.add(result)
            tracker.finished(result)
            if result.started_at is not None:
                since = max(0.0, result.started_at - started_epoch)
                first = summary.first_shard_started_s
                summary.first_shard_started_s = since if first is None else min(first, since)
            if on_shard_done is not None:
                on_shard_done(result)
        tracker.end()
    finally:
        feed.close()
        pool.close()
    summary.actors = max(pool.peak_actors, len(plans))
    summary.pool_history = [
        {"t_s": t, "actors": actors, "nodes": nodes} for t, actors, nodes in pool.history
    ]
    summary.shards_total = summary.shards_done + summary.shards_skipped + summary.shards_failed
    summary.seconds = time.monotonic() - started
    return summary


def _as_work(planned: Iterable[PlannedShard]) -> Iterator[Work | ShardResult]:
    for item in planned:
        if item.skip_reason:
            # The backend that wrote the output found, so a rerun that skips everything can
            # still say what made its partition.
            found = item.found or {}
            yield ShardResult(
                item.shard,
                item.output_uri,
                skipped=True,
                error=item.skip_reason,
                backend=found.get("backend") or None,
                precision=found.get("precision") or None,
            )
        else:
            yield Work(item.shard, item.output_uri)


def run_labeling(
    config: RunConfig,
    on_shard_done: Callable[[ShardResult], None] | None = None,
    on_progress: ProgressCallback | None = None,
    verbose: bool = False,
) -> RunSummary:
    """The whole run: check everything, label every shard not done yet, write the summary.

    `verbose` lets Ray's start-up notices and the workers' output through (see ray_quiet).
    """
    from pipeline.preflight import check_before_start

    started = time.monotonic()
    check_before_start(config)  # names, model spec, URIs, the S3 endpoint: nothing started yet
    model = identify_model(config)
    storages = RunStorages.open(config)
    partition, first_shards = preflight(config, storages)
    planned = plan_shards(config, model.sha256, first_shards, storages)
    with ray_session(config.ray_address, verbose=verbose):
        summary = label_shards(
            planned,
            config,
            on_shard_done,
            model=model,
            run_id=new_run_id(),
            started=started,
            on_progress=on_progress,
            storages=storages,
        )
    write_summary(config, partition, summary, storages)
    return summary


def preflight(config: RunConfig, storages: RunStorages | None = None) -> tuple[str, Iterator]:
    """Fail fast, before any actor: input listable and not empty, output writable.

    Returns the partition URI and the shard listing (already started, nothing lost).
    """
    from pipeline.shards import list_shards
    from pipeline.storage import StorageError

    try:
        storages = storages or RunStorages.open(config)
        # The listing starts here: a wrong endpoint fails it in seconds (for_preflight).
        source = storages.input.for_preflight()
        shards = list_shards(source, config.input_uri, config.images_per_shard)
        first = next(shards, None)
        if first is None:
            if "://" not in config.input_uri and not Path(config.input_uri).exists():
                raise RunError(f"{config.input_uri}: no such file or folder")
            raise RunError(f"{config.input_uri}: no image shards found (.tar, .parquet or images)")
        partition = storages.partition_uri
        storages.output.check_writable(partition)
    except StorageError as err:
        raise RunError(str(err)) from None
    return partition, _chain(first, shards)


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def write_summary(
    config: RunConfig, partition: str, summary: RunSummary, storages: RunStorages | None = None
) -> str | None:
    """`_SUCCESS.json` (or `_FAILED.json`) beside the Parquet files; returns its URI.

    One marker per partition tells the truth of the latest run: the new one is written
    atomically, then the other is deleted (a reader between the two sees the new one and a
    stale one, never neither). A run that labeled nothing (every shard was already done)
    leaves a true marker alone, so running the same job twice writes nothing.
    """
    out = (storages or RunStorages.open(config)).output
    uri = out.join(partition, SUCCESS_FILE if summary.ok else FAILED_FILE)
    stale = out.join(partition, FAILED_FILE if summary.ok else SUCCESS_FILE)
    idle = summary.shards_done == 0 and summary.shards_failed == 0
    if idle and out.exists(uri) and not out.exists(stale):
        return None
    out.put_atomic(uri, (json.dumps(summary.to_dict(), indent=2) + "\n").encode())
    out.delete(stale)
    return uri


@contextlib.contextmanager
def ray_session(address: str | None, verbose: bool = False) -> Iterator[None]:
    """Join `address`, reuse a Ray this process already joined, or start a local one.

    A local Ray is started by this process, so its workers inherit this process's environment,
    AWS_* variables included; credentials never travel in task arguments or a runtime_env (which
    Ray shows on its dashboard). Workers of a remote cluster use their own node's AWS chain.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = init_options(verbose)
    if address:
        check_reachable(address)
    try:
        with quiet_ray(verbose):
            _init_ray(ray, address, kwargs)
    except Exception as err:  # ConnectionError, TimeoutError, RuntimeError, ...
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RunError(f"cannot start or join {where}: {one_line(err)}") from None
    try:
        yield
    finally:
        with quiet_ray(verbose):
            ray.shutdown()


def _init_ray(ray, address: str | None, kwargs: dict[str, object]) -> None:
    if address:
        ray.init(address=address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit`, a RayJob or a worker pointed at a cluster: join it, and
        # pass no local-start arguments (Ray refuses them when joining).
        ray.init(**kwargs)
    else:
        from pipeline.local_servers import init_local_ray

        init_local_ray(ray_options=kwargs)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """RunError unless host:port (or ray://host:port) accepts a TCP connection.

    ray.init keeps retrying an unreachable address for minutes; a user wants to know now.
    """
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # "auto" and other forms are Ray's to resolve
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as err:
        raise RunError(f"cannot reach the Ray cluster at {address}: {one_line(err)}") from None


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("mixer-label")
    except PackageNotFoundError:
        text = "0+unknown"
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            sha = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            ).stdout.strip()
            if sha:
                text += f"+g{sha}"
    return text


def _storage_options(config: RunConfig):
    from pipeline.storage import RetryPolicy, StorageOptions

    retry = RetryPolicy(budget_s=config.storage_retry_s)
    return StorageOptions(endpoint_url=config.s3_endpoint_url, retry=retry)
