"""What a person reads about a run in the Prefect UI: summary, class counts, progress, drift.

Formatting is plain functions over the run summary dict (`RunSummary.to_dict()`) and a
`DriftReport`, tested without a server; `publish_*` and `ShardProgress` send them to Prefect.
Nothing here sees a credential: URIs are shown with any `user:password@` part removed.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from flows.drift import DriftReport, PartitionStats, class_shift_rows, trend_rows

# Artifact keys may hold only lowercase letters, digits and dashes; Prefect keeps one history
# per key, so each output location gets its own.
_KEY_CHARS = re.compile(r"[^a-z0-9]+")
_USERINFO = re.compile(r"(?<=://)[^/@]*@")


def artifact_key(kind: str, output_uri: str) -> str:
    """A stable artifact key for one kind of artifact of one output location."""
    slug = _KEY_CHARS.sub("-", redact_uri(output_uri).lower()).strip("-")
    return f"{kind}-{slug}"[:120].rstrip("-")


def redact_uri(uri: str) -> str:
    """The URI without a `user:password@` part, should anyone have put one there."""
    return _USERINFO.sub("", uri)


def _int(n: Any) -> str:
    return f"{int(n):,}"


def summary_markdown(summary: Mapping[str, Any], drift: DriftReport | None = None) -> str:
    """The run at a glance: status line, drift warning, counts, speed, model, where output went."""
    images, errors = int(summary["images"]), int(summary["errors"])
    failed = int(summary["shards_failed"])
    status = "completed" if failed == 0 else f"**{failed} shard(s) failed**"
    lines = [f"# Labeling run {summary['date']}: {status}", ""]
    if drift is not None:
        lines += [f"> **⚠️ DRIFT WARNING:** {warning}" for warning in drift.warnings]
        if drift.warnings:
            lines.append("")
    error_share = f" ({errors / images:.1%})" if images else ""
    lines += [
        "| what | value |",
        "|---|---|",
        f"| images | {_int(images)} |",
        f"| errors | {_int(errors)}{error_share} |",
        f"| images/s | {float(summary['images_per_s']):,.1f} |",
        f"| labeling time | {float(summary['seconds']):,.1f} s |",
        f"| shards | {_int(summary['shards_total'])} total, {_int(summary['shards_done'])} labeled,"
        f" {_int(summary['shards_skipped'])} skipped (already done), {_int(failed)} failed |",
        f"| model | `{summary['model']}` |",
        f"| model sha256 | `{summary['model_sha256']}` |",
        f"| backend | {summary.get('backend') or '-'} ({summary.get('precision') or '-'}) |",
        *auto_lines(summary.get("auto")),
        f"| input | `{redact_uri(str(summary['input_uri']))}` |",
        f"| output | `{redact_uri(str(summary.get('partition_uri') or summary['output_uri']))}` |",
        f"| run id | `{summary['run_id']}` |",
    ]
    lines += pool_markdown(summary)
    if drift is not None:
        lines += ["", *drift_markdown(drift).splitlines()]
    failed_shards = summary.get("failed_shards") or []
    if failed_shards:
        lines += ["", "## Failed shards", ""]
        lines += [f"- `{item['shard']}`: {item['error']}" for item in failed_shards]
    lines += failed_files_markdown(summary)
    return "\n".join(lines) + "\n"


POOL_ROWS_SHOWN = 10  # first and last changes of the pool shown in the summary


def pool_markdown(summary: Mapping[str, Any]) -> list[str]:
    """Rows for the actors and nodes (peak) and a section with the pool's size over time."""
    nodes = summary.get("nodes") or {}
    history = summary.get("pool_history") or []
    peak_nodes = max((int(h["nodes"]) for h in history), default=len(nodes))
    lines = [
        f"| actors | {_int(summary.get('actors') or 0)} at most, on {_int(peak_nodes)} node(s) |",
        f"| nodes that labeled | {_int(len(nodes))} |",
    ]
    if len(history) < 2:
        return lines
    lines += ["", "## Actors and nodes over time", "", "| time | actors | nodes |", "|---|---|---|"]
    rows = [f"| {float(h['t_s']):,.1f} s | {h['actors']} | {h['nodes']} |" for h in history]
    if len(rows) > 2 * POOL_ROWS_SHOWN:  # a churning cluster: its start and its end
        skipped = len(rows) - 2 * POOL_ROWS_SHOWN
        rows = [*rows[:POOL_ROWS_SHOWN], f"| ({skipped} changes) | | |", *rows[-POOL_ROWS_SHOWN:]]
    return lines + rows


def auto_lines(auto: Mapping[str, Any] | None) -> list[str]:
    """The table row saying what `auto` chose and the measurements it chose by."""
    if not auto:
        return []
    measured = ", ".join(
        f"{c['backend']} {c['precision']} {float(c['images_per_s']):.1f} img/s top-1 "
        f"{100 * float(c['top1_agreement']):.1f}%{'' if c.get('passed') else ' (failed)'}"
        for c in auto.get("candidates", ())
    )
    return [f"| auto | chose {auto.get('chose')} ({auto.get('source')}): {measured} |"]


