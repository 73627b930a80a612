"""What `mixer-label run` prints on a terminal: quiet by default, Ray's notices with -v, and a
summary a person reads, also when a rerun finds every shard already done.

Real subprocesses, each starting its own local Ray on a folder of real JPEG tars.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from console.run import class_lines, model_line, pool_line

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY_BANNER = "Token authentication is enabled"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from models.checkpoints import save_checkpoint
    from models.mixer import build_preset
    from pipeline.storage import LocalStorage
    from tests.pipeline import imagegen

    root = tmp_path_factory.mktemp("run-output")
    imagegen.write_tar_shards(LocalStorage(), str(root / "in"), shards=2, images_per_shard=3)
    save_checkpoint(build_preset("tiny"), root / "tiny.safetensors")
    return root


def run(folder: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [str(BIN / "mixer-label"), "run", str(folder / "in"), str(folder / "out")]
    argv += ["--model", str(folder / "tiny.safetensors"), "--date", "2024-05-01", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_quiet_by_default_verbose_shows_ray_and_a_rerun_names_what_it_found(folder):
    from models.checkpoints import file_sha256

    quiet = run(folder, "--no-progress")
    assert RAY_BANNER not in quiet.stdout + quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr[-2000:]  # nothing but the summary
    assert "6 images, 0 errors" in quiet.stdout and "2 labeled" in quiet.stdout

    # -v: Ray's own notices and log lines come through (the rerun labels nothing new).
    verbose = run(folder, "--no-progress", "-v")
    assert RAY_BANNER in verbose.stderr
    assert "Started a local Ray instance" in verbose.stderr

    sha256 = file_sha256(folder / "tiny.safetensors")
    found = [line for line in verbose.stdout.splitlines() if line.startswith("model: ")]
    assert found == [
        f"model: mixer-tiny-random-seed0, sha256 {sha256}, backend "
        + found[0].split(", backend ", 1)[1]
    ]
    backend = found[0].split(", backend ", 1)[1]
    assert not backend.startswith(("unknown", "None"))
    assert backend.endswith("(of the outputs found: every shard was already done)")


def test_model_line_of_a_run_that_labeled_says_its_own_backend():
    summary = {"model": "m", "model_sha256": "ab" * 32, "backend": "torch", "precision": "fp32"}
    line = model_line({**summary, "shards_done": 2, "shards_skipped": 1})
    assert line == f"model: m, sha256 {'ab' * 32}, backend torch (fp32)"


def test_class_lines_are_a_small_table_of_the_top_classes():
    lines = class_lines({"2": 12, "5": 6, "1": 1, "3": 1, "4": 1, "7": 1, "8": 2})
    assert lines[0] == "top 5 of 7 classes (images, share of the labeled ones):"
    assert lines[1] == "  2  12   50.0%"
    assert lines[2] == "  5   6   25.0%"
    assert lines[3] == "  8   2    8.3%"
    assert len(lines) == 6
    assert class_lines({}) == []
    assert class_lines({"cat": 3})[0] == "classes (images, share of the labeled ones):"


def test_pool_line_says_how_many_actors_and_nodes():
    line = pool_line({"actors": 3, "nodes": {"a" * 56: 4, "b" * 56: 2}})
    assert line.startswith("actors: 3 at most, 2 nodes labeled")
    assert pool_line({"actors": 0}).startswith("actors: 0 at most, 0 nodes labeled")
