"""Progress of a run in images: what is done, what is left, how fast, and what it will take.

The run feeds a `ProgressTracker` (shards as the listing yields them, results as they come
back) and hands every change to `on_progress` callbacks as a `ProgressEvent`: the terminal's
tqdm bar and the Prefect flow's progress artifact and log read the same
events (console.progress.ProgressBar, flows.artifacts.ShardProgress). Nothing here knows
about Ray, Prefect or the terminal.

What the image total means: shards of plain images know their count from the listing; a tar
or Parquet shard is only a size until it is labeled. The total is exact once every such shard
has finished (or when there are none); before that it is an estimate: the exact counts, plus
the images of the tar/Parquet shards already labeled, plus the bytes still queued in such
shards at the images-per-byte seen so far (`images_total_exact` False, shown with a "~"). With
no tar/Parquet shard finished yet there is no estimate (None). Shards skipped as already done
are counted as shards, not as images, and a failed shard leaves the image total: the image
figures are what this run labels, so a finished run ends at its total.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """The run's progress after a shard finished (`result`), or at the end (result None)."""

    shards_done: int  # finished: labeled, skipped (already done) or failed
    shards_total: int  # listed so far (all of them once `listing_done`)
    listing_done: bool
    shards_skipped: int
    shards_failed: int
    labeled: int  # shards labeled or failed in this run (the ones the per-shard lines count)
    to_label: int  # listed shards that are not skipped
    images_done: int
    images_total: int | None  # None: not estimable yet (see the module docstring)
    images_total_exact: bool
    errors: int  # error rows so far (images that could not be labeled)
    elapsed_s: float  # since the first shard started on a worker (actor start-up excluded)
    images_per_s: float
    eta_s: float | None
    actors: int = 0  # alive in the pool now
    nodes: int = 0  # the nodes they are on
    result: Any = None  # the ShardResult that caused this event, if one did

    @property
    def fraction(self) -> float:
        """Done, 0..1: in images when the total is known, else in shards."""
        if self.images_total:
            return min(1.0, self.images_done / self.images_total)
        if self.listing_done and self.shards_total:
            return self.shards_done / self.shards_total
        return 1.0 if self.listing_done else 0.0

    def shard_line(self) -> str:
        """The log line for the shard that just finished: "shard 12/340: 1,000 images, ...".

        12 counts the shards labeled (or failed) so far in this run, 340 the shards it labels
        ("340+" while the listing goes on); img/s is the run's rate so far, not the shard's.
        """
        result = self.result
        of = f"{self.to_label:,}" if self.listing_done else f"{self.to_label:,}+"
        head = f"shard {self.labeled:,}/{of}"
        name = getattr(getattr(result, "shard", None), "name", "?")
        if result is not None and result.failed:
            return f"{head}: FAILED {name}: {result.error}"
        images = getattr(result, "images", 0)
        errors = getattr(result, "errors", 0)
        error_word = "error" if errors == 1 else "errors"
        return (
            f"{head}: {images:,} images, {errors:,} {error_word}, "
            f"{self.images_per_s:,.0f} img/s ({name})"
        )

    def describe(self) -> str:
        """One line with everything: images, shards, errors, speed and ETA."""
        parts = [f"{format_images(self)} images"]
        shards = f"{self.shards_done:,}/{self.shards_total:,}{'' if self.listing_done else '+'}"
        skipped = f" ({self.shards_skipped:,} already done)" if self.shards_skipped else ""
        parts.append(f"{shards} shards{skipped}")
        if self.shards_failed:
            parts.append(f"{self.shards_failed:,} failed")
        parts.append(f"{self.errors:,} {'error' if self.errors == 1 else 'errors'}")
        parts.append(f"{self.images_per_s:,.0f} img/s")
        parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.actors:
            actors = "1 actor" if self.actors == 1 else f"{self.actors} actors"
            parts.append(f"{actors} on {self.nodes} node{'' if self.nodes == 1 else 's'}")
        return ", ".join(parts)


def format_images(event: ProgressEvent) -> str:
    """ "3,000/10,000", "3,000/~9,800" (estimated) or "3,000/?" (not estimable yet)."""
    if event.images_total is None:
        return f"{event.images_done:,}/?"
    approx = "" if event.images_total_exact else "~"
    return f"{event.images_done:,}/{approx}{event.images_total:,}"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


ProgressCallback = Callable[[ProgressEvent], None]


