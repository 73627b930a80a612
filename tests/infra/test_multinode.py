"""`mixer-label run --ray-address` on a multi-node Ray cluster: spread, lose a node, finish.

The production shape on one machine: a cluster whose head has no CPU slot and two worker
nodes (ray.cluster_utils.Cluster, in tests/infra/multinode_host.py's own process), joined by
address from a separate driver process, the console script, as `ray job submit`, a RayJob or
the compose stack's Prefect worker do. A worker node is killed from outside while shards are
in flight; the run still writes every key exactly once, and running it again writes nothing.

Everything runs in child processes: a process holds one Ray connection, and the test
session's `ray_local` may hold one already.
"""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.checkpoints import save_checkpoint
from models.mixer import build_preset
from pipeline.storage import open_storage
from tests.pipeline import imagegen

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHARDS = 40
DATE = "2024-05-03"

pytestmark = pytest.mark.slow


class ClusterHost:
    """The cluster process: send a command, wait for the line that answers it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "infra" / "multinode_host.py")],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = self.expect("ADDRESS", timeout=180)
        self.workers = self.expect("WORKERS", timeout=30).split()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, f"cluster host exited ({prefix} awaited)"
                continue
            if line.startswith(prefix + " "):
                return line[len(prefix) + 1 :]
        raise TimeoutError(f"cluster host: no {prefix} line within {timeout} s")

    def ask(self, command: str, prefix: str, timeout: float = 60) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.expect(prefix, timeout)

    def close(self) -> None:
        try:
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Started after the S3 server, so the nodes' workers inherit its AWS_* environment."""
    host = ClusterHost()
    try:
        yield host
    finally:
        host.close()


def run_command(cluster: ClusterHost, bucket: str, model: Path) -> list[str]:
    return [
        str(BIN / "mixer-label"),
        "run",
        f"s3://{bucket}/in",
        f"s3://{bucket}/out",
        "--model",
        str(model),
        "--ray-address",
        cluster.address,
        "--date",
        DATE,
        "--batch-size",
        "2",
        "--no-progress",
        "--json",
    ]


def summary_of(stdout: str) -> dict:
    """The JSON summary `--json` prints last (indented, so it starts on a line of its own)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def parquet_outputs(storage, bucket: str) -> dict[str, str]:
    """Output Parquet URI -> ETag."""
    partition = f"s3://{bucket}/out/date={DATE}/"
    return {i.uri: i.etag for i in storage.list(partition) if i.uri.endswith(".parquet")}


def test_run_spreads_over_nodes_survives_losing_one_and_resumes(cluster, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}")
    keys = imagegen.write_tar_shards(
        storage, f"s3://{s3_bucket}/in", shards=SHARDS, images_per_shard=6, size=(160, 120)
    )
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), model)
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        driver = subprocess.Popen(
            run_command(cluster, s3_bucket, model),
            cwd=tmp_path,  # the driver needs nothing from the checkout's working directory
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            # Wait until labeling has started on the cluster, then look at where the actors run.
            deadline = time.monotonic() + 240
            while not parquet_outputs(storage, s3_bucket):
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard labeled within 240 s"
                time.sleep(0.1)
            actors = json.loads(cluster.ask("actors", "ACTORS"))
            removed = cluster.ask("remove", "REMOVED")
            written_when_removed = len(parquet_outputs(storage, s3_bucket))
            still_running = driver.poll() is None
            stdout, _ = driver.communicate(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == 0, log.read_text()[-3000:]

    # Spread: one actor on each worker node, none on the head (it has no CPU slot).
    alive = [a for a in actors if a["state"] == "ALIVE"]
    assert sorted(a["node_id"] for a in alive) == sorted(cluster.workers), actors
    # The node went while shards were still queued on both actors, not after the run.
    assert removed == cluster.workers[1]
    assert still_running and written_when_removed < SHARDS - 4, written_when_removed

    summary = summary_of(stdout)
    assert summary["actors"] == 2
    assert summary["shards_failed"] == 0 and summary["failed_shards"] == []
    assert summary["shards_done"] == SHARDS and summary["images"] == len(keys)
    outputs = parquet_outputs(storage, s3_bucket)
    assert len(outputs) == SHARDS
    rows = []
    for uri in outputs:
        table = pq.read_table(io.BytesIO(storage.get(uri)))
        assert table.column("error").null_count == table.num_rows, uri
        rows += table.column("key").to_pylist()
    assert Counter(rows) == Counter(keys)  # every key exactly once: nothing lost, no duplicate
    assert storage.exists(f"s3://{s3_bucket}/out/date={DATE}/_SUCCESS.json")

    # The same job again (a RayJob retry, a re-triggered flow) finds everything done.
    again = subprocess.run(
        run_command(cluster, s3_bucket, model),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    second = summary_of(again.stdout)
    assert second["shards_skipped"] == SHARDS and second["shards_done"] == 0
    assert parquet_outputs(storage, s3_bucket) == outputs  # same objects, same ETags


def test_reserve_gpus_joins_by_address_and_reports_a_shortfall(cluster):
    script = REPO / "infra" / "ray" / "reserve_gpus.py"
    common = ["--address", cluster.address, "--poll", "0.5"]
    # No autoscaler and no GPU node here: the wait ends with a clear one-line shortfall.
    short = subprocess.run(
        [sys.executable, str(script), "1", "--timeout", "2", *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert short.returncode == 1, short.stderr[-2000:]
    assert "only 0 of 1 GPUs joined within 2 s" in short.stderr
    release = subprocess.run(
        [sys.executable, str(script), "0", *common], capture_output=True, text=True, timeout=120
    )
    assert release.returncode == 0, release.stderr[-2000:]
    assert "released" in release.stdout
