"""Whole runs (real Ray, moto S3) through the fault-injecting proxy: every image exactly once,
throttling at start-up ridden out, an outage past the budget an honest failed shard."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from models.checkpoints import save_checkpoint
from models.mixer import build_preset
from pipeline.run import RunConfig, run_labeling
from pipeline.storage import open_storage
from tests.fault_proxy import FaultProxy
from tests.pipeline import imagegen

DATE = "2024-05-02"
FAULTS = ("slowdown", "internal", "reset_headers", "reset_body", "delay")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), path)
    return str(path)


def _inputs(bucket: str) -> list[str]:
    """A tar with a repeated key and a two-image sample, and loose images in two folders."""
    storage = open_storage(f"s3://{bucket}")
    jpg = [imagegen.jpeg_bytes(32, 24, seed=i) for i in range(40)]
    members = [("a", {"jpg": jpg[0]}), ("d", {"jpg": jpg[1], "png": imagegen.png_bytes(32, 24)})]
    members += [(f"t{i:02d}", {"jpg": jpg[i]}) for i in range(2, 10)] + [("a", {"jpg": jpg[10]})]
    storage.put_atomic(f"s3://{bucket}/in/s.tar", imagegen.tar_bytes(members))
    keys = ["a", "d", "d.png"] + [f"t{i:02d}" for i in range(2, 10)] + ["a.jpg"]
    for i in range(24):
        rel = f"loose/{'x' if i % 2 else 'y'}/img{i:02d}.jpg"
        storage.put_atomic(f"s3://{bucket}/in/{rel}", jpg[(i + 11) % 40])
        keys.append(rel)
    return keys


def _rows(bucket: str, out: str) -> list[dict]:
    storage = open_storage(f"s3://{bucket}")
    rows = []
    for info in storage.list(f"s3://{bucket}/{out}/date={DATE}"):
        if info.uri.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(storage.get(info.uri))).to_pylist()
    return rows


def _config(bucket: str, model: str, endpoint_url: str, **settings) -> RunConfig:
    """in/ -> out/ of `bucket` through `endpoint_url` (the proxy), small batches and shards."""
    return RunConfig(
        f"s3://{bucket}/in",
        f"s3://{bucket}/out",
        model,
        date=DATE,
        batch_size=4,
        images_per_shard=8,
        s3_endpoint_url=endpoint_url,
        **settings,
    )


def test_every_image_exactly_once_through_20_percent_faults_and_a_startup_burst(
    ray_local, s3_server, s3_bucket, tiny_model
):
    keys = _inputs(s3_bucket)
    with FaultProxy(s3_server.endpoint_url, rate=0.2, faults=FAULTS, seed=3) as proxy:
        proxy.burst(3.0, ("slowdown", "internal"))  # the pre-flight meets a wall of errors
        config = _config(s3_bucket, tiny_model, proxy.endpoint_url, storage_retry_s=20)
        summary = run_labeling(config)
        injected = {k: v for k, v in proxy.counts.items() if k != "requests"}
    print(f"{proxy.counts['requests']} requests, faults {injected}")
    assert sum(injected.values()) >= 5  # seeded: the faults did happen
    assert summary.ok and summary.shards_failed == 0
    rows = _rows(s3_bucket, "out")
    assert Counter(r["key"] for r in rows) == Counter(keys)  # none missing, none twice
    assert all(r["error"] is None for r in rows)
    storage = open_storage(f"s3://{s3_bucket}")
    partition = f"s3://{s3_bucket}/out/date={DATE}"
    assert storage.exists(f"{partition}/_SUCCESS.json")
    assert not storage.exists(f"{partition}/_FAILED.json")
    assert json.loads(storage.get(f"{partition}/_SUCCESS.json"))["images"] == len(keys)


def test_an_outage_past_the_budget_fails_its_shard_honestly_then_a_rerun_completes(
    ray_local, s3_server, s3_bucket, tiny_model
):
    keys = _inputs(s3_bucket)
    tar_keys = [k for k in keys if not k.startswith("loose/")]

    def tar_reads(method: str, path: str) -> bool:
        return method == "GET" and path.split("?")[0].endswith(".tar")

    with FaultProxy(s3_server.endpoint_url, seed=4, matches=tar_reads) as proxy:
        proxy.burst(600, ("internal",))  # the tar stays unreadable for longer than the budget
        config = _config(
            s3_bucket, tiny_model, proxy.endpoint_url, storage_retry_s=1.5, max_attempts=2
        )
        summary = run_labeling(config)
    assert summary.shards_failed == 1 and not summary.ok
    (failed,) = summary.failed_shards
    print(failed)
    assert failed["shard"] == "s" and "S3 is unavailable: InternalError" in failed["error"]
    assert "retried for" in failed["error"]
    rows = _rows(s3_bucket, "out")
    # The tar's images are not silently dropped: none is a row, its shard is in failed_shards.
    assert Counter(r["key"] for r in rows) == Counter(k for k in keys if k not in tar_keys)
    storage = open_storage(f"s3://{s3_bucket}")
    partition = f"s3://{s3_bucket}/out/date={DATE}"
    assert storage.exists(f"{partition}/_FAILED.json")
    assert not storage.exists(f"{partition}/_SUCCESS.json")

    rerun = run_labeling(config.replace(s3_endpoint_url=s3_server.endpoint_url))
    assert rerun.ok and rerun.shards_done == 1 and rerun.shards_skipped == 4
    assert Counter(r["key"] for r in _rows(s3_bucket, "out")) == Counter(keys)
    assert storage.exists(f"{partition}/_SUCCESS.json")
    assert not storage.exists(f"{partition}/_FAILED.json")  # one marker: the latest run's