class ProgressTracker:
    """Counts listed and finished shards and sends a ProgressEvent to each callback.

    `listed` is called from the listing's thread, `finished` and `end` from the collecting
    one: the counts sit behind a lock, and callbacks run only on the collecting thread (a
    Prefect artifact update needs the task's context).
    """

    def __init__(self, callbacks: Iterable[ProgressCallback] = ()) -> None:
        self._callbacks = [c for c in callbacks if c is not None]
        self._lock = threading.Lock()
        self._listing_done = False
        self._shards = self._skipped = self._done = self._failed = self._labeled = 0
        self._known_images = 0  # plain-image shards listed to label: their count is exact
        self._unknown_bytes = 0  # tar/Parquet shards listed to label: only their size
        self._unknown_left = 0
        self._counted_images = 0  # images of finished tar/Parquet shards
        self._counted_bytes = 0
        self._images = self._errors = 0
        self._first_start: float | None = None  # epoch seconds, from ShardResult.started_at
        self._actors = self._nodes = 0

    def listed(self, shard: Any, skipped: bool) -> None:
        """A shard the listing yielded (skipped: already done, nothing to label)."""
        with self._lock:
            self._shards += 1
            if skipped:
                return
            if shard.format == "images":
                self._known_images += len(shard.members)
            else:
                self._unknown_bytes += int(shard.size or 0)
                self._unknown_left += 1

    def listing_done(self) -> None:
        """The listing has ended (called on its thread: no event from here, see `end`)."""
        with self._lock:
            self._listing_done = True

    def end(self) -> None:
        """The run is over: one last event, on the caller's thread, with the final counts."""
        with self._lock:
            self._listing_done = True
        self._emit(None)

    def finished(self, result: Any) -> None:
        """A ShardResult (labeled, skipped or failed) came back."""
        with self._lock:
            self._done += 1
            if result.skipped:
                self._skipped += 1
            else:
                self._labeled += 1
                self._failed += int(bool(result.failed))
                self._images += int(result.images or 0)
                self._errors += int(result.errors or 0)
                if result.shard.format == "images":
                    if result.failed:
                        self._known_images -= len(result.shard.members)
                else:
                    self._unknown_left -= 1
                    self._unknown_bytes -= int(result.shard.size or 0)
                    if not result.failed:
                        self._counted_images += int(result.images or 0)
                        self._counted_bytes += int(result.shard.size or 0)
                if result.started_at is not None:
                    first = self._first_start
                    self._first_start = min(first or result.started_at, result.started_at)
        self._emit(result)

    def pool_changed(self, actors: int, nodes: int) -> None:
        """The pool now has `actors` alive actors on `nodes` nodes (collecting thread)."""
        with self._lock:
            self._actors, self._nodes = actors, nodes
        self._emit(None)

    def track(self, planned: Iterable[Any]) -> Iterator[Any]:
        """Pass PlannedShards through, counting each; `listing_done` when they end."""
        for item in planned:
            self.listed(item.shard, bool(item.skip_reason))
            yield item
        self.listing_done()

    def snapshot(self, result: Any = None, now: float | None = None) -> ProgressEvent:
        with self._lock:
            now = time.time() if now is None else now
            total, exact = self._images_total()
            elapsed = 0.0 if self._first_start is None else max(0.0, now - self._first_start)
            rate = self._images / elapsed if elapsed > 0 else 0.0
            eta = None
            if total is not None and rate > 0:
                eta = max(0, total - self._images) / rate
            elif self._listing_done and self._done == self._shards:
                eta = 0.0
            return ProgressEvent(
                shards_done=self._done,
                shards_total=self._shards,
                listing_done=self._listing_done,
                shards_skipped=self._skipped,
                shards_failed=self._failed,
                labeled=self._labeled,
                to_label=self._shards - self._skipped,
                images_done=self._images,
                images_total=total,
                images_total_exact=exact,
                errors=self._errors,
                elapsed_s=elapsed,
                images_per_s=rate,
                eta_s=eta,
                actors=self._actors,
                nodes=self._nodes,
                result=result,
            )

    def _images_total(self) -> tuple[int | None, bool]:
        # A failed shard leaves the total (it is reported as failed, its images unlabeled), so
        # a finished run always ends at its total.
        exact_part = self._known_images + self._counted_images
        if self._unknown_left == 0:
            return exact_part, self._listing_done
        if not self._counted_bytes:
            return None, False
        per_byte = self._counted_images / self._counted_bytes
        return exact_part + round(self._unknown_bytes * per_byte), False

    def _emit(self, result: Any) -> None:
        if not self._callbacks:
            return
        event = self.snapshot(result)
        for callback in self._callbacks:
            callback(event)
