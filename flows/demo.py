"""`mixer-label demo [--s3]`: the whole system on this machine, with a result you can check.

Builds the digits data set (`.demo/shards/train|test/`, WebDataset tars with `.cls` labels and a
few deliberately broken files), trains the small Mixer or reuses `.demo/model/` when data and
code are unchanged, starts a Prefect server (state in `.demo/prefect/`) and a local Ray, runs the
`label-images` flow on the test shards into `.demo/predictions/date=YYYY-MM-DD/`, then checks the
Parquet files: the error rows are exactly the broken files, and every prediction equals the one
`mixer-label train` made offline, image by image, which proves training and serving preprocess
identically. `--s3` does the same through an S3 API server on loopback (moto), the production
path: shards and model are uploaded, read back by the workers, and the predictions are copied
to `.demo/predictions/` at the end so they can be queried after the server is gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.environ import patched_environ

DEMO_DIR = ".demo"
BUCKET = "mixer-label-demo"
MODEL_NAME = "mixer-demo-digits"
PREFECT_PORT = 4200  # Prefect's own default, used when free, so the usual URL works
RAY_DASHBOARD_PORT = 8265  # Ray's default, likewise
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


@dataclass
class Checks:
    """The Parquet predictions held against the ground truth and the offline evaluation."""

    rows: int = 0
    files: list[str] = field(default_factory=list)
    error_keys: set[str] = field(default_factory=set)
    broken_keys: set[str] = field(default_factory=set)
    missing_keys: list[str] = field(default_factory=list)  # test images without a row
    duplicate_keys: list[str] = field(default_factory=list)
    labeled: int = 0
    correct: int = 0
    eval_correct: int = 0
    eval_labeled: int = 0
    mismatches: list[tuple[str, object, object]] = field(default_factory=list)  # key, ours, eval

    @property
    def accuracy(self) -> float:
        return self.correct / self.labeled if self.labeled else 0.0

    @property
    def eval_accuracy(self) -> float:
        return self.eval_correct / self.eval_labeled if self.eval_labeled else 0.0

    @property
    def errors_are_the_broken_files(self) -> bool:
        return self.error_keys == self.broken_keys

    @property
    def ok(self) -> bool:
        return (
            self.errors_are_the_broken_files
            and not self.missing_keys
            and not self.duplicate_keys
            and not self.mismatches
            and self.labeled == self.eval_labeled
        )

    def problems(self) -> list[str]:
        """One line per failed check."""
        lines = []
        if not self.errors_are_the_broken_files:
            unexpected = sorted(self.error_keys - self.broken_keys)[:5]
            unflagged = sorted(self.broken_keys - self.error_keys)[:5]
            lines.append(
                f"error rows are not the broken files: unexpected {unexpected}, missed {unflagged}"
            )
        if self.missing_keys:
            lines.append(
                f"{len(self.missing_keys)} test image(s) have no row: {self.missing_keys[:5]}"
            )
        if self.duplicate_keys:
            lines.append(
                f"{len(self.duplicate_keys)} key(s) have several rows: {self.duplicate_keys[:5]}"
            )
        if self.mismatches:
            lines.append(
                f"{len(self.mismatches)} prediction(s) differ from the offline "
                f"evaluation (key, parquet, eval): {self.mismatches[:5]}"
            )
        if self.labeled != self.eval_labeled:
            lines.append(
                f"{self.labeled} labeled predictions, the evaluation has {self.eval_labeled}"
            )
        return lines


@dataclass
class DemoReport:
    """Everything the summary prints; `ok` is the verdict."""

    data: dict[str, object]  # the data set manifest
    shards_uri: str
    model_path: Path
    model_reused: bool
    model_parameters: int
    train_seconds: float | None  # None when reused
    run: dict[str, object]  # the flow's RunSummary.to_dict()
    checks: Checks
    predictions_dir: Path
    output_uri: str
    prefect_ui: str
    prefect_home: Path
    flow_run_id: str | None
    ray_dashboard: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.checks.ok


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
        prefect = stack.enter_context(prefect_server(root / "prefect", options.serve))
        shards_uri, output_uri = str(local_shards), str(root / "predictions")
        if options.s3:
            endpoint = stack.enter_context(moto_server(root))
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
        dashboard = stack.enter_context(local_ray(options.dashboard, options.serve))
        api_url = prefect.wait_until_healthy()
        stack.enter_context(_prefect_settings(api_url, prefect.home))
        # Today's partition is this demo's own output: start it empty, so files of an earlier
        # build with other shards cannot mix into the checks.
        shutil.rmtree(root / "predictions" / f"date={date}", ignore_errors=True)
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
        predictions_dir = root / "predictions" / f"date={date}"
        if options.s3:
            mirror(partition, predictions_dir)
        report = DemoReport(
            data=manifest,
            shards_uri=shards_uri,
            model_path=model_dir / "model.safetensors",
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
        for line in summary_lines(report, options):
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


# --------------------------------------------------------------------------- the checks


def check_predictions(
    partition_uri: str, test_uri: str, model_dir: Path, manifest: dict[str, object]
) -> Checks:
    """Read every Parquet file of the partition and hold it against truth and offline eval."""
    import io

    import pyarrow.parquet as pq

    from pipeline.storage import open_storage
    from pipeline.train import EVAL_FILE, iter_records

    storage = open_storage(partition_uri)
    checks = Checks(broken_keys=set(manifest["broken"]))
    predicted: dict[str, object] = {}
    for info in storage.list(partition_uri):
        if not info.uri.endswith(".parquet"):
            continue
        checks.files.append(info.uri)
        table = pq.read_table(io.BytesIO(storage.get(info.uri)), columns=["key", "label", "error"])
        for key, label, error in zip(
            *(table[c].to_pylist() for c in ("key", "label", "error")), strict=True
        ):
            checks.rows += 1
            if key in predicted:
                checks.duplicate_keys.append(key)
            predicted[key] = label
            if error is not None:
                checks.error_keys.add(key)
    # Ground truth straight from the .cls members of the shards, not from any of our outputs.
    truth = {r.key: r.label for _, r in iter_records(test_uri)}
    checks.missing_keys = sorted(set(truth) - set(predicted))
    labeled = {k: v for k, v in truth.items() if v is not None and predicted.get(k) is not None}
    checks.labeled = len(labeled)
    checks.correct = sum(predicted[k] == v for k, v in labeled.items())
    offline = json.loads((model_dir / EVAL_FILE).read_text())
    eval_labels = {p["key"]: p["label"] for p in offline["predictions"]}
    checks.eval_labeled, checks.eval_correct = offline["labeled_images"], offline["correct"]
    checks.mismatches = [
        (k, predicted.get(k), eval_labels.get(k))
        for k in sorted(set(predicted) | set(eval_labels))
        if predicted.get(k) != eval_labels.get(k)
    ]
    return checks


# --------------------------------------------------------------------------- the summary


def summary_lines(report: DemoReport, options: DemoOptions) -> list[str]:
    """The summary a newcomer reads: what ran, whether the checks hold, where to look next."""
    c, run, data = report.checks, report.run, report.data
    splits = data["splits"]
    rel = _relative
    model = (
        "reused (data and code unchanged)"
        if report.model_reused
        else f"trained in {report.train_seconds:.0f} s"
    )
    tick = {True: "OK", False: "FAILED"}
    broken = ", ".join(sorted(c.broken_keys))
    partition = rel(report.predictions_dir)
    lines = [
        "",
        f"== mixer-label demo: {'all checks passed' if report.ok else 'CHECKS FAILED'} "
        f"({report.seconds:.0f} s) ==",
        f"data         {splits['train']['images']} train / {splits['test']['labeled_images']} "
        f"test digits + {len(c.broken_keys)} broken files, WebDataset tars in "
        f"{rel(report.shards_uri)}/train/ and /test/",
        f"model        {rel(report.model_path)} ({MODEL_NAME}, {report.model_parameters:,} "
        f"parameters), {model}",
        f"run          {run['images']} images in {run['shards_done']} shards, "
        f"{run['errors']} errors, {run['images_per_s']:.1f} images/s "
        f"(backend {run['backend']} {run['precision']}, {run['seconds']:.1f} s)",
        f"errors       {len(c.error_keys)} rows, exactly the broken files: "
        f"{tick[c.errors_are_the_broken_files]} ({broken})",
        f"accuracy     {c.accuracy:.2%} ({c.correct}/{c.labeled}) of the Parquet predictions "
        f"against the .cls ground truth",
        f"vs offline   `mixer-label train` evaluated {c.eval_accuracy:.2%} "
        f"({c.eval_correct}/{c.eval_labeled}); predictions equal image by image: "
        f"{tick[not c.mismatches]} ({len(c.mismatches)} differ)",
        f"predictions  {partition}/ ({len(c.files)} Parquet files + _SUCCESS.json)"
        + (f", copied from {report.output_uri}/" if options.s3 else ""),
    ]
    lines += [f"PROBLEM      {p}" for p in c.problems()]
    flow_run = f"/runs/flow-run/{report.flow_run_id}" if report.flow_run_id else "/runs"
    home = rel(report.prefect_home)
    if options.serve:
        lines.append(f"Prefect UI   {report.prefect_ui}{flow_run}")
        if report.ray_dashboard:
            lines.append(
                f"Ray          {report.ray_dashboard} (it asks for Ray's token: "
                "`.venv/bin/ray get-auth-token`)"
            )
    else:
        lines.append(
            f"Prefect UI   `PREFECT_HOME={home} .venv/bin/prefect server start`, then "
            f"http://127.0.0.1:4200{flow_run} (this run is stored in {home}/)"
        )
        lines.append(
            "Ray          the dashboard lives as long as Ray: `mixer-label demo --serve` keeps "
            "it (and the Prefect UI) open until Ctrl+C"
        )
    lines += [
        'query        .venv/bin/python -c "import duckdb; duckdb.sql(\\"SELECT label_name, '
        "count(*) AS images, round(avg(score), 3) AS mean_score FROM read_parquet("
        f"'{partition.rsplit('/', 1)[0]}/*/*.parquet', hive_partitioning = true) "
        'WHERE error IS NULL GROUP BY ALL ORDER BY label_name\\").show()"',
        "",
    ]
    return lines


def _relative(path: object) -> str:
    """A path relative to the working directory when it lies below it (shorter to read)."""
    text = str(path)
    if "://" in text:
        return text
    with contextlib.suppress(ValueError):
        return str(Path(text).resolve().relative_to(Path.cwd()))
    return text


def _parameters(model_dir: Path) -> int:
    from models.checkpoints import load_checkpoint

    return load_checkpoint(model_dir / "model.safetensors").num_parameters()


# --------------------------------------------------------------------------- servers


@dataclass
class PrefectServerProcess:
    """A `prefect server start` child with its own PREFECT_HOME (state survives the demo)."""

    process: subprocess.Popen
    home: Path
    port: int
    log_path: Path

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def wait_until_healthy(self, timeout: float = 120.0) -> str:
        """The API URL once /health answers; a clear error if the server died or hangs."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise DemoError(
                    f"the Prefect server exited with {self.process.returncode} "
                    f"(log {self.log_path}): {' '.join(tail.split())[-300:]}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return self.api_url
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the Prefect server on port {self.port} was not healthy within "
                    f"{timeout:.0f} s (log {self.log_path})"
                )
            time.sleep(0.5)


