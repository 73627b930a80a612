"""The one bounded, ordered background map behind the listing feed, loose-image GETs and decode."""

from __future__ import annotations

import queue
import random
import threading
import time

import pytest

from pipeline.background import Background, background_map


def _slow_square(x: int) -> int:
    time.sleep(random.random() * 0.01)  # finish out of order
    return x * x


def test_results_come_in_input_order_from_many_threads() -> None:
    assert list(background_map(_slow_square, range(50), threads=4)) == [x * x for x in range(50)]


def test_at_most_ahead_items_are_pulled_past_what_the_consumer_took() -> None:
    pulled: list[int] = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    results = background_map(lambda x: x, items(), threads=2, ahead=3)
    assert [next(results) for _ in range(2)] == [0, 1]
    time.sleep(0.3)
    assert len(pulled) <= 2 + 3 + 1  # taken + queued + the one waiting to be queued
    results.close()


def test_an_error_in_fn_is_raised_at_its_place() -> None:
    def fn(x: int) -> int:
        if x == 3:
            raise KeyError("three")
        return x

    seen = []
    with pytest.raises(KeyError, match="three"):
        for x in background_map(fn, range(10), threads=3):
            seen.append(x)
    assert seen == [0, 1, 2]


def test_a_source_error_comes_after_the_results_before_it_and_ends_the_stream() -> None:
    def items():
        yield from range(3)
        raise ConnectionError("storage went away")

    feed = Background(None, items(), ahead=1)
    assert [feed.get(5), feed.get(5), feed.get(5)] == [0, 1, 2]
    with pytest.raises(ConnectionError, match="storage went away"):
        feed.get(5)
    assert feed.done
    with pytest.raises(StopIteration):
        feed.get(5)


def test_stopping_early_closes_the_source_and_the_generator_form_starts_lazily() -> None:
    started, closed = threading.Event(), threading.Event()

    def items():
        started.set()
        try:
            yield from range(10_000)
        finally:
            closed.set()

    results = background_map(_slow_square, items(), threads=2)
    time.sleep(0.2)
    assert not started.is_set()  # nothing runs until the first next()
    assert next(results) == 0
    results.close()
    assert closed.wait(5)


def test_get_without_waiting_says_empty_while_the_source_is_slow() -> None:
    gate = threading.Event()

    def items():
        gate.wait(10)
        yield "x"

    with Background(str.upper, items(), threads=1) as feed:
        with pytest.raises(queue.Empty):
            feed.get(timeout=0)
        gate.set()
        assert feed.get(timeout=5) == "X"
        assert list(feed) == []
