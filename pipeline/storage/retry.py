"""The one retry policy of every remote storage call: a time budget, not a count.

A call (list page, head, get, ranged get, put, multipart part, delete, the write probe) that
fails for a transient reason (throttling, a 5xx, a reset, a timeout, a stalled body) is tried
again after a jittered, growing pause until `budget_s` has passed since the first failure; then
it raises StorageUnavailable naming the reason and the time spent ("S3 is throttling: SlowDown;
retried for 60 s"). A body read that made real progress since the failure restarts the clock, so
a long download is not cut short by a few resets spread over it.

Reads also have a progress deadline: fewer than `min_bytes_per_s` over `window_s` (a trickle)
counts as a transient failure, so the read is abandoned and resumed; a read that gets no byte at
all for `window_s` hits the socket timeout. Pure Python: no boto3 here.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from pipeline.storage.errors import StorageUnavailable


@dataclass(frozen=True)
class RetryPolicy:
    """How long storage calls keep trying; picklable, travels in StorageOptions to workers.

    budget_s: how long one call keeps retrying transient failures before it gives up.
    window_s: the progress window of a read; also the socket read timeout.
    min_bytes_per_s: a read slower than this over a whole window is abandoned and resumed.
    unreachable_s: how long an endpoint that refuses connections is retried; None: budget_s.
      Pre-flight checks set it short, so a wrong endpoint fails in seconds.
    shard_base_s, shard_min_bytes_per_s: a shard's reads stop retrying after
      shard_base_s + size / shard_min_bytes_per_s (see shard_deadline_s).
    """

    budget_s: float = 60.0
    window_s: float = 30.0
    min_bytes_per_s: float = 16 * 1024
    unreachable_s: float | None = None
    first_delay_s: float = 0.1
    max_delay_s: float = 5.0
    shard_base_s: float = 600.0
    shard_min_bytes_per_s: float = 64 * 1024

    def shard_deadline_s(self, size: int) -> float:
        """How long reading a shard of `size` bytes may take, retries included: a base (model
        load, small shards) plus the time at a rate far below any working store."""
        return self.shard_base_s + max(0, size) / self.shard_min_bytes_per_s

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.window_s <= 0 or self.min_bytes_per_s < 0:
            raise ValueError(
                "storage retry budget and read window must be positive, "
                f"not budget_s={self.budget_s}, window_s={self.window_s}"
            )


@dataclass(frozen=True)
class Transient:
    """Why an attempt failed in a way worth retrying.

    kind: "throttled" (SlowDown, 503 Slow Down), "unavailable" (5xx), "unreachable" (no
    connection made), "broken" (reset, timeout, short body), "stalled" (below the minimum rate).
    detail: a code or an exception name, never request data.
    """

    kind: str
    detail: str

    def describe(self) -> str:
        if self.kind == "unreachable":
            return f"cannot reach the S3 endpoint {self.detail}"
        what = {
            "throttled": "S3 is throttling",
            "unavailable": "S3 is unavailable",
            "unreachable": "cannot reach the S3 endpoint",
            "broken": "the connection broke",
            "stalled": "the read stalled",
        }.get(self.kind, self.kind)
        return f"{what}: {self.detail}"


class RetryClock:
    """The retry state of one call: `failed` sleeps before the next attempt or raises."""

    def __init__(self, policy: RetryPolicy, deadline: float | None = None) -> None:
        self.policy = policy
        self.deadline = deadline  # monotonic time past which nothing is retried (shard deadline)
        self.attempts = 0
        self.since: float | None = None  # first failure since the last progress

    def progressed(self) -> None:
        """The call got somewhere (a body read moved on): the budget starts over."""
        self.since = None
        self.attempts = 0

    def failed(self, uri: str, action: str, transient: Transient) -> None:
        """Sleep before the next attempt, or raise StorageUnavailable once the budget is spent."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        self.attempts += 1
        budget = self.policy.budget_s
        if transient.kind == "unreachable" and self.policy.unreachable_s is not None:
            budget = min(budget, self.policy.unreachable_s)
        spent = now - self.since
        delay = min(self.policy.max_delay_s, self.policy.first_delay_s * 2 ** (self.attempts - 1))
        delay = random.uniform(delay / 2, delay)  # jitter: many workers do not retry in step
        left = self.since + budget - now
        if self.deadline is not None:
            left = min(left, self.deadline - now)
        if left <= 0:
            if self.deadline is not None and self.deadline - now <= 0:
                raise StorageUnavailable(
                    f"{uri}: {action}: {transient.describe()}; the shard's deadline passed"
                )
            raise StorageUnavailable(
                f"{uri}: {action}: {transient.describe()}; retried for {_seconds(spent)} "
                f"({self.attempts} attempts)"
            )
        time.sleep(min(delay, left))


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
