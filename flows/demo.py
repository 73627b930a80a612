"""The demo (`mixer-label demo [--s3]`): the whole system on this machine, with a checked result.

Builds the digits data set (`.demo/shards/train|test/`, WebDataset tars with `.cls` labels and a
few deliberately broken files), trains the small Mixer or reuses `.demo/model/` when data and
code are unchanged, starts a Prefect server (state in `.demo/prefect/`) and a local Ray, runs the
`label-images` flow on the test shards into `.demo/predictions/date=YYYY-MM-DD/`, then checks the
Parquet files: the error rows are exactly the broken files, and every prediction equals the one
`mixer-label train` made offline, image by image, which proves training and serving preprocess
identically. `--s3` does the same through an S3 API server on loopback (moto), the production
path: shards and model are uploaded, read back by the workers, and the predictions are copied
to `.demo/predictions-s3/` at the end (beside, never over, the local run's `.demo/predictions/`)
so they can be queried after the server is gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.demo_report import DemoReport, check_predictions, summary_lines
from flows.local_prefect import DEFAULT_PORT as PREFECT_PORT
from flows.local_prefect import prefect_server, use_prefect_server
from pipeline.environ import patched_environ
from pipeline.local_servers import free_port, local_ray, moto_server
from pipeline.ray_quiet import init_options

DEMO_DIR = ".demo"
BUCKET = "mixer-label-demo"
MODEL_NAME = "mixer-demo-digits"
RAY_DASHBOARD_PORT = 8265  # Ray's default, used when free (as Prefect's) so the usual URL works
# Credentials for the loopback S3 server only; moto accepts any, and none is ever printed.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "demo-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "demo-secret-access-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}

Log = Callable[[str], None]


class DemoError(RuntimeError):
    """A step of the demo could not run (a server that does not start, a failed flow)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo does; the defaults are `make demo`."""

    root: Path = Path(DEMO_DIR)
    s3: bool = False
    limit: int | None = None  # digits scans to use (tests use a few hundred); None: all 1,797
    images_per_shard: int = 128
    epochs: int | None = None  # None: TrainConfig's default
    dashboard: bool = True  # Ray's dashboard (a few seconds and a few processes more)
    serve: bool = False  # keep the Prefect UI and Ray dashboard up until Ctrl+C
    date: str | None = None  # the output partition; None: today (UTC)
    verbose: bool = False  # Ray's start-up notices and the workers' output on the terminal


# --------------------------------------------------------------------------- the demo


def run_demo(options: DemoOptions = DemoOptions(), log: Log = print) -> DemoReport:
    """Data, model, servers, the flow, the checks: the whole demo; returns the report."""
    started = time.monotonic()
    root = options.root.resolve()
    date = options.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    local_shards = root / "shards"
    manifest = prepare_data(local_shards, options, log)
    with contextlib.ExitStack() as stack:
        # The Prefect server boots (10-20 s) while the model trains or the shards upload.
        prefect_port = free_port(PREFECT_PORT) if options.serve else None
        prefect = stack.enter_context(prefect_server(root / "prefect", prefect_port))
        # `make demo-s3` keeps its copy apart, so it never replaces `make demo`'s predictions.
        predictions_root = root / ("predictions-s3" if options.s3 else "predictions")
        shards_uri, output_uri = str(local_shards), str(predictions_root)
        if options.s3:
            endpoint = stack.enter_context(demo_bucket(root))
            stack.enter_context(patched_environ({"MIXER_LABEL_CACHE": str(root / "cache")}))
            shards_uri, output_uri = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/predictions"
            upload_tree(local_shards, shards_uri)
            log(f"uploaded the shards to {shards_uri} on the S3 API server at {endpoint}")
        from pipeline.train import TrainConfig

        config = TrainConfig(
            name=MODEL_NAME, **({"epochs": options.epochs} if options.epochs else {})
        )
        model_dir = root / "model"
        trained = prepare_model(shards_uri, model_dir, config, log)
        model_uri = str(model_dir / "model.safetensors")
        if options.s3:
            model_uri = f"s3://{BUCKET}/models/{MODEL_NAME}.safetensors"
            upload_file(model_dir / "model.safetensors", model_uri)
        dashboard_port = None
        if options.dashboard:
            dashboard_port = free_port(RAY_DASHBOARD_PORT if options.serve else None)
        dashboard = stack.enter_context(
            local_ray(dashboard_port=dashboard_port, ray_options=init_options(options.verbose))
        )
        api_url = prefect.wait_until_healthy()
        stack.enter_context(use_prefect_server(api_url, prefect.home))
        # Today's partition is this demo's own output: start it empty, so files of an earlier
        # build with other shards cannot mix into the checks.
        shutil.rmtree(predictions_root / f"date={date}", ignore_errors=True)
        log(f"running the label-images flow on {shards_uri}/test (Prefect UI {prefect.ui_url})")
        # The backend, precision and batch size the offline evaluation ran with, so the two
        # predict with the same arithmetic and any difference can only come from the input.
        evaluation = json.loads((model_dir / "eval.json").read_text())
        run, flow_run_id = run_flow(
            input_uri=f"{shards_uri}/test",
            output_uri=output_uri,
            model=model_uri,
            backend=evaluation["backend"],
            precision=evaluation["precision"],
            batch_size=evaluation["batch_size"],
            date=date,
        )
        partition = f"{output_uri}/date={date}"
        checks = check_predictions(partition, f"{shards_uri}/test", model_dir, manifest)
        predictions_dir = predictions_root / f"date={date}"
        if options.s3:
            mirror(partition, predictions_dir)
        report = DemoReport(
            data=manifest,
            shards_uri=shards_uri,
            model_path=model_dir / "model.safetensors",
            model_name=MODEL_NAME,
            model_reused=trained is None,
            model_parameters=_parameters(model_dir),
            train_seconds=None if trained is None else trained.seconds,
            run=run,
            checks=checks,
            predictions_dir=predictions_dir,
            output_uri=output_uri,
            prefect_ui=prefect.ui_url,
            prefect_home=prefect.home,
            flow_run_id=flow_run_id,
            ray_dashboard=dashboard,
            seconds=time.monotonic() - started,
        )
        for line in summary_lines(report, s3=options.s3, serve=options.serve):
            log(line)
        if options.serve:
            _wait_for_ctrl_c(log)
    return report


def prepare_data(local_shards: Path, options: DemoOptions, log: Log) -> dict[str, object]:
    """Build the shards under local_shards, unless an identical build is already there."""
    from pipeline.demo_data import GENERATOR_VERSION, DigitsSpec, read_manifest, write_demo_data

    spec = DigitsSpec(limit=options.limit, images_per_shard=options.images_per_shard)
    existing = read_manifest(str(local_shards)) if local_shards.is_dir() else None
    if (
        existing
        and existing.get("spec") == spec.to_dict()
        and existing.get("generator_version") == GENERATOR_VERSION
        and all(
            (local_shards / split / name).is_file()
            for split in ("train", "test")
            for name in existing["splits"][split]["shards"]
        )
    ):
        log(f"data: reusing {local_shards} (same spec, generator version {GENERATOR_VERSION})")
        return existing
    if local_shards.exists():
        shutil.rmtree(local_shards)  # a different spec: stale shards would mix into the run
    started = time.monotonic()
    manifest = write_demo_data(str(local_shards), spec)
    splits = manifest["splits"]
    log(
        f"data: {splits['train']['images']} train and {splits['test']['labeled_images']} test "
        f"digits (+{len(manifest['broken'])} broken files) written to {local_shards} in "
        f"{time.monotonic() - started:.1f} s"
    )
    return manifest


def prepare_model(data_uri: str, model_dir: Path, config, log: Log):
    """Train into model_dir, or reuse it when data, code and settings are unchanged.

    Returns the TrainResult, or None when the model was reused.
    """
    from pipeline.train import is_current, train, training_fingerprint

    fingerprint = training_fingerprint(data_uri, config)
    if is_current(model_dir, fingerprint):
        log(f"model: reusing {model_dir} (data, code and settings unchanged)")
        return None
    log(f"model: training {config.preset} for {config.epochs} epochs into {model_dir}")
    return train(data_uri, model_dir, config, log=lambda line: log(f"  {line}"))


def run_flow(**parameters: object) -> tuple[dict[str, object], str | None]:
    """Run the label-images flow here, against the Prefect API; (its summary, flow run id)."""
    from flows.labeling import label_images

    date = dt.date.fromisoformat(str(parameters.pop("date")))
    state = label_images(date=date, force=True, return_state=True, **parameters)
    flow_run_id = state.state_details.flow_run_id
    try:
        summary = state.result()
    except Exception as err:
        raise DemoError(f"the label-images flow failed: {err}") from None
    return summary, None if flow_run_id is None else str(flow_run_id)


def _parameters(model_dir: Path) -> int:
    from models.checkpoints import load_checkpoint

    return load_checkpoint(model_dir / "model.safetensors").num_parameters()


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def demo_bucket(root: Path) -> Iterator[str]:
    """An S3 API server (moto) on loopback with the demo bucket; AWS_* point at it meanwhile."""
    with (
        moto_server(root / "s3" / "server.log") as endpoint,
        patched_environ({**MOTO_ENV, "AWS_ENDPOINT_URL_S3": endpoint}),
    ):
        from pipeline.storage import StorageOptions
        from pipeline.storage.s3 import s3_client

        s3_client(StorageOptions(endpoint_url=endpoint)).create_bucket(Bucket=BUCKET)
        yield endpoint


def _wait_for_ctrl_c(log: Log) -> None:
    log("The Prefect UI and the Ray dashboard stay up until Ctrl+C.")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


# --------------------------------------------------------------------------- S3 copies


def upload_tree(local: Path, uri: str) -> None:
    """Copy every file under `local` to `uri` (shards, dataset.json), keeping relative paths."""
    from pipeline.storage import open_storage

    storage = open_storage(uri)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.put_atomic(storage.join(uri, *path.relative_to(local).parts), path.read_bytes())


def upload_file(path: Path, uri: str) -> None:
    from pipeline.storage import open_storage

    open_storage(uri).put_atomic(uri, path.read_bytes())


def mirror(partition_uri: str, local: Path) -> None:
    """Copy a partition (Parquet files and _SUCCESS.json) from S3 into a fresh local folder."""
    from pipeline.storage import open_storage

    storage = open_storage(partition_uri)
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    prefix = partition_uri.rstrip("/") + "/"
    for info in storage.list(partition_uri):
        target = local / info.uri[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.get(info.uri))
