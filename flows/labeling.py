"""The nightly labeling flow: plan the shards, label them on Ray, summarize into artifacts.

`label_images` is an ordinary typed function; its annotations (type, default, description)
become the run form in the Prefect UI. The pipeline does the work; this module only orders
it, retries what is safe to retry, and turns the result into artifacts a person reads.
S3 credentials are never parameters: the flow's process (and Ray's nodes) take them from the
environment or instance role, or from the Prefect Secret block named in MIXER_LABEL_AWS_BLOCK.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field
from pydantic.fields import FieldInfo

from flows.drift import DriftReport, compare

Backend = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
Decode = Literal["auto", "cpu", "device"]


def Param(title: str, description: str, **constraints: Any) -> FieldInfo:
    """A pydantic Field whose title and description reach the Prefect UI's run form.

    Prefect wraps each parameter in its own Field (title = the name, description from the
    docstring), which hides an Annotated Field's title and description; json_schema_extra is
    the one part that survives that merge, so they travel there too.
    """
    extra = {"title": title, "description": description}
    return Field(title=title, description=description, json_schema_extra=extra, **constraints)


@dataclass
class ShardPlan:
    """What labeling needs from planning: the model's identity, the partition, every shard."""

    model: Any  # pipeline.run.ModelIdentity
    partition_uri: str
    shards: list[Any]  # pipeline.run.PlannedShard
    storages: Any = None  # pipeline.run.RunStorages, opened once for the whole run

    @property
    def skipped(self) -> int:
        return sum(1 for p in self.shards if p.skip_reason)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a listing that broke on the network, not one refused for a reason a retry can't fix."""
    from pipeline.run import RunError
    from pipeline.storage import ObjectNotFound

    error = state.result(raise_on_failure=False)
    # RunError: preflight found the input empty or missing, the output unwritable, the model
    # unreadable; ValueError: a bad setting. The same call would fail the same way again.
    return not isinstance(error, (RunError, ObjectNotFound, ValueError, TypeError))


@task(
    name="plan-shards",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
)
def shard_plan(config: Any) -> ShardPlan:
    """Check model, input and output, then list every shard and mark the ones already done."""
    from pipeline.preflight import check_before_start
    from pipeline.run import RunStorages, identify_model, plan_shards, preflight

    check_before_start(config)
    model = identify_model(config)
    storages = RunStorages.open(config)
    partition, shards = preflight(config, storages)
    planned = list(plan_shards(config, model.sha256, shards, storages))
    plan = ShardPlan(model, partition, planned, storages)
    get_run_logger().info(
        "%d shard(s) under %s, %d already labeled; model %s (sha256 %s)",
        len(plan.shards),
        config.input_uri,
        plan.skipped,
        model.name,
        model.sha256[:12],
    )
    return plan


# No retries: a shard is already retried inside the run, and re-running this task would start
# a second actor pool over shards the first may have written.
@task(name="label-shards", retries=0, cache_policy=NO_CACHE)
def run_summary(plan: ShardPlan, config: Any) -> Any:
    """The RunSummary of labeling the planned shards on Ray; a progress artifact follows along."""
    from flows.artifacts import ShardProgress
    from pipeline.run import label_shards, ray_session, write_summary

    progress = ShardProgress(len(plan.shards), config.output_uri, logger=get_run_logger())
    with ray_session(config.ray_address):
        summary = label_shards(
            plan.shards, config, model=plan.model, on_progress=progress, storages=plan.storages
        )
    write_summary(config, plan.partition_uri, summary, plan.storages)
    return summary


