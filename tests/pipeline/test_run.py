"""`mixer-label run` end to end: real moto S3 server, real Ray, real JPEG/PNG, real Parquet.

Every input image yields exactly one row; broken images give error rows and never stop the run;
a second run writes nothing; killed runs, killed actors and shards that keep failing still end
with complete output; missing buckets, wrong credentials and unwritable outputs fail fast.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from console.main import main as cli_main
from models.checkpoints import save_checkpoint
from models.mixer import build_preset
from pipeline.run import RunConfig, label_shards, plan_shards, run_labeling
from pipeline.storage import open_storage
from tests.pipeline import imagegen

DATE = "2024-05-01"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(build_preset("tiny"), path)
    return str(path)


def _config(bucket: str, model: str, **changes) -> RunConfig:
    values = {
        "input_uri": f"s3://{bucket}/in",
        "output_uri": f"s3://{bucket}/out",
        "model": model,
        "date": DATE,
        "batch_size": 4,
    }
    return RunConfig(**(values | changes))


def _outputs(bucket: str, prefix: str = "out") -> dict[str, str]:
    """Every object under s3://bucket/prefix: URI → ETag."""
    storage = open_storage(f"s3://{bucket}")
    return {info.uri: info.etag for info in storage.list(f"s3://{bucket}/{prefix}")}


def _rows(bucket: str, prefix: str = "out") -> list[dict]:
    storage = open_storage(f"s3://{bucket}")
    rows = []
    for uri in _outputs(bucket, prefix):
        if uri.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(storage.get(uri))).to_pylist()
    return rows


