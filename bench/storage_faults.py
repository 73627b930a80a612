"""Labeling runs through a fault-injecting S3 proxy: images in, rows out, missing, duplicated,
misattributed, per fault rate.

    python -m bench.storage_faults [--images 160] [--budget 20]

Starts a moto S3 server and the loopback fault proxy of tests/fault_proxy.py in front of it,
writes tar shards and loose-image folders of small distinct JPEGs, labels them once without
faults (the reference: each key's top-1 label and score), then once per scenario through the
proxy into a fresh output prefix. A row is misattributed when its key's prediction differs from
the reference (another image's bytes under that key). Needs the dev extra (moto, Ray).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

SCENARIOS = (
    ("no faults", {"rate": 0.0}),
    ("5% faults", {"rate": 0.05}),
    ("20% faults", {"rate": 0.20}),
    ("100% burst, 6 s", {"rate": 0.05, "burst_s": 6.0}),
    ("2% trickle", {"rate": 0.02, "faults": ("trickle",)}),
    ("100% burst, 6 s, mid-run", {"rate": 0.05, "burst_after": 40, "burst_s": 6.0}),
    ("tars unreadable past the budget", {"rate": 0.0, "outage": ".tar", "max_attempts": 2}),
)
FAULTS = ("slowdown", "internal", "reset_headers", "reset_body", "delay")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _moto():
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _inputs(storage, bucket: str, images: int) -> dict[str, str]:
    """Half the images in tar shards, half as loose files in two folders: key -> shard name."""
    import tarfile

    from tests.pipeline import imagegen

    keys: dict[str, str] = {}
    half = images // 2
    per_tar = max(1, half // 4)
    for shard in range(4):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for i in range(shard * per_tar, (shard + 1) * per_tar):
                data = imagegen.jpeg_bytes(40, 32, seed=i)
                info = tarfile.TarInfo(f"t{i:05d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                keys[f"t{i:05d}"] = f"tars__shard-{shard}"
        storage.put_atomic(f"s3://{bucket}/in/tars/shard-{shard}.tar", out.getvalue())
    for i in range(images - 4 * per_tar):
        folder = "cats" if i % 2 else "dogs"
        rel = f"loose/{folder}/l{i:05d}.jpg"
        storage.put_atomic(f"s3://{bucket}/in/{rel}", imagegen.jpeg_bytes(40, 32, seed=10_000 + i))
        keys[rel] = ""  # its virtual shard's name comes from the listing (_shard_names)
    return keys


def _shard_names(storage, input_uri: str, keys: dict[str, str], per_shard: int) -> None:
    from pipeline.shards import list_shards

    for shard in list_shards(storage, input_uri, per_shard):
        for rel in shard.members:
            keys[rel] = shard.name


def _rows(storage, partition: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for info in storage.list(partition):
        if info.uri.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(storage.get(info.uri))).to_pylist()
    return rows


def _run(config, endpoint: str, budget: float, window: float):
    import pipeline.run as run_module
    from pipeline.storage import RetryPolicy, StorageOptions

    # The bench shortens the read window (default 30 s) so a trickle costs seconds, not half a
    # minute per read; RunConfig exposes only the budget.
    policy = RetryPolicy(budget_s=budget, window_s=window, min_bytes_per_s=4096)
    original = run_module._storage_options
    run_module._storage_options = lambda c: StorageOptions(endpoint_url=endpoint, retry=policy)
    try:
        return run_module.run_labeling(config)
    finally:
        run_module._storage_options = original


def _burst_later(proxy, after_requests: int, seconds: float) -> None:
    """Start a burst of failures once the run has made `after_requests` requests."""
    import threading

    def watch() -> None:
        deadline = time.monotonic() + 600
        while proxy.counts["requests"] < after_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.burst(seconds, ("slowdown", "internal", "reset_body"))

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--budget", type=float, default=20.0, help="storage retry budget, s")
    parser.add_argument("--window", type=float, default=2.0, help="read progress window, s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset
    from pipeline.run import RunConfig, ray_session
    from pipeline.storage import S3Storage, StorageOptions
    from tests.fault_proxy import FaultProxy

    results = []
    with _moto() as endpoint, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL_S3=endpoint,
        )
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        direct = S3Storage(StorageOptions(endpoint_url=endpoint))
        direct.client.create_bucket(Bucket=bucket)
        keys = _inputs(direct, bucket, args.images)
        per_shard = max(1, args.images // 8)
        _shard_names(direct, f"s3://{bucket}/in", keys, per_shard)
        model = Path(tmp) / "tiny.safetensors"
        save_checkpoint(build_preset("tiny"), model)
        base = dict(input_uri=f"s3://{bucket}/in", model=str(model), batch_size=16)
        base |= dict(images_per_shard=per_shard, date="2024-05-01")
        with ray_session(None):
            reference_config = RunConfig(output_uri=f"s3://{bucket}/reference", **base)
            _run(reference_config, endpoint, args.budget, args.window)
            partition = f"s3://{bucket}/reference/date=2024-05-01"
            reference = {r["key"]: (r["label"], r["score"]) for r in _rows(direct, partition)}
            assert len(reference) == len(keys), (len(reference), len(keys))
            for name, scenario in SCENARIOS:
                faults = scenario.get("faults", FAULTS)
                suffix = scenario.get("outage")
                with FaultProxy(
                    endpoint,
                    rate=scenario["rate"],
                    faults=faults,
                    seed=args.seed,
                    trickle_interval_s=0.5,
                    trickle_max_s=60,
                    matches=(
                        (lambda m, p, x=suffix: m == "GET" and p.split("?")[0].endswith(x))
                        if suffix
                        else None
                    ),
                ) as proxy:
                    if suffix:
                        proxy.burst(3600, ("internal",))
                    elif scenario.get("burst_after"):
                        _burst_later(proxy, scenario["burst_after"], scenario["burst_s"])
                    elif scenario.get("burst_s"):
                        proxy.burst(scenario["burst_s"], ("slowdown", "internal", "reset_body"))
                    out = f"s3://{bucket}/out-{len(results)}"
                    attempts = {"max_attempts": scenario.get("max_attempts", 3)}
                    config = RunConfig(output_uri=out, **(base | attempts))
                    start = time.monotonic()
                    error = None
                    try:
                        summary = _run(config, proxy.endpoint_url, args.budget, args.window)
                    except Exception as err:  # a run that could not even start counts too
                        summary, error = None, f"{type(err).__name__}: {err}"
                    seconds = time.monotonic() - start
                    injected = {k: v for k, v in proxy.counts.items() if k != "requests"}
                    requests = proxy.counts["requests"]
                rows = _rows(direct, f"{out}/date=2024-05-01")
                counts = Counter(r["key"] for r in rows)
                labeled = {r["key"]: (r["label"], r["score"]) for r in rows if r["error"] is None}
                wrong = sum(
                    1
                    for k, (label, score) in labeled.items()
                    if k in reference
                    and (label != reference[k][0] or abs(score - reference[k][1]) > 1e-4)
                )
                missing = set(keys) - set(counts)
                failed = {f["shard"] for f in summary.failed_shards} if summary else set()
                results.append(
                    {
                        "scenario": name,
                        "images_in": len(keys),
                        "rows_out": len(rows),
                        "missing": len(missing),
                        # Missing images whose shard is not in failed_shards: a silent drop.
                        "silently_missing": sum(1 for k in missing if keys[k] not in failed),
                        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
                        "misattributed": wrong,
                        "error_rows": sum(1 for r in rows if r["error"] is not None),
                        "shards_failed": summary.shards_failed if summary else None,
                        "run_error": error,
                        "requests": requests,
                        "faults": injected,
                        "seconds": round(seconds, 1),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    print()
    print(
        "| scenario | images in | rows out | missing | of which silently | duplicated "
        "| misattributed | error rows | shards failed | requests | faults injected | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        injected = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items())) or "-"
        print(
            f"| {r['scenario']} | {r['images_in']} | {r['rows_out']} | {r['missing']} "
            f"| {r['silently_missing']} | {r['duplicated']} | {r['misattributed']} "
            f"| {r['error_rows']} "
            f"| {r['shards_failed'] if r['run_error'] is None else r['run_error']} "
            f"| {r['requests']} | {injected} | {r['seconds']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    # Missing images are fine only inside a shard the summary names as failed.
    clean = all(
        r["silently_missing"] == r["duplicated"] == r["misattributed"] == 0 for r in results
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