@task(name="compare-with-previous-night", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def drift_report(config: Any, date: str) -> DriftReport | None:
    """This night's partition against the latest earlier one, and the trend of the last nights."""
    import dataclasses

    from flows.partitions import previous_in, recent_partition_stats
    from pipeline.run import RunStorages

    # The run's storage settings (endpoint, retry budget), not a second set of defaults.
    storage = RunStorages.open(config).output
    history = recent_partition_stats(storage, config.output_uri, date)
    if not history or history[0].date != date:
        return None
    report = compare(history[0], previous_in(history, date))
    report = dataclasses.replace(report, history=tuple(history))
    for warning in report.warnings:
        get_run_logger().warning("DRIFT: %s", warning)
    return report


@task(name="summarize", cache_policy=NO_CACHE)
def published_summary(summary: dict[str, Any], drift: DriftReport | None, output_uri: str) -> dict:
    """The run summary, published as markdown and class-count table artifacts."""
    from flows.artifacts import publish_run_artifacts

    publish_run_artifacts(summary, drift, output_uri)
    logger = get_run_logger()
    logger.info(
        "%d images (%d errors) in %.1f s, %.1f images/s -> %s",
        summary["images"],
        summary["errors"],
        summary["seconds"],
        summary["images_per_s"],
        summary["output_uri"],
    )
    return summary


def scheduled_date() -> dt.date:
    """The date this run was scheduled for, in its schedule's time zone (UTC when unknown).

    A nightly run that starts late, or is retried the next morning, still writes the partition
    of the night it was meant for.
    """
    from prefect.runtime import flow_run

    return partition_date(flow_run.scheduled_start_time, _schedule_timezone())


def partition_date(scheduled: dt.datetime, timezone: str = "UTC") -> dt.date:
    """The calendar date of the instant `scheduled` in `timezone` (an IANA name)."""
    return scheduled.astimezone(zoneinfo.ZoneInfo(timezone)).date()


def _schedule_timezone() -> str:
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return "UTC"
    try:
        with get_client(sync_client=True) as client:
            schedules = client.read_deployment(deployment.id).schedules
    except Exception:  # the date still works without the time zone; UTC is a fine fallback
        return "UTC"
    for item in schedules:
        timezone = getattr(item.schedule, "timezone", None)
        if timezone:
            return timezone
    return "UTC"


@flow(
    name="label-images",
    description="Label image shards with an MLP-Mixer on Ray: one Parquet file per shard.",
    validate_parameters=True,
)
def label_images(
    input_uri: Annotated[
        str,
        Param(
            title="Input",
            description="Folder of shards: s3://bucket/prefix/ or a local path "
            "(WebDataset .tar, Parquet with image bytes, or plain images).",
            min_length=1,
        ),
    ],
    output_uri: Annotated[
        str,
        Param(
            title="Output",
            description="Where predictions go: OUTPUT/date=YYYY-MM-DD/SHARD.parquet "
            "(s3:// or a local path).",
            min_length=1,
        ),
    ],
    model: Annotated[
        str,
        Param(
            title="Model",
            description="Checkpoint path or s3:// URI (.safetensors, official .npz, timm .pth), "
            "or a preset name such as B/16 (random weights, for benchmarks).",
            min_length=1,
        ),
    ],
    backend: Annotated[
        Backend,
        Param(
            title="Backend",
            description="Inference runtime; auto: TensorRT on GPUs where installed, else torch.",
        ),
    ] = "auto",
    precision: Annotated[
        Precision,
        Param(
            title="Precision",
            description="auto: what the hardware runs natively: bf16 on Ampere+ GPUs (fp16 "
            "on older), bf16 on CPUs with AMX/AVX512-BF16, else int8 or fp32.",
        ),
    ] = "auto",
    batch_size: Annotated[
        int, Param(title="Batch size", description="Images per forward pass.", ge=1, le=4096)
    ] = 64,
    decode: Annotated[
        Decode,
        Param(
            title="Decode",
            description="Where JPEGs are decoded and resized. device: in batches on the "
            "model's GPU (nvJPEG via torchvision, the gpu extra), so the GPU does not wait on "
            "CPU cores; other formats still go through Pillow. cpu: Pillow in threads. auto: "
            "device where the model runs on CUDA and torchvision imports, else cpu.",
        ),
    ] = "auto",
    ray_address: Annotated[
        str,
        Param(
            title="Ray address",
            description="Ray cluster to run on, e.g. ray://head:10001 or auto; "
            "empty starts a local Ray on this machine.",
        ),
    ] = "",
    actors: Annotated[
        int,
        Param(
            title="Actors",
            description="A fixed pool of this many Ray actors (model replicas); 0 = an "
            "elastic pool: one actor per GPU (or per CPU node on a CPU-only cluster), "
            "growing onto nodes that join during the run.",
            ge=0,
        ),
    ] = 0,
    min_actors: Annotated[
        int | None,
        Param(
            title="Min actors",
            description="Elastic pool (Actors = 0): idle actors beyond this many stop as the "
            "queue drains, so their nodes can scale down; the autoscaler request never goes "
            "below it while shards are left. Empty = 1.",
            ge=0,
        ),
    ] = None,
    max_actors: Annotated[
        int | None,
        Param(
            title="Max actors",
            description="Elastic pool (Actors = 0): at most this many actors, and the run asks "
            "the autoscaler for up to this many actors' worth of GPUs (or CPUs) while shards "
            "are queued, lowered as they drain. Empty = no bound and no request.",
            ge=1,
        ),
    ] = None,
    date: Annotated[
        dt.date | None,
        Param(
            title="Partition date",
            description="The date=YYYY-MM-DD partition to write; empty = the date this run "
            "was scheduled for (so a late nightly run writes the right night).",
        ),
    ] = None,
    force: Annotated[
        bool,
        Param(
            title="Force",
            description="Label shards again even when their output exists for the same "
            "input and model.",
        ),
    ] = False,
) -> dict[str, Any]:
    """Label every image under `input_uri` and write Parquet under `output_uri`."""
    import os

    from flows.secrets import load_aws_secret
    from pipeline.run import RunConfig

    load_aws_secret(os.environ.get("MIXER_LABEL_AWS_BLOCK"))
    partition = (date or scheduled_date()).isoformat()
    config = RunConfig(
        input_uri=input_uri,
        output_uri=output_uri,
        model=model,
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        decode=decode,
        ray_address=ray_address.strip() or None,
        actors=actors or None,
        min_actors=min_actors,
        max_actors=max_actors,
        # the cluster's shape, a deployment-level setting like the endpoint (job variables)
        actor_device=os.environ.get("MIXER_LABEL_ACTOR_DEVICE") or "auto",
        date=partition,
        force=force,
        s3_endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or None,
        # a deployment-level setting (job variables), like the endpoint: not a per-run choice
        compile_cache=os.environ.get("MIXER_LABEL_COMPILE_CACHE") or None,
    )
    plan = shard_plan(config)
    summary = run_summary(plan, config).to_dict()
    # Drift is a second opinion on a night already written: if it cannot be computed (say a
    # partition of an older schema), the run still completes, with a warning saying why.
    drift_state = drift_report(config, partition, return_state=True)
    drift = drift_state.result(raise_on_failure=False) if drift_state.is_completed() else None
    if not drift_state.is_completed():
        get_run_logger().warning("no drift report: %s", drift_state.message)
    published_summary(summary, drift, output_uri)
    if summary["shards_failed"]:
        failed = "; ".join(f"{f['shard']}: {f['error']}" for f in summary["failed_shards"][:5])
        raise RuntimeError(
            f"{summary['shards_failed']} of {summary['shards_total']} shard(s) failed "
            f"(the others were written): {failed}"
        )
    return summary