def _write_good_shards(bucket: str, shards: int, images: int, size=(48, 40)) -> list[str]:
    storage = open_storage(f"s3://{bucket}")
    return imagegen.write_tar_shards(
        storage, f"s3://{bucket}/in", shards=shards, images_per_shard=images, size=size
    )


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_every_image_exactly_once_broken_ones_as_error_rows(
    decode, ray_local, s3_bucket, tiny_model, capsys
) -> None:
    if decode == "device":
        pytest.importorskip("torchvision", reason="--decode device needs the gpu extra")
    storage = open_storage(f"s3://{s3_bucket}")
    keys = _write_good_shards(s3_bucket, shards=3, images=5)
    zoo = imagegen.broken_zoo()
    storage.put_atomic(f"s3://{s3_bucket}/in/zoo.tar", imagegen.tar_bytes(imagegen.zoo_samples()))
    rows_in = [(f"pq-{i}", imagegen.jpeg_bytes(40, 40, seed=i)) for i in range(3)]
    rows_in.append(("pq-missing", None))
    storage.put_atomic(f"s3://{s3_bucket}/in/table.parquet", imagegen.parquet_bytes(rows_in))

    code = cli_main(
        ["run", f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "--model", tiny_model]
        + ["--date", DATE, "--batch-size", "4", "--image-column", "jpg"]
        + ["--embeddings", "--topk", "3", "--no-progress", "--json", "--decode", decode]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    rows = _rows(s3_bucket)
    expected = keys + [f"zoo-{name}" for name in zoo] + [key for key, _ in rows_in]
    assert Counter(r["key"] for r in rows) == Counter(expected)  # each exactly once
    by_key = {r["key"]: r for r in rows}
    for name, item in zoo.items():
        row = by_key[f"zoo-{name}"]
        if item.expect == "ok":
            assert row["error"] is None and row["label"] is not None, name
        else:
            assert row["label"] is None and item.error_contains in row["error"].lower(), name
    assert by_key["pq-missing"]["error"] and by_key["pq-0"]["error"] is None
    for row in rows:  # --embeddings --topk 3: the tiny model's 64 pre-head features
        ok = row["error"] is None
        assert (len(row["embedding"]) == 64) if ok else row["embedding"] is None
        assert (len(row["topk_labels"]) == 3) if ok else row["topk_labels"] is None
    # Ground truth from the tars' .cls files travels to the output.
    assert by_key["img-000007"]["true_label"] == 7
    errors = sum(r["error"] is not None for r in rows)
    assert summary["images"] == len(expected) and summary["errors"] == errors
    # The summary names the first failed files with their reasons, as the rows have them.
    named = {f["file"]: (f["shard"], f["error"]) for f in summary["failed_files"]}
    assert len(named) == min(errors, 20) > 0
    assert all(named[k] == (by_key[k]["shard"], by_key[k]["error"]) for k in named)
    assert summary["shards_done"] == 5 and summary["shards_failed"] == 0
    assert sum(summary["class_counts"].values()) == len(expected) - errors
    objects = _outputs(s3_bucket)
    partition = f"s3://{s3_bucket}/out/date={DATE}"
    assert set(objects) == {f"{partition}/{name}" for name in _names(objects)}
    assert f"{partition}/_SUCCESS.json" in objects
    success = json.loads(storage.get(f"{partition}/_SUCCESS.json"))
    assert success["run_id"] == summary["run_id"]
    # backend/precision auto: measured in the worker, and the summary says by what numbers.
    assert success["auto"]["chose"] == f"{summary['backend']} {summary['precision']}"
    assert success["auto"]["candidates"][0]["precision"] == "fp32"
    assert all("images_per_s" in c and "top1_agreement" in c for c in success["auto"]["candidates"])
    # The file metadata says which model, backend and input made it.
    some = next(uri for uri in objects if uri.endswith("zoo.parquet"))
    metadata = {
        k.decode(): v.decode()
        for k, v in pq.read_metadata(io.BytesIO(storage.get(some))).metadata.items()
    }
    assert metadata["model_sha256"] == summary["model_sha256"]
    assert metadata["input_uri"] == f"s3://{s3_bucket}/in/zoo.tar"
    assert metadata["input_etag"] == storage.head(f"s3://{s3_bucket}/in/zoo.tar").etag
    assert metadata["run_id"] == summary["run_id"] and metadata["backend"]
    assert metadata["code_version"].startswith("0.")
    assert not any("secret" in v.lower() or "testing-" in v for v in metadata.values())


def _names(objects: dict[str, str]) -> list[str]:
    return [uri.rsplit("/", 1)[-1] for uri in objects]


def test_second_run_writes_nothing_and_force_or_a_new_model_relabels(
    ray_local, s3_bucket, tiny_model, tmp_path
) -> None:
    keys = _write_good_shards(s3_bucket, shards=3, images=3)
    config = _config(s3_bucket, tiny_model)
    first = run_labeling(config)
    assert first.shards_done == 3 and first.images == len(keys)
    before = _outputs(s3_bucket)

    again = run_labeling(config)
    assert (again.shards_skipped, again.shards_done, again.images) == (3, 0, 0)
    # It says which model, sha256 and backend made the outputs it found.
    assert (again.model, again.model_sha256) == (first.model, first.model_sha256)
    assert first.backend and (again.backend, again.precision) == (first.backend, first.precision)
    assert _outputs(s3_bucket) == before  # not one object written or rewritten

    forced = run_labeling(config.replace(force=True))
    assert forced.shards_done == 3
    other = tmp_path / "other.safetensors"
    save_checkpoint(build_preset("tiny", seed=1), other)
    relabeled = run_labeling(config.replace(model=str(other)))
    assert relabeled.shards_done == 3  # another model's sha256: not done yet
    assert Counter(r["key"] for r in _rows(s3_bucket)) == Counter(keys)


def test_labeling_starts_while_the_listing_is_still_going(ray_local, s3_bucket, tiny_model):
    _write_good_shards(s3_bucket, shards=2, images=2)
    config = _config(s3_bucket, tiny_model)
    first_done = threading.Event()

    def slow_listing():
        planned = list(plan_shards(config))
        yield planned[0]
        # The rest of the "listing" only arrives once the first shard is labeled: a pool that
        # waited for the whole listing would never get here.
        assert first_done.wait(60), "no shard was labeled while the listing was going on"
        yield from planned[1:]

    summary = label_shards(slow_listing(), config, on_shard_done=lambda r: first_done.set())
    assert summary.shards_done == 2 and summary.first_shard_started_s is not None


def test_actor_killed_mid_shard_still_gives_complete_output(ray_local, s3_bucket, tiny_model):
    keys = _write_good_shards(s3_bucket, shards=8, images=12, size=(320, 240))
    config = _config(s3_bucket, tiny_model, batch_size=1)
    results = []

    def kill_first_worker(result) -> None:
        results.append(result)
        if len(results) == 1:
            os.kill(result.worker_pid, signal.SIGKILL)  # it is already on the next shard

    summary = run_labeling(config, on_shard_done=kill_first_worker)
    assert summary.ok and summary.shards_done == 8
    assert Counter(r["key"] for r in _rows(s3_bucket)) == Counter(keys)
    assert len({r.worker_pid for r in results}) >= 2  # Ray restarted the actor
    assert max(r.attempts for r in results) >= 2  # the shards it held were labeled again


def test_a_shard_that_keeps_failing_is_reported_and_the_rest_finish(
    ray_local, s3_bucket, tiny_model, capsys
) -> None:
    keys = _write_good_shards(s3_bucket, shards=3, images=2)
    config = _config(s3_bucket, tiny_model, max_attempts=2)
    planned = list(plan_shards(config))
    # Gone between listing and labeling: every attempt fails to read it.
    open_storage(planned[1].shard.uri).delete(planned[1].shard.uri)
    summary = label_shards(planned, config)
    assert (summary.shards_done, summary.shards_failed) == (2, 1)
    assert not summary.ok
    failed = summary.failed_shards[0]
    assert failed["shard"] == planned[1].shard.name
    assert planned[1].shard.uri in failed["error"] and "after 2 attempts" in failed["error"]
    assert len(_rows(s3_bucket)) == len(keys) - 2


def test_cli_exits_1_when_a_shard_fails_and_reports_it(
    ray_local, s3_bucket, tiny_model, capsys
) -> None:
    storage = open_storage(f"s3://{s3_bucket}")
    keys = _write_good_shards(s3_bucket, shards=1, images=2)
    # A Parquet shard without any image column cannot be read as configured: it fails at once
    # (no retries for a deterministic error), the tar shard is labeled anyway.
    bad = imagegen.parquet_bytes([("k", b"x")], image_column="caption")
    storage.put_atomic(f"s3://{s3_bucket}/in/no-images.parquet", bad)
    code = cli_main(
        ["run", f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "--model", tiny_model]
        + ["--date", DATE, "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED no-images:" in out and "after 1 attempt)" in out
    assert "1 labeled" in out and "1 failed" in out
    assert Counter(r["key"] for r in _rows(s3_bucket)) == Counter(keys)
    partition = f"s3://{s3_bucket}/out/date={DATE}"
    assert f"{partition}/_FAILED.json" in _outputs(s3_bucket)
    assert f"{partition}/_SUCCESS.json" not in _outputs(s3_bucket)


def test_a_run_killed_half_way_resumes_without_duplicates(ray_local, s3_bucket, tiny_model):
    keys = _write_good_shards(s3_bucket, shards=16, images=8, size=(320, 240))
    address = ray_local.get_runtime_context().gcs_address
    # The installed console script's module: `mixer-label run ...` as a user types it.
    command = [sys.executable, "-m", "console", "run", f"s3://{s3_bucket}/in"]
    command += [f"s3://{s3_bucket}/out", "--model", tiny_model, "--date", DATE]
    command += ["--batch-size", "1", "--ray-address", address, "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(u.endswith(".parquet") for u in _outputs(s3_bucket)):
            assert process.poll() is None, "the run ended before writing anything"
            assert time.monotonic() < deadline, "no shard file appeared within 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    done_before = sum(u.endswith(".parquet") for u in _outputs(s3_bucket))
    assert 1 <= done_before < 16, "the run was not stopped half-way"

    summary = run_labeling(_config(s3_bucket, tiny_model))
    assert summary.shards_skipped >= 1 and summary.shards_total == 16
    assert summary.shards_skipped + summary.shards_done == 16
    assert Counter(r["key"] for r in _rows(s3_bucket)) == Counter(keys)
    partition = f"s3://{s3_bucket}/out/date={DATE}/"
    leftovers = [u for u in _outputs(s3_bucket) if not u.endswith((".parquet", "_SUCCESS.json"))]
    assert leftovers == [], f"partial files under {partition}"


# --- failing fast: one clear line, exit code 2, nothing written, no actor started ------------


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(["run", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_bucket_fails_fast(s3_server, s3_bucket, tiny_model, capsys) -> None:
    start = time.monotonic()
    code, err = _run_cli(
        capsys, "s3://no-such-bucket-4711/in", f"s3://{s3_bucket}/out", "--model", tiny_model
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "no-such-bucket-4711" in err and "does not exist" in err
    assert _outputs(s3_bucket) == {}
    assert time.monotonic() - start < 30


def test_wrong_credentials_fail_fast(s3_auth_server, tiny_model, capsys, monkeypatch) -> None:
    for key, value in s3_auth_server.env("writer", secret="wrong-secret").items():
        monkeypatch.setenv(key, value)
    bucket = s3_auth_server.bucket
    code, err = _run_cli(capsys, f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", tiny_model)
    assert code == 2 and len(err.splitlines()) == 1
    assert "credentials" in err and "wrong-secret" not in err


def test_unwritable_output_fails_fast_and_writes_nothing(
    s3_auth_server, tiny_model, capsys, monkeypatch
) -> None:
    bucket = s3_auth_server.bucket
    for key, value in s3_auth_server.env("writer").items():
        monkeypatch.setenv(key, value)
    storage = open_storage(f"s3://{bucket}")
    storage.put_atomic(f"s3://{bucket}/ro-in/a.tar", imagegen.tar_bytes(imagegen.image_samples(2)))
    for key, value in s3_auth_server.env("reader").items():
        monkeypatch.setenv(key, value)
    code, err = _run_cli(
        capsys, f"s3://{bucket}/ro-in", f"s3://{bucket}/ro-out", "--model", tiny_model
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "ro-out" in err and "writable" in err
    for key, value in s3_auth_server.env("writer").items():
        monkeypatch.setenv(key, value)
    assert list(open_storage(f"s3://{bucket}").list(f"s3://{bucket}/ro-out")) == []


def test_bad_model_and_empty_input_fail_fast(s3_server, s3_bucket, tiny_model, capsys) -> None:
    code, err = _run_cli(
        capsys, f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "--model", "/no/such.safetensors"
    )
    assert code == 2 and "/no/such.safetensors" in err
    code, err = _run_cli(
        capsys, f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "--model", tiny_model
    )
    assert code == 2 and "no image shards" in err and f"s3://{s3_bucket}/in" in err
    code, err = _run_cli(
        capsys,
        f"s3://{s3_bucket}/in",
        f"s3://{s3_bucket}/out",
        "--model",
        tiny_model,
        "--date",
        "2024-13-01",
    )
    assert code == 2 and "2024-13-01" in err
    assert _outputs(s3_bucket) == {}


def test_a_missing_local_input_folder_is_named_as_missing(tmp_path, tiny_model, capsys) -> None:
    missing = tmp_path / "no-such-folder"
    code, err = _run_cli(capsys, str(missing), str(tmp_path / "out"), "--model", tiny_model)
    assert code == 2 and f"{missing}: no such file or folder" in err
    (tmp_path / "empty").mkdir()
    code, err = _run_cli(
        capsys, str(tmp_path / "empty"), str(tmp_path / "out"), "--model", tiny_model
    )
    assert code == 2 and "no image shards" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_unreachable_ray_address_fails_fast() -> None:
    from pipeline.local_servers import free_port
    from pipeline.run import RunError, check_reachable

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RunError, match=f"cannot reach the Ray cluster at {address}"):
        check_reachable(address)
    assert time.monotonic() - start < 10
