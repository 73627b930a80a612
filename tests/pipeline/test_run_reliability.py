"""The run's own reliability rules, without Ray: one true marker, one date, no secret, one
storage per run, a footer hiccup that does not relabel."""

from __future__ import annotations

import datetime as dt
import json

import pytest

import pipeline.runspec as runspec
from pipeline.run import (
    FAILED_FILE,
    SUCCESS_FILE,
    RunConfig,
    RunStorages,
    RunSummary,
    plan_shards,
    write_summary,
)
from pipeline.storage import open_storage
from pipeline.writer import ShardTable, to_parquet_bytes
from tests.pipeline import imagegen


def _summary(config: RunConfig, done: int = 1, failed: int = 0) -> RunSummary:
    summary = RunSummary(
        "run-1", config.input_uri, config.output_uri, config.partition_date(), "m", "s"
    )
    summary.shards_done, summary.shards_failed = done, failed
    return summary


def test_one_marker_tells_the_latest_run(tmp_path):
    config = RunConfig(str(tmp_path / "in"), str(tmp_path / "out"), "tiny", date="2024-05-01")
    storages = RunStorages.open(config)
    partition = storages.partition_uri
    names = lambda: sorted(p.name for p in (tmp_path / "out" / "date=2024-05-01").iterdir())  # noqa: E731

    write_summary(config, partition, _summary(config), storages)
    assert names() == [SUCCESS_FILE]
    write_summary(config, partition, _summary(config, done=0, failed=1), storages)
    assert names() == [FAILED_FILE]
    assert (
        json.loads((tmp_path / "out/date=2024-05-01" / FAILED_FILE).read_text())["shards_failed"]
        == 1
    )
    write_summary(config, partition, _summary(config, done=1), storages)
    assert names() == [SUCCESS_FILE]
    # A rerun with nothing to do leaves a true marker alone...
    mtime = (tmp_path / "out/date=2024-05-01" / SUCCESS_FILE).stat().st_mtime_ns
    assert write_summary(config, partition, _summary(config, done=0), storages) is None
    assert (tmp_path / "out/date=2024-05-01" / SUCCESS_FILE).stat().st_mtime_ns == mtime
    # ...but replaces a stale pair (both markers, left by an older version).
    (tmp_path / "out/date=2024-05-01" / FAILED_FILE).write_text("{}")
    assert write_summary(config, partition, _summary(config, done=0), storages) is not None
    assert names() == [SUCCESS_FILE]


def test_the_date_is_read_once_even_across_midnight(monkeypatch):
    days = iter([dt.datetime(2024, 5, 1, 23, 59, 59, tzinfo=dt.timezone.utc)])

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return next(days)  # a second call would raise StopIteration

    monkeypatch.setattr(runspec.dt, "datetime", Clock)
    config = RunConfig("in", "out", "tiny")
    assert config.date == "2024-05-01"
    assert config.partition_date() == "2024-05-01" == config.replace(force=True).partition_date()


SECRET_URIS = [
    ("input_uri", "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI-S3KRIT@bucket/in", "input"),
    ("output_uri", "s3://user:hunter2-S3KRIT@bucket/out", "output"),
    (
        "output_uri",
        "s3://bucket/out?X-Amz-Signature=deadbeefS3KRIT&X-Amz-Credential=AKIAX",
        "output",
    ),
    ("model", "s3://bucket/m.safetensors?X-Amz-Security-Token=tokS3KRIT", "model"),
    ("input_uri", "https://bucket.s3.amazonaws.com/in?Signature=sigS3KRIT", "input"),
    ("s3_endpoint_url", "http://admin:pw-S3KRIT@127.0.0.1:9000", "S3 endpoint"),
    ("compile_cache", "s3://k:S3KRIT@bucket/cache", "compile cache"),
]


@pytest.mark.parametrize(("field", "uri", "what"), SECRET_URIS)
def test_uris_carrying_a_secret_are_refused_redacted(field, uri, what):
    values = {"input_uri": "s3://b/in", "output_uri": "s3://b/out", "model": "tiny", field: uri}
    with pytest.raises(ValueError) as err:
        RunConfig(**values)
    message = str(err.value)
    print(message)
    assert message.startswith(what) and "***" in message and "\n" not in message
    assert "S3KRIT" not in message and "AKIAIOSFODNN7EXAMPLE" not in message


def test_open_storage_refuses_a_secret_uri_and_a_query_prefix():
    from pipeline.storage import StorageError, redact

    for uri in ("s3://AKIAIOSFODNN7EXAMPLE:S3KRIT@b/x", "s3://b/out?X-Amz-Signature=S3KRIT"):
        with pytest.raises(StorageError) as err:
            open_storage(uri)
        assert "S3KRIT" not in str(err.value) and "AKIA" not in str(err.value)
    with pytest.raises(StorageError, match="query string"):
        open_storage("s3://b/out?versionId=3")  # not a secret, still not a prefix
    text = "see http://u:p@h:1/x?a=1&X-Amz-Signature=abc and AKIAIOSFODNN7EXAMPLE"
    assert redact(text) == "see http://***@h:1/x?a=1&X-Amz-Signature=*** and ***"


