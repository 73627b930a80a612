"""Drift metrics: PSI against a hand computation, thresholds, missing previous nights."""

from __future__ import annotations

import math

import pytest

from flows.drift import PartitionStats, class_shift_rows, compare, psi, shares, trend_rows


def stats(date: str, counts: dict[str, int], mean: float | None = 0.8) -> PartitionStats:
    return PartitionStats(date=date, class_counts=counts, mean_score=mean)


def test_psi_is_zero_for_the_same_distribution_at_any_scale():
    assert psi({"cat": 10, "dog": 30}, {"cat": 100, "dog": 300}) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_a_hand_computation():
    p, q = [0.5, 0.5], [0.2, 0.8]
    expected = sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert psi({"a": 5, "b": 5}, {"a": 2, "b": 8}) == pytest.approx(expected, rel=1e-3)


def test_psi_is_symmetric_and_finite_when_a_class_appears():
    forward = psi({"a": 10, "b": 10}, {"a": 20})
    assert math.isfinite(forward) and forward > 1.0
    assert forward == pytest.approx(psi({"a": 20}, {"a": 10, "b": 10}))


def test_shares_refuse_an_empty_histogram():
    with pytest.raises(ValueError, match="empty"):
        shares({"a": 0}, ["a"])


def test_compare_without_a_previous_night_reports_nothing():
    report = compare(stats("2024-05-02", {"a": 3}), None)
    assert report.psi is None and report.mean_score_change is None
    assert not report.drifted


def test_compare_stable_nights_do_not_warn():
    report = compare(
        stats("2024-05-02", {"a": 51, "b": 49}, 0.81), stats("2024-05-01", {"a": 50, "b": 50}, 0.8)
    )
    assert report.psi == pytest.approx(0.0004, abs=1e-3)
    assert report.mean_score_change == pytest.approx(0.01)
    assert report.warnings == ()


def test_compare_warns_on_class_shift_and_score_drop_naming_the_previous_date():
    report = compare(
        stats("2024-05-02", {"a": 90, "b": 10}, 0.6), stats("2024-05-01", {"a": 10, "b": 90}, 0.9)
    )
    assert report.drifted
    psi_line, score_line = report.warnings
    assert "PSI" in psi_line and "2024-05-01" in psi_line
    assert "-0.300" in score_line


def test_compare_thresholds_are_configurable():
    current, previous = stats("d2", {"a": 60, "b": 40}), stats("d1", {"a": 50, "b": 50})
    assert not compare(current, previous).drifted
    assert compare(current, previous, psi_threshold=0.01).drifted


def test_class_shift_rows_sort_by_count_and_show_the_change_in_points():
    report = compare(stats("d2", {"a": 1, "b": 3}), stats("d1", {"a": 1, "b": 1, "c": 2}))
    rows = class_shift_rows(report)
    assert [r["class"] for r in rows] == ["b", "a", "c"]
    assert rows[0] == {
        "class": "b",
        "count": 3,
        "share": 0.75,
        "previous_share": 0.25,
        "change_points": 50.0,
    }
    assert rows[2]["count"] == 0 and rows[2]["change_points"] == -50.0


def test_class_shift_rows_without_previous_keep_the_previous_columns_empty():
    rows = class_shift_rows(compare(stats("d2", {"a": 2}), None))
    assert rows == [
        {"class": "a", "count": 2, "share": 1.0, "previous_share": None, "change_points": None}
    ]


def test_trend_rows_newest_first_with_error_share_and_psi_against_the_night_before():
    history = [
        PartitionStats("2024-05-03", {"a": 90, "b": 10}, 0.6, errors=10),
        PartitionStats("2024-05-02", {"a": 50, "b": 50}, 0.8),
        PartitionStats("2024-04-29", {}, None, errors=4),  # every image failed that night
        PartitionStats("2024-04-28", {"a": 50, "b": 50}, 0.8),
    ]
    rows = trend_rows(history)
    assert [r["date"] for r in rows] == ["2024-05-03", "2024-05-02", "2024-04-29", "2024-04-28"]
    assert rows[0]["images"] == 110 and rows[0]["error_pct"] == pytest.approx(9.09)
    assert rows[0]["mean_score"] == 0.6
    assert rows[0]["psi"] == pytest.approx(psi({"a": 90, "b": 10}, {"a": 50, "b": 50}), abs=1e-4)
    assert rows[0]["psi"] > 0.2
    # Against a night with no labeled image, and for the oldest night, there is no PSI.
    assert rows[1]["psi"] is None and rows[2]["psi"] is None and rows[3]["psi"] is None
    assert rows[2] == {
        "date": "2024-04-29",
        "images": 4,
        "error_pct": 100.0,
        "mean_score": None,
        "psi": None,
    }
    assert trend_rows([]) == []
