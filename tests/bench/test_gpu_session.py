"""bench/gpu_session.sh end to end on the CPU (its dry run), with only what a GPU machine has.

The lent GPU machine has python3 with torch, torchvision, numpy and pytest, and none of the
pipeline's services: Ray, Prefect, boto3 and pydantic are made unimportable here, so a step
that reached for one would fail this test, not the one GPU session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "prefect", "boto3", "botocore", "pydantic", "duckdb")


def test_the_session_script_runs_every_step_on_the_cpu(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ABSENT_ON_THE_GPU_MACHINE:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine')\n"
        )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "GPU_SESSION_DEVICE": "cpu",
        "PYTHON": sys.executable,  # the GPU machine's is plain python3
        "PYTHONPATH": str(blocked),
    }
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_session.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    print(done.stdout[-4000:], done.stderr[-2000:])
    assert done.returncode == 0
    for step in ("env", "variants", "bench", "gpu-tests", "gpu-pipeline"):
        assert f"{step}: exit 0" in done.stdout, f"step {step} failed; see {out / step}.log"
    variants = json.loads((out / "variants.json").read_text())
    rows = {r["variant"]: r for r in variants["variants"]}
    assert {"fused-compiled", "fp8-compiled", "fused-compiled-residual-epilogue"} <= set(rows)
    assert not [r for r in rows.values() if "error" in r], rows
    assert all(0 <= r["top1_agreement"] <= 1 and r["min_cosine"] > 0.9 for r in rows.values())
    bench = json.loads((out / "bench.json").read_text())
    assert bench["results"] and all("top1_agreement" in r for r in bench["results"])
    assert "skipped" in (out / "gpu-tests.log").read_text()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT
