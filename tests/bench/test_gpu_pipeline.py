"""bench/gpu_pipeline.py runs with nothing but torch + torchvision (+ Pillow, numpy).

On a GPU machine it is a step of bench/gpu_session.sh; here it runs on the CPU with the tiny
model, with pyarrow, Ray, Prefect, boto3 and safetensors hidden, so the step cannot rot into
needing the project's full environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_HIDDEN = ("pyarrow", "ray", "prefect", "boto3", "safetensors", "onnxruntime", "sklearn", "moto")
_RUN = """
import runpy, sys
for name in {hidden!r}:
    sys.modules[name] = None  # not on a bare GPU machine
sys.argv = ["gpu_pipeline.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_pipeline.py", run_name="__main__")
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    """This interpreter on `args` in the checkout, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_gpu_pipeline_bench_runs_on_a_bare_python_with_device_and_cpu_decode(tmp_path):
    pytest.importorskip("torchvision", reason="the dev extra installs torchvision")
    out = tmp_path / "gpu-pipeline.json"
    args = ["--model", "tiny", "--device", "cpu", "--images", "48", "--images-per-shard", "16"]
    args += ["--batch-size", "16", "--model-seconds", "0.2", "--repeat", "1", "--stage-images", "8"]
    args += ["--json", str(out)]
    done = _python("-c", _RUN.format(hidden=_HIDDEN), *args)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    for name in ("decode_device", "decode_cpu"):
        run = results[name]
        assert run["images"] == 48 and run["errors"] == 0
        assert run["images_per_s"] > 0 and run["cores_used"] > 0 and run["vs_model_only"] > 0
    assert results["model_only"]["images_per_s"] > 0
    stages = results["stages"]
    assert stages["images"] == 8 and stages["header_check_s"] > 0 and stages["device_decode_s"] > 0
    assert results["shards"]["count"] == 3 and results["spec"]["decode"] == "device"
    assert "decode_device" in done.stdout and "model_only" in done.stdout


def test_bench_pipeline_takes_decode_contenders_and_names_a_wrong_one():
    from bench.pipeline_bench import decode_modes

    assert decode_modes("cpu,device") == ["cpu", "device"]
    assert decode_modes(" device , device") == ["device"]
    with pytest.raises(SystemExit, match="--decode: expected auto, cpu or device"):
        decode_modes("cpu,gpu")


@pytest.mark.slow
def test_bench_pipeline_runs_end_to_end_on_its_own_s3_server(tmp_path):
    # `make bench-pipeline`'s first command, small: its own moto (pipeline.local_servers), a
    # local Ray, `mixer-label run`'s pipeline over the S3 API, and the model-only reference.
    out = tmp_path / "bench-pipeline.json"
    args = ["--model", "tiny", "--images", "16", "--images-per-shard", "8", "--batch-size", "8"]
    args += ["--model-seconds", "0.2", "--repeat", "1", "--skip-raydata", "--decode", "cpu"]
    done = _python("-m", "bench.pipeline_bench", *args, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, default=str)[:1500])
    assert results["ray_init_s"] > 0 and results["model_only"]["images_per_s"] > 0
    run = results["pipeline_by_decode"]["cpu"]
    assert run["images"] == 16 and run["errors"] == 0 and run["images_per_s"] > 0
