"""Fixtures that start real servers on loopback and clean up after themselves."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from flows.local_prefect import PrefectServerProcess, use_prefect_server
from flows.local_prefect import prefect_server as prefect_server_process
from pipeline.environ import patched_environ
from pipeline.local_servers import local_ray, moto_server


def pytest_configure(config: pytest.Config) -> None:
    # Compiled packages, ONNX exports and engines go to a cache folder: the tests share one of
    # their own, never the user's ~/.cache (set before any Ray worker inherits the environment).
    import tempfile

    os.environ["MIXER_LABEL_CACHE"] = tempfile.mkdtemp(prefix="mixer-label-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(os.environ.pop("MIXER_LABEL_CACHE", ""), ignore_errors=True)


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

    # Two Ray CPUs on any host, so actor plans do not depend on the machine; default store.
    with local_ray(num_cpus=2, object_store_bytes=None):
        yield ray


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServerProcess]:
    """Prefect's API and UI (`prefect server start`) on a free loopback port, with its own
    PREFECT_HOME and sqlite db; PREFECT_API_URL points this process and its children (served
    runs, workers) at it. The whole process group is stopped afterwards."""
    home = tmp_path_factory.mktemp("prefect-home")
    with (
        prefect_server_process(home) as server,
        use_prefect_server(server.wait_until_healthy(), home),
    ):
        yield server