@contextlib.contextmanager
def prefect_server(home: Path, prefer_default_port: bool = True) -> Iterator[PrefectServerProcess]:
    """Start `prefect server start` on loopback; stop its whole process group afterwards."""
    home.mkdir(parents=True, exist_ok=True)
    port = _port(PREFECT_PORT if prefer_default_port else None)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)  # the server must not think it is a client of another
    log_path = home / "server.log"
    prefect_cli = Path(sys.executable).with_name("prefect")
    command = [str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as server_log:
        process = subprocess.Popen(
            command,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so stopping reaches its children
        )
    try:
        yield PrefectServerProcess(process, home, port, log_path)
    finally:
        _stop_group(process)


@contextlib.contextmanager
def moto_server(root: Path) -> Iterator[str]:
    """An S3 API server (moto) on loopback with the demo bucket; AWS_* point at it meanwhile."""
    port = _port(None)
    endpoint = f"http://127.0.0.1:{port}"
    (root / "s3").mkdir(parents=True, exist_ok=True)
    with open(root / "s3" / "server.log", "wb") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_port(port, process, "the S3 API server (moto)")
        with patched_environ({**MOTO_ENV, "AWS_ENDPOINT_URL_S3": endpoint}):
            from pipeline.storage import StorageOptions
            from pipeline.storage.s3 import s3_client

            s3_client(StorageOptions(endpoint_url=endpoint)).create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        _stop_group(process)


@contextlib.contextmanager
def local_ray(dashboard: bool, prefer_default_port: bool = True) -> Iterator[str | None]:
    """A local Ray for the flow (the pipeline reuses it); yields the dashboard URL, if any."""
    import ray

    if ray.is_initialized():  # someone (a test session) already runs one: use it as it is
        yield None
        return
    kwargs = {}
    if dashboard:
        port = _port(RAY_DASHBOARD_PORT if prefer_default_port else None)
        kwargs = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
    context = ray.init(
        address="local",  # a new Ray of our own, never a cluster someone else started here
        include_dashboard=dashboard,
        object_store_memory=256 * 1024 * 1024,
        configure_logging=False,
        log_to_driver=False,
        **kwargs,
    )
    try:
        yield f"http://{context.dashboard_url}" if dashboard and context.dashboard_url else None
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _prefect_settings(api_url: str, home: Path) -> Iterator[None]:
    """Point this process's Prefect client at the demo's server, then put things back."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with (
        patched_environ({"PREFECT_API_URL": api_url}),
        temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}),
    ):
        try:
            yield
        finally:
            _drain_prefect_clients()


def _drain_prefect_clients() -> None:
    """Send the buffered logs and events while the server still listens.

    Prefect ships them from background workers; left for interpreter exit, they would retry
    against the stopped server for minutes and print connection errors (Prefect's own test
    harness drains the same way).
    """
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # never started: nothing to send
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def _port(preferred: int | None) -> int:
    """`preferred` when nothing listens there, else any free loopback port."""
    if preferred is not None:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", preferred))
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise DemoError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's process group (it was started in a session of its own), then KILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


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
