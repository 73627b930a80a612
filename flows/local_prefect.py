"""A Prefect server this machine starts for itself, and this process pointed at it.

The demo and the test fixtures start `prefect server start` through here, the same way: on
loopback, with its own PREFECT_HOME and sqlite database, in a process group of its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.environ import patched_environ
from pipeline.local_servers import ServerError, free_port, start_in_own_group, stop_group

DEFAULT_PORT = 4200  # Prefect's own default, where the usual URL finds it


@dataclass
class PrefectServerProcess:
    """A `prefect server start` child with its own PREFECT_HOME (its state outlives it)."""

    process: object  # subprocess.Popen
    home: Path
    port: int
    log_path: Path

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until_healthy(self, timeout: float = 120.0) -> str:
        """The API URL once /health answers; ServerError if the server died or hangs."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(
                    f"the Prefect server exited with {self.process.returncode} "
                    f"(log {self.log_path}): {' '.join(self.log_tail(1500).split())[-300:]}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return self.api_url
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the Prefect server on port {self.port} was not healthy within "
                    f"{timeout:.0f} s (log {self.log_path})"
                )
            time.sleep(0.5)


def server_environment(home: Path, port: int) -> dict[str, str]:
    """The settings of a server on 127.0.0.1:port whose state lives in `home`, quiet and
    without analytics. The UI is told its API's address: `--port` alone moves the API but
    leaves the UI calling port 4200 ("Can't connect to Server API")."""
    return {
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }


@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None) -> Iterator[PrefectServerProcess]:
    """Start `prefect server start` on 127.0.0.1:port (None: any free port); its log is
    home/server.log. Not waited for (it boots in 10-20 s while the caller does other work:
    call wait_until_healthy); its whole process group is stopped afterwards."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    env = {**os.environ, **server_environment(home, port)}
    env.pop("PREFECT_API_URL", None)  # the server must not think it is a client of another
    prefect_cli = Path(sys.executable).with_name("prefect")
    command = [str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = start_in_own_group(command, home / "server.log", env=env)
    try:
        yield PrefectServerProcess(process, home, port, home / "server.log")
    finally:
        stop_group(process)


@contextlib.contextmanager
def use_prefect_server(api_url: str, home: Path) -> Iterator[None]:
    """Point this process's Prefect client (settings) and its children (environment) at the
    server; afterwards send what is still buffered and put everything back."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with (
        patched_environ({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home)}),
        temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}),
    ):
        try:
            yield
        finally:
            drain_prefect_clients()


def drain_prefect_clients(timeout: float = 10.0) -> None:
    """Send the buffered logs and events while the server still listens.

    Prefect ships them from background workers; left for interpreter exit, they would retry
    against the stopped server for minutes and print connection errors (Prefect's own test
    harness drains the same way).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout)
