"""A node removed from a multi-node Ray cluster mid-run: the run still ends with complete output.

The cluster (ray.cluster_utils.Cluster: a head and two worker nodes) lives in a child process,
tests/pipeline/cluster_scenario.py, so it never shares a Ray connection with the test session.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.checkpoints import save_checkpoint
from models.mixer import build_preset
from pipeline.storage import open_storage
from tests.pipeline import imagegen

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_removing_a_node_mid_run_still_gives_complete_output(s3_server, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}")
    keys = imagegen.write_tar_shards(
        storage, f"s3://{s3_bucket}/in", shards=10, images_per_shard=10, size=(320, 240)
    )
    report = _scenario("cluster_scenario.py", s3_bucket, tmp_path)
    summary = report["summary"]
    assert summary["shards_failed"] == 0 and summary["shards_done"] == 10
    assert summary["actors"] == 2
    lost, shards = report["lost"], report["shards"]
    assert lost["node"] and lost["after"] < 10  # lost mid-run, with shards still to do
    later = shards[lost["after"] :]
    # The lost node labels nothing more; what it held was labeled again on the other one.
    assert later and all(s["node"] != lost["node"] for s in later)
    assert max(s["attempts"] for s in later) >= 2
    rows = [
        key for table in _outputs(storage, s3_bucket) for key in table.column("key").to_pylist()
    ]
    assert Counter(rows) == Counter(keys)


def _scenario(script: str, s3_bucket: str, tmp_path: Path, *extra: str) -> dict:
    """Run tests/pipeline/SCRIPT on s3_bucket's in/ with a tiny model; its RESULT report."""
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), model)
    args = [f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", str(model), "2024-05-02", *extra]
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "pipeline" / script), *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _outputs(storage, s3_bucket: str) -> list:
    """Every Parquet file the run wrote under out/, as pyarrow tables."""
    return [
        pq.read_table(io.BytesIO(storage.get(info.uri)))
        for info in storage.list(f"s3://{s3_bucket}/out")
        if info.uri.endswith(".parquet")
    ]


def _env() -> dict[str, str]:
    """This environment (the S3 server's AWS_* included), with the checkout importable."""
    import os

    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.slow
def test_the_pool_grows_onto_a_node_that_joins_within_max_actors(s3_server, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}")
    keys = imagegen.write_tar_shards(
        storage, f"s3://{s3_bucket}/in", shards=10, images_per_shard=4, size=(64, 48)
    )
    report = _scenario("elastic_scenario.py", s3_bucket, tmp_path)
    summary, first, added = report["summary"], report["first_node"], report["added"]
    assert summary["shards_failed"] == 0 and summary["shards_done"] == 10
    # One actor joined, on one of the two new nodes: max_actors=2 held.
    assert summary["actors"] == 2
    assert max(actors for actors, _ in report["actors_seen"]) == 2
    assert first in summary["nodes"] and len(summary["nodes"]) == 2
    (grown,) = set(summary["nodes"]) - {first}
    assert grown in added and summary["nodes"][grown] >= 1
    assert sum(summary["nodes"].values()) == 10
    # _SUCCESS.json carries the same node -> shards count.
    success = json.loads(storage.get(f"s3://{s3_bucket}/out/date=2024-05-02/_SUCCESS.json"))
    assert success["nodes"] == summary["nodes"]
    assert max(h["actors"] for h in success["pool_history"]) == 2
    # Before the run ended, the actor left idle by the drained queue was stopped (min_actors 1).
    assert success["pool_history"][-1]["actors"] == 1
    # The request: two actors' worth while shards were queued, lowered to nothing at the end.
    requests = report["requests"]
    print(f"requests {requests}; pool {summary['pool_history']}; nodes {summary['nodes']}")
    assert requests[0] == 2 and requests[-1] == 0 and max(requests) == 2, requests
    if report["kv_after"][0] is not None:  # autoscaler v1 reads it from the GCS
        assert report["kv_after"][0] == [{"CPU": 1.0}, {"CPU": 1.0}]
        assert report["kv_after"][-1] == []
    # Every image exactly once; each file names the node and device that labeled it.
    rows, per_node = [], Counter()
    for table in _outputs(storage, s3_bucket):
        rows += table.column("key").to_pylist()
        metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        per_node[metadata["worker_node"]] += 1
        assert metadata["worker_device"]
    assert Counter(rows) == Counter(keys)
    assert dict(per_node) == summary["nodes"]


@pytest.mark.slow
def test_a_run_on_a_cluster_with_no_worker_waits_for_the_node_it_asked_for(
    s3_server, s3_bucket, tmp_path
):
    storage = open_storage(f"s3://{s3_bucket}")
    keys = imagegen.write_tar_shards(
        storage, f"s3://{s3_bucket}/in", shards=4, images_per_shard=3, size=(64, 48)
    )
    report = _scenario("elastic_scenario.py", s3_bucket, tmp_path, "zero")
    summary, (added,) = report["summary"], report["added"]
    assert summary["shards_done"] == 4 and summary["shards_failed"] == 0
    assert summary["nodes"] == {added: 4}  # everything on the node that joined for the run
    history = summary["pool_history"]
    assert history[0]["actors"] == 0 and max(h["actors"] for h in history) == 1
    assert report["requests"][0] == 2 and report["requests"][-1] == 0
    rows = [
        key for table in _outputs(storage, s3_bucket) for key in table.column("key").to_pylist()
    ]
    assert Counter(rows) == Counter(keys)
