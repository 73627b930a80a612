"""Fixtures that start real servers on loopback and clean up after themselves."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pipeline.environ import patched_environ


def pytest_configure(config: pytest.Config) -> None:
    # Compiled packages, ONNX exports and engines go to a cache folder: the tests share one of
    # their own, never the user's ~/.cache (set before any Ray worker inherits the environment).
    import tempfile

    os.environ["MIXER_LABEL_CACHE"] = tempfile.mkdtemp(prefix="mixer-label-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(os.environ.pop("MIXER_LABEL_CACHE", ""), ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 HTTP API in its own process on a free loopback port; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class S3Server:
    """moto's S3 HTTP API in its own process, reached through boto3 as in production."""

    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto server on a free loopback port; AWS_* variables point the standard chain at it."""
    with moto_server() as endpoint:
        patch = {
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }
        with patched_environ(patch):
            yield S3Server(endpoint)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the shared S3 server."""
    return s3_server.new_bucket()


@dataclass
class AuthS3Server:
    """A second moto S3 server that checks credentials and IAM policies, with two users.

    `bucket` exists; "reader" may get and list it, "writer" may do anything. Use
    `monkeypatch.setenv` with `env(user)` to point the standard AWS chain at it.
    """

    endpoint_url: str
    bucket: str
    keys: dict[str, tuple[str, str]]  # user -> (access key id, secret)

    def env(self, user: str = "writer", secret: str | None = None) -> dict[str, str]:
        key_id, real_secret = self.keys.get(user, (user, "not-a-secret"))
        return {
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": real_secret if secret is None else secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[AuthS3Server]:
    """moto with authentication on: wrong keys, wrong secrets and missing permissions fail."""
    import json
    import urllib.request

    import boto3

    with moto_server() as endpoint:
        # Set up while moto still accepts anything, then switch authentication on.
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        bucket = "authed-bucket"
        boto3.client("s3", **admin).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **admin)
        keys = {}
        for user, actions in (("reader", ["s3:GetObject", "s3:ListBucket"]), ("writer", ["s3:*"])):
            iam.create_user(UserName=user)
            resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
            statement = {"Effect": "Allow", "Action": actions, "Resource": resources}
            policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=policy)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        yield AuthS3Server(endpoint, bucket, keys)


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[object]:
    """One local Ray for the session (starts after S3 so workers inherit its AWS_* env)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@dataclass
class PrefectServer:
    """A real `prefect server start` (API and UI) with its own PREFECT_HOME and sqlite db."""

    api_url: str
    ui_url: str
    home: str
    log_path: str

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-chars:]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """Prefect's API and UI on a free loopback port; PREFECT_API_URL points this process and its
    children (served runs, workers) at it. The whole process group is killed afterwards."""
    import signal
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    patch = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    environ = contextlib.ExitStack()
    environ.enter_context(patched_environ(patch))
    log_path = home / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
    prefect_cli = os.path.join(os.path.dirname(sys.executable), "prefect")
    process = subprocess.Popen(
        [prefect_cli, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown reaches every child
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with {process.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server on port {port} not healthy within 120 s")
            time.sleep(0.5)

        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}):
            yield PrefectServer(api_url, f"http://127.0.0.1:{port}", str(home), str(log_path))
            # Send this process's queued events and logs while the server still listens.
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for service in (EventsWorker, APILogWorker):
                service.drain_all(timeout=10)
    finally:
        environ.close()
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()
