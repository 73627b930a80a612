"""Servers this machine starts for itself: a local Ray, an S3 API server (moto), loopback ports.

`mixer-label run` without --ray-address, the demo and the test fixtures start them through
here, the same way. The Prefect server is in flows/local_prefect.py (prefect belongs to flows).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# A local run's results are small (Parquet goes straight to storage): a small object store.
LOCAL_RAY_OBJECT_STORE_BYTES = 256 * 1024 * 1024


class ServerError(RuntimeError):
    """A local server did not start; the message says which one and why."""


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else any free loopback port."""
    if preferred is not None:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", preferred))
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Return once 127.0.0.1:port accepts connections; ServerError if `process` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise ServerError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def start_in_own_group(command: list[str], log_path: Path | None, env=None) -> subprocess.Popen:
    """Start `command` in a session of its own (so stop_group reaches its children too)."""
    if log_path is None:
        return subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def moto_server(log_path: Path | None = None) -> Iterator[str]:
    """moto's S3 HTTP API in its own process on a free loopback port; yields its endpoint URL.

    Reached through boto3 like any S3-compatible endpoint; it accepts any credentials until its
    authentication is switched on. Needs the `demo` extra (moto[server]).
    """
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = start_in_own_group(command, log_path)
    try:
        wait_for_port(port, process, "the S3 API server (moto)")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(process)


def init_local_ray(
    num_cpus: int | None = None,
    dashboard_port: int | None = None,
    object_store_bytes: int | None = LOCAL_RAY_OBJECT_STORE_BYTES,
    ray_options: dict[str, object] | None = None,
) -> str | None:
    """ray.init of a new local Ray of this process's own; returns its dashboard URL, if any.

    address="local" always starts a new Ray, never joins a stray `ray start` cluster on this
    machine. Its workers inherit this process's environment (AWS_* included), so credentials
    never travel in task arguments or a runtime_env. No dashboard unless a port is given.
    `ray_options`: ray.init's logging arguments (default: pipeline.ray_quiet's quiet ones).
    """
    import ray

    from pipeline.ray_quiet import init_options, quiet_ray

    kwargs: dict[str, object] = dict(init_options() if ray_options is None else ray_options)
    kwargs["include_dashboard"] = dashboard_port is not None
    if dashboard_port is not None:
        kwargs |= {"dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if object_store_bytes is not None:
        kwargs["object_store_memory"] = object_store_bytes
    with quiet_ray(verbose=bool(kwargs.get("log_to_driver"))):
        context = ray.init(address="local", **kwargs)
    url = context.dashboard_url if dashboard_port is not None else None
    return f"http://{url}" if url else None


@contextlib.contextmanager
def local_ray(**kwargs) -> Iterator[str | None]:
    """init_local_ray(**kwargs) for the block, shut down after; yields the dashboard URL.

    A Ray this process already runs (a test session's) is used as it is and left running.
    """
    import ray

    if ray.is_initialized():
        yield None
        return
    url = init_local_ray(**kwargs)
    try:
        yield url
    finally:
        ray.shutdown()
