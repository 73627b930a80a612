"""Drift between two nights of predictions: class-distribution PSI and mean score change.

Pure functions over counts and means, so they are tested without Prefect, Ray or storage.
PSI (population stability index) = sum over classes of (p - q) * ln(p / q), where p and q are
the class shares of this night and the previous one. Rule of thumb: < 0.1 stable, 0.1-0.25
a moderate shift, > 0.25 a large one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# A class absent on one night would make ln(p / q) infinite; smooth empty shares with this.
EPSILON = 1e-4
PSI_THRESHOLD = 0.2
SCORE_CHANGE_THRESHOLD = 0.05
TREND_PARTITIONS = 14  # nights in the drift trend table


@dataclass(frozen=True)
class PartitionStats:
    """What drift needs from one date partition: labeled images per class and their mean score."""

    date: str
    class_counts: Mapping[str, int]
    mean_score: float | None  # None when the partition has no labeled image
    errors: int = 0  # rows that could not be labeled

    @property
    def images(self) -> int:
        """Labeled images (error rows not counted)."""
        return sum(self.class_counts.values())

    @property
    def rows(self) -> int:
        """Every image of the night: labeled ones and error rows."""
        return self.images + self.errors


@dataclass(frozen=True)
class DriftReport:
    """This night against the previous one; `warnings` is empty when nothing crossed a threshold."""

    current: PartitionStats
    previous: PartitionStats | None
    psi: float | None
    mean_score_change: float | None
    psi_threshold: float = PSI_THRESHOLD
    score_change_threshold: float = SCORE_CHANGE_THRESHOLD
    warnings: tuple[str, ...] = field(default=())
    # The latest partitions, this night first: the trend table (empty when not read).
    history: tuple[PartitionStats, ...] = field(default=())

    @property
    def drifted(self) -> bool:
        return bool(self.warnings)


def shares(
    counts: Mapping[str, int], classes: Iterable[str], epsilon: float = EPSILON
) -> list[float]:
    """Each class's share of the total in the order of `classes`; empty ones get epsilon."""
    classes = list(classes)
    total = sum(max(0, counts.get(name, 0)) for name in classes)
    if total == 0:
        raise ValueError("cannot take shares of an empty class distribution")
    raw = [max(0, counts.get(name, 0)) / total for name in classes]
    smoothed = [max(share, epsilon) for share in raw]
    norm = sum(smoothed)
    return [share / norm for share in smoothed]


def psi(current: Mapping[str, int], previous: Mapping[str, int], epsilon: float = EPSILON) -> float:
    """Population stability index between two class-count histograms (0 = identical)."""
    classes = sorted(set(current) | set(previous))
    p = shares(current, classes, epsilon)
    q = shares(previous, classes, epsilon)
    return float(sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True)))


def compare(
    current: PartitionStats,
    previous: PartitionStats | None,
    psi_threshold: float = PSI_THRESHOLD,
    score_change_threshold: float = SCORE_CHANGE_THRESHOLD,
) -> DriftReport:
    """Drift of `current` against `previous`, with a warning for each threshold crossed."""
    if previous is None or previous.images == 0 or current.images == 0:
        return DriftReport(current, previous, None, None, psi_threshold, score_change_threshold)
    index = psi(current.class_counts, previous.class_counts)
    change = None
    if current.mean_score is not None and previous.mean_score is not None:
        change = current.mean_score - previous.mean_score
    warnings = []
    if index > psi_threshold:
        warnings.append(
            f"class distribution drifted: PSI {index:.3f} > {psi_threshold:g} "
            f"against {previous.date}"
        )
    if change is not None and abs(change) > score_change_threshold:
        warnings.append(
            f"mean score moved {change:+.3f} (from {previous.mean_score:.3f} to "
            f"{current.mean_score:.3f}; threshold ±{score_change_threshold:g}) "
            f"against {previous.date}"
        )
    return DriftReport(
        current, previous, index, change, psi_threshold, score_change_threshold, tuple(warnings)
    )


def class_shift_rows(report: DriftReport) -> list[dict[str, object]]:
    """Per class: count and share tonight, share the previous night, and the change in points.

    The previous night's columns are always there (None without a previous night), so the
    table has the same columns every night.
    """
    current = report.current
    previous = report.previous
    if previous is not None and not previous.images:
        previous = None
    classes = set(current.class_counts) | set(previous.class_counts if previous else {})
    rows = []
    for name in sorted(classes, key=lambda c: (-current.class_counts.get(c, 0), c)):
        count = current.class_counts.get(name, 0)
        share = count / current.images if current.images else 0.0
        row: dict[str, object] = {"class": name, "count": count, "share": round(share, 4)}
        row["previous_share"] = row["change_points"] = None
        if previous is not None:
            before = previous.class_counts.get(name, 0) / previous.images
            row["previous_share"] = round(before, 4)
            row["change_points"] = round(100 * (share - before), 2)
        rows.append(row)
    return rows


def trend_rows(history: Sequence[PartitionStats]) -> list[dict[str, object]]:
    """One row per night, newest first: images, error %, mean score, PSI against the row below.

    PSI compares each night with the next older partition in `history` (a skipped night is
    bridged); None where either has no labeled image, or for the oldest night shown.
    """
    rows = []
    for i, night in enumerate(history):
        older = history[i + 1] if i + 1 < len(history) else None
        index = None
        if older is not None and older.images and night.images:
            index = round(psi(night.class_counts, older.class_counts), 4)
        rows.append(
            {
                "date": night.date,
                "images": night.rows,
                "error_pct": round(100 * night.errors / night.rows, 2) if night.rows else None,
                "mean_score": None if night.mean_score is None else round(night.mean_score, 4),
                "psi": index,
            }
        )
    return rows
