"""The flow on a real Prefect server: served deployment, API runs, a process worker, the UI.

Everything is real: `prefect server start` (the `prefect_server` fixture), `mixer-label deploy`
serving the nightly deployment in its own process, flow runs in subprocesses that start a
local Ray, WebDataset shards and Parquet on the local file system, and Chromium driving the UI.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.deploy import PREFECT_YAML

pytestmark = pytest.mark.slow

SHARDS, IMAGES_PER_SHARD = 3, 4
RUN_TIMEOUT_S = 240
BIN = Path(sys.executable).parent
# Subprocesses poll the API every 2 s instead of 10 s, so a test waits seconds, not tens.
FAST_POLL = {
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    "PREFECT_WORKER_QUERY_SECONDS": "2",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class LabelingData:
    root: Path
    input: Path
    model: Path
    output: Path

    def parameters(self, output: Path | None = None) -> dict[str, object]:
        return {
            "input_uri": str(self.input),
            "output_uri": str(output or self.output),
            "model": str(self.model),
            "actors": 1,
            "batch_size": 4,
        }


@pytest.fixture(scope="module")
def labeling_data(tmp_path_factory: pytest.TempPathFactory) -> LabelingData:
    """Three WebDataset shards of four real JPEGs, the tiny model, and a previous night."""
    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset
    from pipeline.storage import LocalStorage
    from tests.pipeline import imagegen

    root = tmp_path_factory.mktemp("labeling")
    data = LabelingData(root, root / "in", root / "tiny.safetensors", root / "out")
    imagegen.write_tar_shards(
        LocalStorage(), str(data.input), shards=SHARDS, images_per_shard=IMAGES_PER_SHARD
    )
    model = build_preset("tiny")
    save_checkpoint(model, data.model)
    # The night before the API run: every image confidently class 9, so drift must show.
    previous = data.output / "date=2024-05-01"
    previous.mkdir(parents=True)
    rows = 20
    pq.write_table(
        pa.table(
            {
                "key": [f"old-{i}" for i in range(rows)],
                "label_name": [model.label_names[9]] * rows,
                "score": pa.array([0.99] * rows, pa.float32()),
                "error": pa.array([None] * rows, pa.string()),
            }
        ),
        previous / "old-000000.parquet",
    )
    return data


def start(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own process group (it starts flow-run subprocesses and Ray)."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until it is stopped
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **FAST_POLL, **(env or {})},
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """SIGINT first (Prefect shuts down cleanly on it), then SIGKILL to the whole group."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    # Children (a flow run, its local Ray) may outlive the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def read_deployment(name: str, timeout_s: float, process: subprocess.Popen, log_path: Path):
    """The deployment `label-images/NAME` once `process` has registered it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(f"label-images/{name}")
            except ObjectNotFound:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"deployment {name} not registered; log:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)


@dataclass
class Served:
    deployment: object  # prefect DeploymentResponse
    log_path: Path

    @property
    def id(self):
        return self.deployment.id


@pytest.fixture(scope="module")
def served(prefect_server, labeling_data: LabelingData, tmp_path_factory) -> Iterator[Served]:
    """`mixer-label deploy` with no flags: the nightly deployment served from a subprocess."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    argv = [str(BIN / "mixer-label"), "deploy"]
    for key, value in labeling_data.parameters().items():
        argv += ["-p", f"{key}={value}"]
    process = start(argv, log_path)
    try:
        yield Served(read_deployment("nightly", 90, process, log_path), log_path)
    finally:
        stop(process)


