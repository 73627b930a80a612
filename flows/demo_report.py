"""What the demo found: its checks of the Parquet predictions, and the summary a person reads.

The checks read every Parquet file of the partition and hold it against the ground truth (the
shards' `.cls` members) and the offline evaluation (`eval.json` of `mixer-label train`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Checks:
    """The Parquet predictions held against the ground truth and the offline evaluation."""

    rows: int = 0
    files: list[str] = field(default_factory=list)
    error_keys: set[str] = field(default_factory=set)
    broken_keys: set[str] = field(default_factory=set)
    missing_keys: list[str] = field(default_factory=list)  # test images without a row
    duplicate_keys: list[str] = field(default_factory=list)
    labeled: int = 0
    correct: int = 0
    eval_correct: int = 0
    eval_labeled: int = 0
    mismatches: list[tuple[str, object, object]] = field(default_factory=list)  # key, ours, eval

    @property
    def accuracy(self) -> float:
        return self.correct / self.labeled if self.labeled else 0.0

    @property
    def eval_accuracy(self) -> float:
        return self.eval_correct / self.eval_labeled if self.eval_labeled else 0.0

    @property
    def errors_are_the_broken_files(self) -> bool:
        return self.error_keys == self.broken_keys

    @property
    def ok(self) -> bool:
        return (
            self.errors_are_the_broken_files
            and not self.missing_keys
            and not self.duplicate_keys
            and not self.mismatches
            and self.labeled == self.eval_labeled
        )

    def problems(self) -> list[str]:
        """One line per failed check."""
        lines = []
        if not self.errors_are_the_broken_files:
            unexpected = sorted(self.error_keys - self.broken_keys)[:5]
            unflagged = sorted(self.broken_keys - self.error_keys)[:5]
            lines.append(
                f"error rows are not the broken files: unexpected {unexpected}, missed {unflagged}"
            )
        if self.missing_keys:
            lines.append(
                f"{len(self.missing_keys)} test image(s) have no row: {self.missing_keys[:5]}"
            )
        if self.duplicate_keys:
            lines.append(
                f"{len(self.duplicate_keys)} key(s) have several rows: {self.duplicate_keys[:5]}"
            )
        if self.mismatches:
            lines.append(
                f"{len(self.mismatches)} prediction(s) differ from the offline "
                f"evaluation (key, parquet, eval): {self.mismatches[:5]}"
            )
        if self.labeled != self.eval_labeled:
            lines.append(
                f"{self.labeled} labeled predictions, the evaluation has {self.eval_labeled}"
            )
        return lines


@dataclass
class DemoReport:
    """Everything the summary prints; `ok` is the verdict."""

    data: dict[str, object]  # the data set manifest
    shards_uri: str
    model_path: Path
    model_name: str
    model_reused: bool
    model_parameters: int
    train_seconds: float | None  # None when reused
    run: dict[str, object]  # the flow's RunSummary.to_dict()
    checks: Checks
    predictions_dir: Path
    output_uri: str
    prefect_ui: str
    prefect_home: Path
    flow_run_id: str | None
    ray_dashboard: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.checks.ok


# --------------------------------------------------------------------------- the checks


def check_predictions(
    partition_uri: str, test_uri: str, model_dir: Path, manifest: dict[str, object]
) -> Checks:
    """Read every Parquet file of the partition and hold it against truth and offline eval."""
    import io

    import pyarrow.parquet as pq

    from pipeline.storage import open_storage
    from pipeline.train import EVAL_FILE, iter_records

    storage = open_storage(partition_uri)
    checks = Checks(broken_keys=set(manifest["broken"]))
    predicted: dict[str, object] = {}
    for info in storage.list(partition_uri):
        if not info.uri.endswith(".parquet"):
            continue
        checks.files.append(info.uri)
        table = pq.read_table(io.BytesIO(storage.get(info.uri)), columns=["key", "label", "error"])
        for key, label, error in zip(
            *(table[c].to_pylist() for c in ("key", "label", "error")), strict=True
        ):
            checks.rows += 1
            if key in predicted:
                checks.duplicate_keys.append(key)
            predicted[key] = label
            if error is not None:
                checks.error_keys.add(key)
    # Ground truth straight from the .cls members of the shards, not from any of our outputs.
    truth = {r.key: r.label for _, r in iter_records(test_uri)}
    checks.missing_keys = sorted(set(truth) - set(predicted))
    labeled = {k: v for k, v in truth.items() if v is not None and predicted.get(k) is not None}
    checks.labeled = len(labeled)
    checks.correct = sum(predicted[k] == v for k, v in labeled.items())
    offline = json.loads((model_dir / EVAL_FILE).read_text())
    eval_labels = {p["key"]: p["label"] for p in offline["predictions"]}
    checks.eval_labeled, checks.eval_correct = offline["labeled_images"], offline["correct"]
    checks.mismatches = [
        (k, predicted.get(k), eval_labels.get(k))
        for k in sorted(set(predicted) | set(eval_labels))
        if predicted.get(k) != eval_labels.get(k)
    ]
    return checks


# --------------------------------------------------------------------------- the summary


def summary_lines(report: DemoReport, s3: bool = False, serve: bool = False) -> list[str]:
    """The summary a newcomer reads: what ran, whether the checks hold, where to look next."""
    c, run, data = report.checks, report.run, report.data
    splits = data["splits"]
    rel = relative
    model = (
        "reused (data and code unchanged)"
        if report.model_reused
        else f"trained in {report.train_seconds:.0f} s"
    )
    tick = {True: "OK", False: "FAILED"}
    broken = ", ".join(sorted(c.broken_keys))
    partition = rel(report.predictions_dir)
    lines = [
        "",
        f"== mixer-label demo: {'all checks passed' if report.ok else 'CHECKS FAILED'} "
        f"({report.seconds:.0f} s) ==",
        f"data         {splits['train']['images']} train / {splits['test']['labeled_images']} "
        f"test digits + {len(c.broken_keys)} broken files, WebDataset tars in "
        f"{rel(report.shards_uri)}/train/ and /test/",
        f"model        {rel(report.model_path)} ({report.model_name}, {report.model_parameters:,} "
        f"parameters), {model}",
        f"run          {run['images']} images in {run['shards_done']} shards, "
        f"{run['errors']} errors, {run['images_per_s']:.1f} images/s "
        f"(backend {run['backend']} {run['precision']}, {run['seconds']:.1f} s)",
        f"errors       {len(c.error_keys)} rows, exactly the broken files: "
        f"{tick[c.errors_are_the_broken_files]} ({broken})",
        f"accuracy     {c.accuracy:.2%} ({c.correct}/{c.labeled}) of the Parquet predictions "
        f"against the .cls ground truth",
        f"vs offline   `mixer-label train` evaluated {c.eval_accuracy:.2%} "
        f"({c.eval_correct}/{c.eval_labeled}); predictions equal image by image: "
        f"{tick[not c.mismatches]} ({len(c.mismatches)} differ)",
        f"predictions  {partition}/ ({len(c.files)} Parquet files + _SUCCESS.json)"
        + (f", copied from {report.output_uri}/" if s3 else ""),
    ]
    lines += [f"PROBLEM      {p}" for p in c.problems()]
    flow_run = f"/runs/flow-run/{report.flow_run_id}" if report.flow_run_id else "/runs"
    home = rel(report.prefect_home)
    if serve:
        lines.append(f"Prefect UI   {report.prefect_ui}{flow_run}")
        if report.ray_dashboard:
            lines.append(
                f"Ray          {report.ray_dashboard} (it asks for Ray's token: "
                "`.venv/bin/ray get-auth-token`)"
            )
    else:
        lines.append(
            f"Prefect UI   `PREFECT_HOME={home} .venv/bin/prefect server start`, then "
            f"http://127.0.0.1:4200{flow_run} (this run is stored in {home}/)"
        )
        lines.append(
            "Ray          the dashboard lives as long as Ray: `mixer-label demo --serve` keeps "
            "it (and the Prefect UI) open until Ctrl+C"
        )
    lines += [
        'query        .venv/bin/python -c "import duckdb; duckdb.sql(\\"SELECT label_name, '
        "count(*) AS images, round(avg(score), 3) AS mean_score FROM read_parquet("
        f"'{partition.rsplit('/', 1)[0]}/*/*.parquet', hive_partitioning = true) "
        'WHERE error IS NULL GROUP BY ALL ORDER BY label_name\\").show()"',
        f"your images  .venv/bin/mixer-label run ./my-images/ ./my-labels/ --model "
        f"{rel(report.model_path)} (or an official Mixer .npz / timm .pth checkpoint)",
        "",
    ]
    return lines


def relative(path: object) -> str:
    """A path relative to the working directory when it lies below it (shorter to read)."""
    text = str(path)
    if "://" in text:
        return text
    with contextlib.suppress(ValueError):
        return str(Path(text).resolve().relative_to(Path.cwd()))
    return text
