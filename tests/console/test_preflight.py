"""Everything checkable is checked before Ray (or torch) starts: one line, the flag named once,
what would be right, nothing created. Real subprocesses of the console's entry point."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from console.main import main as cli_main
from pipeline.local_servers import free_port
from pipeline.preflight import check_endpoint
from pipeline.runspec import RunError

REPO = Path(__file__).resolve().parents[2]
# Runs `mixer-label ARGS` in a fresh interpreter, then reports which heavy modules it imported
# and whether Ray was started: the proof that the refusal came before any of them.
PROBE = """
import json, sys
from console.main import main
code = main(sys.argv[1:])
ray = sys.modules.get("ray")
print(json.dumps({"code": code, "torch": "torch" in sys.modules,
                  "ray_started": bool(ray and ray.is_initialized())}))
"""


def _refused(tmp_path: Path, *argv: str, env: dict | None = None) -> tuple[str, dict]:
    """(the one stderr line, the probe's report) of a `mixer-label` that must refuse."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    lines = result.stderr.strip().splitlines()
    assert report["code"] == 2, result.stderr
    assert len(lines) == 1, f"not one line: {result.stderr!r}"
    assert not report["ray_started"]
    return lines[0], report


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    return tmp_path / "in", tmp_path / "out"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--backend", "tensorflow"],
            "--backend must be one of auto, torch, onnxruntime, tensorrt, not 'tensorflow'",
        ),
        (["--precision", "fp61"], "--precision must be one of auto, fp32, bf16, fp16, int8"),
        (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
        (["--actors", "0"], "--actors must be at least 1, not 0"),
        (["--decode-threads", "0"], "--decode-threads must be at least 1, not 0"),
        (["--date", "2024-13-01"], "--date '2024-13-01' is not a calendar date"),
        (["--model", "B/61"], "--model B/61: no such file, and no preset (presets: S/32,"),
        (["--model", "./mixer-b16.safetensors"], "--model ./mixer-b16.safetensors: no such file"),
        (["--model", "gs://bucket/m.npz"], "--model gs://bucket/m.npz: not a checkpoint file"),
        (["--model", "s3://bucket/"], "--model s3://bucket/: names no object"),
    ],
)
def test_a_wrong_setting_fails_before_torch_or_ray_and_creates_nothing(
    tmp_path, folders, flags, expected
):
    source, out = folders
    argv = ["run", str(source), str(out), "--model", "tiny", *flags]
    line, report = _refused(tmp_path, *argv)
    assert line.startswith("mixer-label run: error: ") and expected in line
    assert not report["torch"], "the check imported torch: it should come before anything heavy"
    assert not out.exists()


def test_an_unknown_preset_gets_the_list_and_the_closest_one(tmp_path, folders):
    source, out = folders
    line, _ = _refused(tmp_path, "run", str(source), str(out), "--model", "B/61")
    assert "S/32, S/16, B/32, B/16, L/32, L/16, H/14" in line and "closest: B/16" in line
    assert line.count("B/61") == 1  # the wrong name once, not "model B/61: B/61: ..."
    line, _ = _refused(tmp_path, "model", "info", "b/61")
    assert line.startswith("mixer-label model: error: b/61: no such file, and no preset")
    assert "closest: B/16" in line


def test_a_folder_is_not_a_checkpoint(tmp_path, folders):
    source, out = folders
    line, _ = _refused(tmp_path, "run", str(source), str(out), "--model", str(source))
    assert line.endswith(f"--model {source}: a folder, not a checkpoint file")


@pytest.mark.parametrize(
    ("input_uri", "output_uri", "expected"),
    [
        ("{tmp}/no-such-folder", "{tmp}/out", "{tmp}/no-such-folder: no such file or folder"),
        ("gs://bucket/in", "{tmp}/out", "gs://bucket/in: unsupported URI scheme 'gs'"),
        ("s3://", "{tmp}/out", "s3://: no bucket name in the URI"),
        ("{tmp}/in", "{tmp}/a-file", "{tmp}/a-file: a file, not a folder for the output"),
    ],
)
def test_wrong_input_or_output_uris_fail_before_torch(
    tmp_path, folders, input_uri, output_uri, expected
):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [u.format(tmp=tmp_path) for u in (input_uri, output_uri)]
    line, report = _refused(tmp_path, "run", *argv, "--model", "tiny")
    assert expected.format(tmp=tmp_path) in line
    assert not report["torch"] and not (tmp_path / "out").exists()


def test_a_refused_s3_endpoint_fails_at_once_with_its_cause(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    line, report = _refused(
        tmp_path,
        *["run", "s3://bucket/in", "s3://bucket/out", "--model", "tiny"],
        *["--s3-endpoint-url", endpoint],
        env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
    )
    assert f"S3 endpoint {endpoint}: connection refused" in line
    assert not report["torch"]
    assert time.monotonic() - started < 60  # generous: a retrying client took 21-26 s


def test_a_name_that_does_not_resolve_is_named_as_dns(tmp_path):
    endpoint = "http://no-such-host.invalid:9000"  # .invalid never resolves (RFC 2606)
    line, _ = _refused(
        tmp_path,
        *["run", "s3://bucket/in", "s3://bucket/out", "--model", "tiny"],
        *["--s3-endpoint-url", endpoint],
        env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
    )
    assert f"S3 endpoint {endpoint}: the name no-such-host.invalid" in line and "DNS" in line


def test_an_endpoint_that_never_answers_is_a_timeout():
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # gets no answer at all, as from a firewalled or dead host.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        held = []
        try:
            for _ in range(4):
                client = socket.socket()
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", port))
                held.append(client)
            time.sleep(0.2)
            with pytest.raises(RunError, match=r"no answer within 1 s \(timeout connecting to"):
                check_endpoint(f"http://127.0.0.1:{port}", timeout_s=1.0)
        finally:
            for client in held:
                client.close()


def test_a_reachable_endpoint_passes(s3_server):
    check_endpoint(s3_server.endpoint_url)


def test_train_names_its_flags(tmp_path, capsys):
    out = tmp_path / "out"
    for flags, expected in [
        (["--preset", "B/61"], "--preset 'B/61' is unknown (presets: S/32"),
        (["--lr", "0"], "--lr must be positive, not 0.0"),
        (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    ]:
        assert cli_main(["train", str(tmp_path), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mixer-label train: error: {expected}")
    assert not out.exists()


def test_train_names_a_missing_data_folder_and_a_refused_endpoint(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    assert cli_main(["train", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mixer-label train: error: {missing}: no such file or folder"
    )
    endpoint = f"http://127.0.0.1:{free_port()}"
    argv = ["train", "s3://bucket/data", "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--s3-endpoint-url", endpoint]) == 2
    assert f"S3 endpoint {endpoint}: connection refused" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
