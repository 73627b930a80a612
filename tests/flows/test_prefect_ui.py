"""UI links that work: a Prefect server on a port other than 4200, opened in a real browser.

Two real `prefect server start`s on free loopback ports: the session's, which
`flows.local_prefect` starts (the demo's way), and one with `--port` alone, the way that leaves
its UI calling 4200. `mixer-label deploy` prints a link to the first and warns about the
second; Chromium opens the link, then the first's flow run page, and finds the run's artifacts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.prefect_ui import same_api, ui_api_url, ui_problem

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def client_env(api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def port_flag_server(tmp_path_factory) -> Iterator[str]:
    """The API URL of `prefect server start --port N` with nothing else set."""
    from flows.local_prefect import PrefectServerProcess, server_environment
    from pipeline.local_servers import free_port, start_in_own_group, stop_group

    home = tmp_path_factory.mktemp("prefect-port-flag")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    settings = server_environment(home, port)
    for told in ("PREFECT_SERVER_API_PORT", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL"):
        settings.pop(told, None)
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
    process = start_in_own_group(
        [*command, "--port", str(port)], home / "server.log", env={**env, **settings}
    )
    try:
        yield PrefectServerProcess(process, home, port, home / "server.log").wait_until_healthy()
    finally:
        stop_group(process)


def deploy_to_pool(api_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    argv = [str(BIN / "mixer-label"), "deploy", "--name", "nightly", "--work-pool", "ui-pool"]
    argv += ["-p", f"input_uri={tmp_path}", "-p", f"output_uri={tmp_path}", "-p", "model=tiny"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=180, env=client_env(api_url), cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_same_api_treats_loopback_spellings_as_one_host():
    assert same_api("http://127.0.0.1:4311/api", "http://localhost:4311/api/")
    assert not same_api("http://127.0.0.1:4200/api", "http://127.0.0.1:4311/api")
    assert not same_api("http://10.0.0.5:4311/api", "http://127.0.0.1:4311/api")


def test_a_server_started_with_only_the_port_flag_is_named_with_the_fix(port_flag_server, tmp_path):
    port = port_flag_server.split(":")[-1].split("/")[0]
    assert ui_api_url(port_flag_server.removesuffix("/api")) == "http://127.0.0.1:4200/api"
    problem = ui_problem(port_flag_server)
    assert problem is not None
    assert "calls the API at http://127.0.0.1:4200/api" in problem
    assert f"PREFECT_SERVER_API_PORT={port}" in problem
    # deploy registers, says why there is no link, and prints none.
    done = deploy_to_pool(port_flag_server, tmp_path)
    assert "registered label-images/nightly" in done.stdout
    assert "Prefect UI:" not in done.stdout
    assert f"warning: the Prefect UI at http://127.0.0.1:{port} calls" in done.stderr


def publish_artifacts() -> str:
    """A flow run that publishes the labeling artifacts (a failed file included); its id."""
    from prefect import flow

    from flows.artifacts import publish_run_artifacts
    from tests.flows.test_artifacts import SUMMARY

    @flow(name="ui-link-check")
    def publish() -> None:
        failed = [{"file": "img-0007.jpg", "shard": "shard-000001", "error": "truncated JPEG"}]
        publish_run_artifacts({**SUMMARY, "failed_files": failed}, None, "s3://labels/ui-link")

    return str(publish(return_state=True).state_details.flow_run_id)


def test_deploy_links_to_the_ui_whose_pages_work_and_the_run_page_shows_artifacts(
    prefect_server, tmp_path
):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    # The session's server, started by flows.local_prefect on a free port: not 4200.
    api, ui = prefect_server.api_url, prefect_server.ui_url
    assert prefect_server.port != 4200
    assert ui_problem(api) is None
    done = deploy_to_pool(api, tmp_path)
    links = [line for line in done.stdout.splitlines() if line.startswith("Prefect UI: ")]
    assert len(links) == 1 and links[0].startswith(f"Prefect UI: {ui}/deployments/deployment/")
    deployment_page = links[0].removeprefix("Prefect UI: ")

    flow_run_id = publish_artifacts()

    step = "start Chromium"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        try:
            step = "open the link deploy printed"
            page.goto(deployment_page)
            page.get_by_text("flows.labeling.label_images").first.wait_for()
            step = "open the flow run page, Artifacts tab"
            page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
            page.get_by_text("Artifacts", exact=True).click()
            page.get_by_text("labeling-summary-s3-labels-ui-link").wait_for()
            page.get_by_text("class-counts-s3-labels-ui-link").wait_for()
            body = page.inner_text("body")
            assert "Something went wrong" not in body and "Can't connect" not in body
            step = "open the summary artifact"
            page.get_by_text("labeling-summary-s3-labels-ui-link").click()
            page.get_by_text("truncated JPEG").first.wait_for()
            assert "Something went wrong" not in page.inner_text("body")
        except Exception as err:
            shot = tmp_path / "ui-failure.png"
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"UI step '{step}' failed (screenshot {shot}): {err}") from err
        finally:
            browser.close()
