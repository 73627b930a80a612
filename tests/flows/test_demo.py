"""`mixer-label demo` on a small slice: its own Prefect server, a local Ray, the real flow, moto.

The same path as `make demo` and `make demo-s3`, with 300 scans and 4 epochs instead of 1,797
and 12. The checks are redone here independently of the demo's own: the Parquet files are read
with DuckDB (the README's query path) and held against eval.json and the manifest.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flows.demo import MOTO_ENV, DemoOptions, run_demo
from flows.demo_report import Checks

try:  # the labeling workers need a predictor; without one the demo cannot run at all
    from models.backends import create  # noqa: F401
except ImportError as err:
    pytest.skip(f"models.backends.create is not importable: {err}", allow_module_level=True)

SLICE = {"limit": 300, "images_per_shard": 32, "epochs": 4, "dashboard": False}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo") / ".demo"


@pytest.fixture(scope="module")
def local_run(demo_root):
    lines: list[str] = []
    report = run_demo(DemoOptions(root=demo_root, **SLICE), log=lines.append)
    return report, "\n".join(lines)


def _parquet_rows(root, folder: str = "predictions") -> dict[str, tuple]:
    import duckdb

    query = (
        "SELECT key, label, error, date FROM read_parquet("
        f"'{root}/{folder}/*/*.parquet', hive_partitioning = true)"
    )
    rows = duckdb.sql(query).fetchall()
    assert len(rows) == len({r[0] for r in rows}), "a key has several rows"
    return {key: (label, error, date) for key, label, error, date in rows}


def test_local_demo_predictions_equal_the_offline_eval_image_by_image(demo_root, local_run):
    report, output = local_run
    assert report.ok, report.checks.problems()
    manifest = json.loads((demo_root / "shards" / "dataset.json").read_text())
    evaluation = json.loads((demo_root / "model" / "eval.json").read_text())

    rows = _parquet_rows(demo_root)
    assert len(rows) == manifest["splits"]["test"]["images"] == 65
    assert {k for k, (_, error, _) in rows.items() if error} == set(manifest["broken"])
    assert {k: label for k, (label, _, _) in rows.items()} == {
        p["key"]: p["label"] for p in evaluation["predictions"]
    }
    assert {str(date) for _, _, date in rows.values()} == {report.predictions_dir.name[5:]}

    assert report.run["images"] == 65 and report.run["errors"] == 5
    assert report.checks.labeled == evaluation["labeled_images"] == 60
    assert report.checks.correct == evaluation["correct"]
    assert (report.predictions_dir / "_SUCCESS.json").is_file()
    assert not report.model_reused


def test_local_demo_summary_says_what_a_newcomer_needs(demo_root, local_run):
    report, output = local_run
    c = report.checks
    assert "all checks passed" in output
    assert "5 errors" in output and "images/s" in output
    assert "exactly the broken files: OK" in output
    assert f"accuracy     {c.accuracy:.2%} ({c.correct}/{c.labeled})" in output
    assert f"evaluated {c.eval_accuracy:.2%} ({c.eval_correct}/{c.eval_labeled})" in output
    assert "equal image by image: OK (0 differ)" in output
    assert str(report.predictions_dir) in output
    assert f"PREFECT_HOME={demo_root / 'prefect'}" in output and report.flow_run_id in output
    assert "read_parquet(" in output and "mixer-label demo --serve" in output
    # It ends with the one command that labels one's own images, with the demo's model.
    last = output.rstrip().splitlines()[-1]
    assert last.startswith("your images  .venv/bin/mixer-label run ./my-images/ ./my-labels/")
    assert f"--model {report.model_path}" in last


def test_s3_demo_reuses_the_model_and_reads_everything_through_s3(demo_root, local_run):
    model = demo_root / "model" / "model.safetensors"
    before = model.stat().st_mtime_ns
    local_report, _ = local_run
    local_files = {p: p.read_bytes() for p in local_report.predictions_dir.iterdir()}
    lines: list[str] = []
    report = run_demo(DemoOptions(root=demo_root, s3=True, **SLICE), log=lines.append)
    output = "\n".join(lines)
    assert report.ok, report.checks.problems()
    assert report.model_reused and model.stat().st_mtime_ns == before
    assert report.output_uri == "s3://mixer-label-demo/predictions"
    assert all(f.startswith("s3://mixer-label-demo/predictions/date=") for f in report.checks.files)
    assert "copied from s3://mixer-label-demo/predictions/" in output
    secrets = (MOTO_ENV["AWS_ACCESS_KEY_ID"], MOTO_ENV["AWS_SECRET_ACCESS_KEY"])
    assert not any(s in output for s in secrets)
    for path in report.predictions_dir.glob("*.parquet"):
        metadata = str(pq.read_metadata(path).metadata)
        assert not any(s in metadata for s in secrets)
    # Its copy goes to .demo/predictions-s3/, said in the summary, equal to the offline eval;
    # `make demo`'s .demo/predictions/ is left exactly as it was.
    assert (
        report.predictions_dir
        == demo_root.resolve() / "predictions-s3" / local_report.predictions_dir.name
    )
    assert f"predictions  {report.predictions_dir}/" in output
    evaluation = json.loads((demo_root / "model" / "eval.json").read_text())
    rows = _parquet_rows(demo_root, "predictions-s3")
    assert {k: label for k, (label, _, _) in rows.items()} == {
        p["key"]: p["label"] for p in evaluation["predictions"]
    }
    assert {p: p.read_bytes() for p in local_report.predictions_dir.iterdir()} == local_files


def test_checks_fail_loudly_on_a_mismatch():
    checks = Checks(
        error_keys={"broken-a", "digit-0001"},
        broken_keys={"broken-a", "broken-b"},
        labeled=2,
        eval_labeled=2,
        mismatches=[("digit-0002", 3, 8)],
    )
    assert not checks.ok
    problems = "\n".join(checks.problems())
    assert "unexpected ['digit-0001']" in problems and "missed ['broken-b']" in problems
    assert "('digit-0002', 3, 8)" in problems
