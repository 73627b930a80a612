"""Read a date partition of predictions back: labeled images per class and their mean score.

Drift compares whole partitions (shards labeled by earlier runs of the same night included),
so it reads the Parquet files, two columns each, rather than trusting one run's counters.
"""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from flows.drift import TREND_PARTITIONS, PartitionStats

LOOKBACK_DAYS = 7
# The trend looks this far back for its partitions: a nightly job that missed a few nights
# still fills the table, a new output is probed with one listing per day, no more.
TREND_LOOKBACK_DAYS = 2 * TREND_PARTITIONS
_COLUMNS = ["label_name", "score", "error"]


def partition_uri(storage, output_uri: str, date: str) -> str:
    """`OUTPUT/date=YYYY-MM-DD/`, the folder of one night's Parquet files."""
    return storage.join(output_uri, f"date={date}") + "/"


def read_partition_stats(storage, output_uri: str, date: str, threads: int = 8):
    """Class counts and mean score of the labeled rows in one partition; None if it is empty."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uris = [
        info.uri
        for info in storage.list(partition_uri(storage, output_uri, date))
        if info.uri.endswith(".parquet") and not info.uri.rsplit("/", 1)[-1].startswith((".", "_"))
    ]
    if not uris:
        return None

    def one(uri: str) -> tuple[Counter, float, int, int]:
        table = pq.read_table(io.BytesIO(storage.get(uri)), columns=_COLUMNS)
        labeled = table.filter(
            pc.and_(pc.is_null(table["error"]), pc.is_valid(table["label_name"]))
        )
        counts = Counter(
            {
                row["values"]: row["counts"]
                for row in pc.value_counts(labeled["label_name"]).to_pylist()
            }
        )
        errors = table.num_rows - table["error"].null_count
        return counts, float(pc.sum(labeled["score"]).as_py() or 0.0), labeled.num_rows, errors

    counts: Counter = Counter()
    score_sum, labeled, errors = 0.0, 0, 0
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        for part_counts, part_sum, part_n, part_errors in pool.map(one, uris):
            counts.update(part_counts)
            score_sum += part_sum
            labeled += part_n
            errors += part_errors
    mean = score_sum / labeled if labeled else None
    return PartitionStats(date=date, class_counts=dict(counts), mean_score=mean, errors=errors)


def previous_partition_stats(
    storage, output_uri: str, date: str, lookback_days: int = LOOKBACK_DAYS
) -> PartitionStats | None:
    """The latest partition before `date` within `lookback_days` (a skipped night is bridged)."""
    day = dt.date.fromisoformat(date)
    for back in range(1, lookback_days + 1):
        stats = read_partition_stats(
            storage, output_uri, (day - dt.timedelta(days=back)).isoformat()
        )
        if stats is not None and stats.images:
            return stats
    return None


def recent_partition_stats(
    storage,
    output_uri: str,
    date: str,
    partitions: int = TREND_PARTITIONS,
    lookback_days: int = TREND_LOOKBACK_DAYS,
) -> list[PartitionStats]:
    """Up to `partitions` partitions from `date` back (`date` itself first, if it exists)."""
    day = dt.date.fromisoformat(date)
    found = []
    for back in range(lookback_days + 1):
        if len(found) == partitions:
            break
        stats = read_partition_stats(
            storage, output_uri, (day - dt.timedelta(days=back)).isoformat()
        )
        if stats is not None:
            found.append(stats)
    return found


def previous_in(history: list[PartitionStats], date: str, lookback_days: int = LOOKBACK_DAYS):
    """The partition `previous_partition_stats` would pick, from an already read history."""
    day = dt.date.fromisoformat(date)
    for stats in history:
        back = (day - dt.date.fromisoformat(stats.date)).days
        if 1 <= back <= lookback_days and stats.images:
            return stats
    return None
