"""One bounded, ordered background map: a slow source and slow work overlap the consumer.

Used for the shard listing ahead of the pool (`pipeline.pool.Feed`), parallel GETs of loose
images (`pipeline.shards`) and decoding ahead of the model (`pipeline.preprocess`). Each
needs the same four things, which are easy to get subtly wrong one copy at a time:
- results in input order (rows keep the shard's order; the listing stays in key order);
- a bound on what is in flight (`ahead`), so memory stays flat however long the source is;
- an exception from the source raised in the consumer, after the results before it (a
  storage failure fails the shard, not silently shortens it);
- stopping early releases everything: the feeder ends, the source's `close()` runs (a shard's
  stream), the worker threads finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_END = object()


class Background:
    """`fn` over `items` on background threads; results in input order, at most `ahead` queued.

    A feeder thread pulls `items` (the source may block: a download, a listing) and submits
    each to `threads` workers; with threads=0 (or fn=None) the feeder applies fn itself, so
    the class is also a plain read-ahead buffer. Starts at once. An exception raised by `fn`
    is raised by `get` at that item's place; callers that want a row instead catch inside fn.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any] | None,
        items: Iterable[Any],
        threads: int = 0,
        ahead: int = 2,
        name: str = "background",
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._fn = fn
        self._pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
            if threads > 0 and fn is not None
            else None
        )
        self.done = False  # the consumer has seen the end (or the source's error)
        self.produced = 0  # items pulled from the source so far
        self._feeder = threading.Thread(
            target=self._feed, args=(items,), name=f"{name}-feeder", daemon=True
        )
        self._feeder.start()

    def _put(self, item: object) -> bool:
        # Polls so that close() can end a feeder blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _feed(self, items: Iterable[Any]) -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                self.produced += 1
                future: Future = Future()
                if self._pool is not None:
                    future = self._pool.submit(self._fn, item)
                elif self._fn is None:
                    future.set_result(item)
                else:
                    try:
                        future.set_result(self._fn(item))
                    except Exception as err:
                        future.set_exception(err)
                if not self._put(future):
                    break
        except BaseException as err:  # handed to the consumer, raised in its thread
            self._put(err)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # releases a shard's stream when the consumer stops early
            self._put(_END)

    def get(self, timeout: float | None = None) -> Any:
        """The next result; waits up to `timeout` s (None: until one is ready, 0: not at all).

        Raises queue.Empty when none is ready in time, StopIteration at the end, and the
        source's own exception where it broke off.
        """
        if self.done:
            raise StopIteration
        item = self._queue.get_nowait() if timeout == 0 else self._queue.get(timeout=timeout)
        if item is _END:
            self.done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item.result()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self.get()

    def close(self, wait: bool = True) -> None:
        """Stop pulling and close the source; wait=True also waits for the feeder and workers.

        wait=False suits a source that may block for long (a listing): its feeder then ends
        by itself at its next item. Safe to call twice.
        """
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if wait:
            self._feeder.join(timeout=30)
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def background_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    threads: int,
    ahead: int | None = None,
    name: str = "background",
) -> Iterator[Any]:
    """`Background` as a generator: starts on the first `next`, cleans up when closed or done.

    ahead defaults to 2 x threads: enough that no worker waits for the consumer to take a
    result, few enough that memory stays small.
    """
    with Background(fn, items, threads, ahead or 2 * max(1, threads), name) as results:
        yield from results
