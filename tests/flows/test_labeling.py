"""The flow's own logic that runs without a server: the partition date of a scheduled run."""

from __future__ import annotations

import datetime as dt

from flows.labeling import partition_date

UTC = dt.timezone.utc


def test_partition_date_is_the_night_in_the_schedule_time_zone():
    # 01:30 in Tokyo on May 2nd is still May 1st in UTC.
    scheduled = dt.datetime(2024, 5, 1, 16, 30, tzinfo=UTC)
    assert partition_date(scheduled, "Asia/Tokyo") == dt.date(2024, 5, 2)
    assert partition_date(scheduled) == dt.date(2024, 5, 1)


def test_partition_date_of_a_late_run_is_the_scheduled_night_not_today():
    scheduled = dt.datetime(2024, 5, 1, 23, 30, tzinfo=UTC)  # 01:30 CEST on May 2nd
    assert partition_date(scheduled, "Europe/Berlin") == dt.date(2024, 5, 2)
    assert partition_date(scheduled, "America/New_York") == dt.date(2024, 5, 1)