def wait_for_run(flow_run_id, timeout_s: float = RUN_TIMEOUT_S, log_path: Path | None = None):
    """The flow run once it reached a final state (completed, failed, crashed, cancelled)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                log = log_path.read_text()[-4000:] if log_path else ""
                raise AssertionError(f"run stuck in {run.state_name} after {timeout_s}s\n{log}")
            time.sleep(1)


def run_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(f"{log.level} {log.message}" for log in logs)


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The run's artifacts by type (markdown, table, progress); latest of each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.type: artifact for artifact in found}


def parquet_files(partition: Path) -> list[Path]:
    return sorted(partition.glob("*.parquet"))


def test_served_deployment_has_the_nightly_cron_and_a_parameter_form(served, labeling_data):
    deployment = served.deployment
    schedule = deployment.schedules[0].schedule
    spec = yaml.safe_load(PREFECT_YAML.read_text())["deployments"][0]["schedules"][0]
    assert (schedule.cron, schedule.timezone) == (spec["cron"], spec["timezone"])
    assert deployment.schedules[0].active
    assert deployment.entrypoint == "flows/labeling.py:label_images"
    assert deployment.enforce_parameter_schema
    properties = deployment.parameter_openapi_schema["properties"]
    assert list(properties)[:3] == ["input_uri", "output_uri", "model"]
    assert "date=YYYY-MM-DD" in properties["output_uri"]["description"]
    assert properties["batch_size"]["minimum"] == 1
    assert deployment.parameters["input_uri"] == str(labeling_data.input)
    assert deployment.parameters["actors"] == 1


def test_api_run_like_the_run_button_writes_parquet_and_artifacts(served, labeling_data):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        created = client.create_flow_run_from_deployment(
            served.id, parameters={"date": "2024-05-02"}
        )
    run = wait_for_run(created.id, log_path=served.log_path)
    assert run.state.is_completed(), f"{run.state.message}\n{run_logs(run.id)}"

    partition = labeling_data.output / "date=2024-05-02"
    files = parquet_files(partition)
    assert [f.stem for f in files] == [f"shard-{i:06d}" for i in range(SHARDS)]
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.num_rows == SHARDS * IMAGES_PER_SHARD
    assert table.column("error").null_count == table.num_rows
    success = json.loads((partition / "_SUCCESS.json").read_text())
    assert success["images"] == SHARDS * IMAGES_PER_SHARD

    artifacts = artifacts_of(run.id)
    assert set(artifacts) >= {"markdown", "table", "progress"}
    summary = artifacts["markdown"].data
    assert f"| images | {SHARDS * IMAGES_PER_SHARD} |" in summary
    assert success["model_sha256"] in summary and str(partition) in summary
    assert "## Drift against 2024-05-01" in summary
    # The pool's size over time, and which node labeled what (one local Ray node here).
    assert "| actors | 1 at most, on 1 node(s) |" in summary
    assert "## Actors and nodes over time" in summary
    assert len(success["nodes"]) == 1 and sum(success["nodes"].values()) == SHARDS
    assert "DRIFT WARNING:** mean score moved" in summary  # last night: all 0.99
    assert "| what | value |\n|---|---|" in summary and "| | |\n|---" not in summary
    # The trend of the nights found: this one and the previous, with PSI between them.
    assert "### Last 2 night(s)" in summary
    assert f"| 2024-05-02 | {SHARDS * IMAGES_PER_SHARD} | 0.00 |" in summary
    assert "| 2024-05-01 | 20 | 0.00 | 0.9900 | - |" in summary
    rows = artifacts["table"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert sum(row["count"] for row in rows) == SHARDS * IMAGES_PER_SHARD
    assert all(row["previous_share"] is not None for row in rows)
    nine = next(row for row in rows if row["previous_share"] == 1.0)  # last night: all 9
    assert nine["change_points"] == round(100 * (nine["share"] - 1.0), 2)
    assert "share on 2024-05-01 (previous_share)" in artifacts["table"].description
    assert float(artifacts["progress"].data) == 100.0
    images = SHARDS * IMAGES_PER_SHARD
    progress = artifacts["progress"].description
    assert progress.startswith(f"{images}/{images} images, {SHARDS}/{SHARDS} shards, 0 errors")
    # Logs arrive in batches after the state; give the last batch a moment.
    deadline = time.monotonic() + 15
    while "DRIFT: mean score moved" not in run_logs(run.id) and time.monotonic() < deadline:
        time.sleep(1)
    logs = run_logs(run.id)
    assert "DRIFT: mean score moved" in logs
    # One line per labeled shard in the flow run's logs, numbered in the order they finished.
    shard_lines = re.findall(rf"shard (\d+)/{SHARDS}: {IMAGES_PER_SHARD} images, 0 errors, ", logs)
    assert sorted(int(n) for n in shard_lines) == list(range(1, SHARDS + 1)), logs


def test_a_missing_input_folder_fails_the_run_with_a_readable_message(served, labeling_data):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    missing = labeling_data.root / "no-such-folder"
    with get_client(sync_client=True) as client:
        created = client.create_flow_run_from_deployment(
            served.id, parameters={"input_uri": str(missing), "date": "2024-05-03"}
        )
    run = wait_for_run(created.id, log_path=served.log_path)
    assert run.state.is_failed(), run.state
    assert f"{missing}: no such file or folder" in run.state.message
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    plan = [t for t in tasks if t.name.startswith("plan-shards")]
    assert len(plan) == 1 and plan[0].run_count == 1, "a missing input is not retried"
    assert not [t for t in tasks if t.name.startswith("label-shards")]
    assert not (labeling_data.output / "date=2024-05-03").exists()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_ui_custom_run_with_a_changed_parameter_completes(
    served, labeling_data, prefect_server, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    new_output = tmp_path / "ui-out"
    RUN_NAME = "custom-run-from-the-ui"  # noqa: N806 - a constant of this test

    step = "start Chromium"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        # Generous: the UI shares two cores with Ray, the server and the flow run.
        page.set_default_timeout(90_000)

        def field(label: str):
            return page.locator(".schema-form-property").filter(
                has=page.locator(".schema-form-property__label", has_text=label)
            )

        try:
            step = "open the deployment"
            page.goto(f"{prefect_server.ui_url}/deployments/deployment/{served.id}")
            page.get_by_text("flows/labeling.py:label_images").wait_for()
            step = "Run > Custom run"
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            step = "fill the form"
            # The form shows our titles and descriptions, and the deployment's defaults.
            output = field("Output").locator("textarea")
            assert output.input_value() == str(labeling_data.output)
            assert "date=YYYY-MM-DD" in field("Output").inner_text()
            output.fill(str(new_output))
            field("Batch size").locator("input").fill("3")
            page.locator(".flow-run-name-input input").fill(RUN_NAME)
            step = "submit"
            page.get_by_role("button", name="Submit").click()
            step = "open the new run from the deployment page"
            page.get_by_role("link", name=RUN_NAME).first.click()
            page.wait_for_url("**/runs/flow-run/**")
            flow_run_id = page.url.rstrip("/").split("?")[0].split("/")[-1]
            step = "watch the run complete"
            # The run page's header badge polls the API until the run ends.
            badge = page.locator(".page-heading-flow-run .state-badge").first
            badge.filter(has_text="Completed").wait_for(timeout=RUN_TIMEOUT_S * 1000)
        except Exception as err:
            shot = tmp_path / "ui-failure.png"
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"UI step '{step}' failed (screenshot {shot}): {err}") from err
        finally:
            browser.close()

    run = wait_for_run(flow_run_id, timeout_s=30)
    assert run.state.is_completed(), run.state.message
    assert run.name == RUN_NAME
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[served.id]))
        )
    assert [r.id for r in runs if r.parameters.get("output_uri") == str(new_output)] == [run.id]
    assert run.parameters["output_uri"] == str(new_output)
    assert run.parameters["batch_size"] == 3
    # No date given: the partition is the date the run was scheduled for (UTC schedule).
    date = run.expected_start_time.astimezone(dt.timezone.utc).date().isoformat()
    assert len(parquet_files(new_output / f"date={date}")) == SHARDS


def test_work_pool_deployment_runs_on_a_process_worker(prefect_server, labeling_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    # A second deployment of the same flow, so the served `nightly` does not pick up its runs.
    document = yaml.safe_load(PREFECT_YAML.read_text())
    document["deployments"][0]["name"] = "nightly-pool"
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(document))
    output = tmp_path / "pool-out"
    argv = [str(BIN / "mixer-label"), "deploy", "--prefect-file", str(prefect_file)]
    argv += ["--name", "nightly-pool", "--work-pool", "test-process-pool"]
    argv += ["--cron", "15 3 * * *", "--timezone", "Europe/Berlin"]
    for key, value in labeling_data.parameters(output).items():
        argv += ["-p", f"{key}={value}"]
    registered = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr
    assert "prefect worker start --pool test-process-pool" in registered.stdout

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("label-images/nightly-pool")
        pool = client.read_work_pool("test-process-pool")
    assert pool.type == "process" and deployment.work_pool_name == "test-process-pool"
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("15 3 * * *", "Europe/Berlin")

    log_path = tmp_path / "worker.log"
    worker = start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "test-process-pool"], log_path
    )
    try:
        # A nightly run that starts late: scheduled 01:30 Berlin time on June 2nd (23:30 UTC
        # on June 1st), run now. It must write the night it was scheduled for.
        scheduled = dt.datetime(2024, 6, 1, 23, 30, tzinfo=dt.timezone.utc)
        with get_client(sync_client=True) as client:
            created = client.create_flow_run_from_deployment(
                deployment.id, state=Scheduled(scheduled_time=scheduled)
            )
        run = wait_for_run(created.id, log_path=log_path)
    finally:
        stop(worker)
    assert run.state.is_completed(), f"{run.state.message}\n{log_path.read_text()[-3000:]}"
    assert [p.name for p in output.iterdir()] == ["date=2024-06-02"]
    assert len(parquet_files(output / "date=2024-06-02")) == SHARDS
    assert set(artifacts_of(run.id)) >= {"markdown", "table", "progress"}