def failed_files_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The first failed images with their reasons, and how many more the Parquet files hold."""
    failed = summary.get("failed_files") or []
    if not failed:
        return []
    errors = int(summary["errors"])
    title = f"first {len(failed)} of {errors:,}" if errors > len(failed) else f"{errors:,}"
    lines = ["", f"## Failed files ({title})", ""]
    lines += [f"- `{item['file']}` in `{item['shard']}`: {item['error']}" for item in failed]
    if errors > len(failed):
        lines += ["", "Every one is a row with an `error` in the Parquet files."]
    return lines


def drift_markdown(drift: DriftReport) -> str:
    """The drift section: PSI and mean score against the previous partition, or why not."""
    previous = drift.previous
    if previous is None:
        lines = ["## Drift", "", "No earlier partition to compare with."]
        return "\n".join(lines + trend_markdown(drift.history)) + "\n"
    lines = [f"## Drift against {previous.date}", ""]
    if drift.psi is None:
        lines.append(f"Not computed: {previous.date} or this night has no labeled image.")
        return "\n".join(lines + trend_markdown(drift.history)) + "\n"
    lines += [
        "| | this night | previous | change | threshold |",
        "|---|---|---|---|---|",
        f"| labeled images | {_int(drift.current.images)} | {_int(previous.images)} | | |",
        f"| class PSI | {drift.psi:.4f} | | | {drift.psi_threshold:g} |",
    ]
    if drift.mean_score_change is not None:
        lines.append(
            f"| mean score | {drift.current.mean_score:.4f} | {previous.mean_score:.4f} "
            f"| {drift.mean_score_change:+.4f} | ±{drift.score_change_threshold:g} |"
        )
    lines += ["", "**Drift warning.**" if drift.drifted else "Within thresholds."]
    lines += trend_markdown(drift.history)
    return "\n".join(lines) + "\n"


def trend_markdown(history: Sequence[PartitionStats]) -> list[str]:
    """The last nights, newest first: images, error %, mean score, PSI against the night before."""
    if not history:
        return []

    def number(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "",
        f"### Last {len(history)} night(s)",
        "",
        "| night | images | error % | mean score | PSI against the night before |",
        "|---|---|---|---|---|",
    ]
    for row in trend_rows(history):
        lines.append(
            f"| {row['date']} | {_int(row['images'])} | {number(row['error_pct'], '.2f')} "
            f"| {number(row['mean_score'], '.4f')} | {number(row['psi'], '.4f')} |"
        )
    return lines


def class_count_rows(
    class_counts: Mapping[str, int], drift: DriftReport | None = None
) -> list[dict[str, object]]:
    """One row per class, most frequent first; the previous night's share and the change in
    points, None when there is no previous night (or no drift report)."""
    if drift is not None:
        return class_shift_rows(drift)
    total = sum(class_counts.values())
    ordered = sorted(class_counts.items(), key=lambda item: (-item[1], item[0]))
    return [
        {
            "class": name,
            "count": n,
            "share": round(n / total, 4) if total else 0.0,
            "previous_share": None,
            "change_points": None,
        }
        for name, n in ordered
    ]


def class_table_description(date: str, drift: DriftReport | None) -> str:
    """The class table's title: which night its previous_share column is from, if any."""
    previous = drift.previous if drift is not None else None
    if previous is None or not previous.images:
        return f"Predicted classes on {date} (no earlier night to compare with)"
    return (
        f"Predicted classes on {date}: share, the share on {previous.date} (previous_share) "
        "and the change in percentage points"
    )


def publish_run_artifacts(
    summary: Mapping[str, Any], drift: DriftReport | None, output_uri: str
) -> dict[str, UUID]:
    """Create the summary (markdown) and class-count (table) artifacts; returns their ids.

    `output_uri` is the output root (not the date partition): it names the artifact keys, so
    each night adds a version to the same keys.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    output = output_uri
    date = summary["date"]
    ids = {
        "summary": create_markdown_artifact(
            markdown=summary_markdown(summary, drift),
            key=artifact_key("labeling-summary", output),
            description=f"Labeling run {date}: images, errors, speed, model, drift",
        )
    }
    rows = class_count_rows(summary.get("class_counts") or {}, drift)
    if rows:
        ids["class_counts"] = create_table_artifact(
            table=rows,
            key=artifact_key("class-counts", output),
            description=class_table_description(date, drift),
        )
    return ids


class ShardProgress:
    """The run's progress artifact and one log line per finished shard, from ProgressEvents.

    An `on_progress` callback (pipeline.progress): the artifact shows images done of the total,
    shards, errors, img/s and ETA, updated at most every `min_interval_s` (ten thousand small
    shards must not mean ten thousand API calls) and always at the end; `logger` (the flow
    run's) gets "shard 12/340: 1,000 images, 3 errors, 9,800 img/s (NAME)" per labeled or
    failed shard. Skipped shards are counted, not logged: plan-shards already said how many.
    """

    def __init__(
        self, shards: int, output_uri: str, logger: Any = None, min_interval_s: float = 1.0
    ) -> None:
        from prefect.artifacts import create_progress_artifact

        self._logger = logger
        self._lock = threading.Lock()
        self._min_interval_s = min_interval_s
        self._last_update = -math.inf
        self.description = f"starting: {shards:,} shards planned"
        self.artifact_id = create_progress_artifact(
            progress=100.0 if shards == 0 else 0.0,
            key=artifact_key("labeling-progress", output_uri),
            description=self.description,
        )

    def __call__(self, event: Any) -> None:
        from prefect.artifacts import update_progress_artifact

        result = event.result
        if self._logger is not None and result is not None and not result.skipped:
            log = self._logger.warning if result.failed else self._logger.info
            log(event.shard_line())
        finished = event.listing_done and event.shards_done == event.shards_total
        with self._lock:
            now = time.monotonic()
            if not finished and now - self._last_update < self._min_interval_s:
                return
            self._last_update = now
            self.description = event.describe()
            update_progress_artifact(
                self.artifact_id, progress=100.0 * event.fraction, description=self.description
            )