def test_a_run_opens_its_storages_once(tmp_path, monkeypatch):
    import pipeline.storage as storage_pkg

    source = str(tmp_path / "in")
    imagegen.write_tar_shards(open_storage(source), source, shards=2, images_per_shard=2)
    opened = []
    real = storage_pkg.open_storage
    monkeypatch.setattr(
        storage_pkg, "open_storage", lambda *a, **k: opened.append(a) or real(*a, **k)
    )
    config = RunConfig(source, str(tmp_path / "out"), "tiny", date="2024-05-01")
    storages = RunStorages.open(config)
    from pipeline.run import preflight

    _, shards = preflight(config, storages)
    planned = list(plan_shards(config, "sha", shards, storages))
    write_summary(config, storages.partition_uri, _summary(config), storages)
    assert len(planned) == 2 and len(opened) == 2  # input and output, by RunStorages.open


def test_a_footer_read_that_keeps_failing_never_relabels_a_done_shard(tmp_path):
    from pipeline.shards import list_shards
    from pipeline.storage import StorageUnavailable

    source = str(tmp_path / "in")
    imagegen.write_tar_shards(open_storage(source), source, shards=1, images_per_shard=2)
    config = RunConfig(source, str(tmp_path / "out"), "tiny", date="2024-05-01")
    storages = RunStorages.open(config)
    shard = next(list_shards(storages.input, source))
    table = ShardTable(shard.name, ["a"])
    meta = {"input_etag": shard.etag, "model_sha256": "sha"}
    out_uri = storages.output.join(storages.partition_uri, f"{shard.name}.parquet")
    storages.output.put_atomic(out_uri, to_parquet_bytes(table.to_table(meta)))
    assert next(plan_shards(config, "sha", None, storages)).skip_reason  # done: skipped

    class Flaky(type(storages.output)):
        def get(self, uri, start=None, end=None):
            raise StorageUnavailable(f"{uri}: cannot read: S3 is throttling: SlowDown; retried")

    flaky = RunStorages(storages.input, Flaky(), storages.partition_uri)
    with pytest.raises(StorageUnavailable, match="throttling"):
        list(plan_shards(config, "sha", None, flaky))  # stops: never "labeling again"


def test_a_wrong_endpoint_fails_the_run_preflight_in_seconds(tmp_path, monkeypatch):
    import socket
    import time

    from pipeline.run import RunError, preflight

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = RunConfig(
        "s3://b/in", str(tmp_path / "out"), "tiny", s3_endpoint_url=f"http://127.0.0.1:{port}"
    )
    start = time.monotonic()
    with pytest.raises(RunError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        preflight(config)
    assert time.monotonic() - start < 30  # not the 60 s retry budget


def test_a_reset_while_reading_a_done_footer_is_retried_and_the_shard_skipped(s3_server, s3_bucket):
    from pipeline.shards import list_shards
    from tests.fault_proxy import FaultProxy

    source = f"s3://{s3_bucket}/in"
    imagegen.write_tar_shards(open_storage(source), source, shards=1, images_per_shard=2)

    def footer_reads(method: str, path: str) -> bool:
        return method == "GET" and path.split("?")[0].endswith(".parquet")

    with FaultProxy(s3_server.endpoint_url, matches=footer_reads) as proxy:
        config = RunConfig(
            source, f"s3://{s3_bucket}/out", "tiny", date="2024-05-01",
            s3_endpoint_url=proxy.endpoint_url, storage_retry_s=5,
        )  # fmt: skip
        storages = RunStorages.open(config)
        shard = next(list_shards(storages.input, source))
        meta = {"input_etag": shard.etag, "model_sha256": "sha"}
        out_uri = storages.output.join(storages.partition_uri, f"{shard.name}.parquet")
        table = ShardTable(shard.name, ["a"]).to_table(meta)
        storages.output.put_atomic(out_uri, to_parquet_bytes(table))
        proxy.script = ["reset_body", "reset_headers", "slowdown"]
        (planned,) = list(plan_shards(config, "sha", None, storages))
        assert proxy.counts["reset_body"] == 1 and proxy.counts["slowdown"] == 1
    assert planned.skip_reason  # done, not "unreadable footer, labeling again"


def test_a_shards_read_deadline_grows_with_its_size():
    from pipeline.shards import Shard
    from pipeline.storage import RetryPolicy, StorageOptions
    from pipeline.workers import WorkerSpec, shard_deadline_s

    policy = RetryPolicy(shard_base_s=10, shard_min_bytes_per_s=1000)
    spec = WorkerSpec(model="tiny", storage_options=StorageOptions(retry=policy))
    small = Shard("s3://b/a.tar", "a", "e", 0, "tar")
    big = Shard("s3://b/b.tar", "b", "e", 50_000, "tar")
    assert shard_deadline_s(spec, small) == 10 and shard_deadline_s(spec, big) == 60
    assert shard_deadline_s(WorkerSpec(model="tiny"), big) > 600  # the defaults
