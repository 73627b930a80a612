"""The actor pool: size it from the cluster, hand out shards, retry, survive dead workers.

The driver holds only shard descriptions and object references; images never pass through it.
An actor takes work only while it is known to be alive: after a crash Ray restarts it (reloading
the model) and a ping says when it is back; an actor whose node is gone for good is replaced.
A fixed pool (`plan_actors`) is sized once; an elastic one (`Elastic`, pipeline.elastic) gets
actors on the nodes that join, drops those of nodes that leave and stops idle ones at the end.
"""

from __future__ import annotations

import collections
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.background import Background
from pipeline.elastic import Elastic
from pipeline.runspec import ShardResult
from pipeline.workers import WorkerSpec, actor_class


@dataclass(frozen=True)
class ActorPlan:
    """Resources and threads of one actor."""

    num_cpus: float
    num_gpus: float = 0.0
    threads: int = 1  # torch intra-op threads
    decode_threads: int = 2
    device: str = "cpu"
    node_id: str | None = None  # preferred node (soft: a restart may land elsewhere)
    pinned: bool = False  # node_id is a must (elastic pools: an actor belongs to its node)


def plan_actors(nodes: list[dict[str, Any]], requested: int | None = None) -> list[ActorPlan]:
    """Actors for the alive nodes of `ray.nodes()`: one per GPU, else one per CPU node.

    On CPU one actor per node, owning all of its cores, beats one actor per core: a GEMM on
    all cores of a node runs at nearly the same rate per core as on one, the batch stays large
    and the weights (240 MB for B/16) are loaded once per node instead of once per core.
    `requested` overrides the count and splits the resources evenly.
    """
    alive = [n for n in nodes if n.get("Alive", n.get("alive", False))]
    resources = [n.get("Resources", {}) for n in alive]
    total_gpus = sum(int(r.get("GPU", 0)) for r in resources)
    total_cpus = sum(int(r.get("CPU", 0)) for r in resources)
    if total_gpus:
        if requested:
            share = min(1.0, total_gpus / requested)
            cpus = max(1, total_cpus // requested) if total_cpus else 0
            return [_gpu_plan(cpus, share) for _ in range(requested)]
        plans = []
        for r in resources:
            gpus, cpus = int(r.get("GPU", 0)), int(r.get("CPU", 0))
            plans += [_gpu_plan(cpus // gpus if gpus else 0, 1.0) for _ in range(gpus)]
        return plans
    if not total_cpus:
        raise RuntimeError("the Ray cluster has no alive node with a CPU or GPU")
    if requested:
        cpus = max(1, total_cpus // requested)
        return [_cpu_plan(cpus) for _ in range(requested)]
    return [
        _cpu_plan(int(r["CPU"]), node_id)
        for r, node_id in zip(resources, (n.get("NodeID") for n in alive), strict=True)
        if int(r.get("CPU", 0)) > 0
    ]


def node_plan(node: dict[str, Any], gpu_cluster: bool) -> ActorPlan:
    """One actor pinned to `node`: a GPU of it on a GPU cluster, else all of its CPUs."""
    resources = node.get("Resources", {})
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    plan = _gpu_plan(cpus // gpus if gpus else 0, 1.0) if gpu_cluster else _cpu_plan(cpus)
    return replace(plan, node_id=node["NodeID"], pinned=True)


def _cpu_plan(cpus: int, node_id: str | None = None) -> ActorPlan:
    # Decoding takes about a tenth of the model's CPU time for B/16 (3 ms per ImageNet-size JPEG
    # against 50 ms of GEMMs per image on 2 cores); one decode thread per two cores keeps ahead
    # of the model without stealing cores from its OpenMP threads.
    return ActorPlan(cpus, threads=cpus, decode_threads=max(1, cpus // 2), node_id=node_id)


def _gpu_plan(cpus: int, gpus: float) -> ActorPlan:
    # The CPUs beside a GPU read and decode; the GPU does the math.
    return ActorPlan(cpus, gpus, threads=1, decode_threads=max(2, cpus), device="cuda")


@dataclass
class Work:
    """A shard waiting for (another) attempt."""

    shard: Any
    output_uri: str
    attempts: int = 0
    last_error: str = ""


@dataclass
class _Slot:
    plan: ActorPlan
    handle: Any
    alive: bool = False
    in_flight: int = 0
    ping: Any = None  # ObjectRef of a pending ping
    started_at: float = field(default_factory=time.monotonic)


class Feed(Background):
    """The listing in a background thread, at most `maxsize` ahead (listing overlaps labeling)."""

    def __init__(self, items: Iterator[Any], maxsize: int = 256) -> None:
        super().__init__(None, items, threads=0, ahead=maxsize, name="feed")

    def get(self, timeout: float | None) -> Any:
        """The next item; raises queue.Empty when none is ready, StopIteration at the end."""
        return super().get(timeout=timeout or 0)

    def close(self, wait: bool = False) -> None:
        super().close(wait)  # a slow listing must not hold up the end of a run


log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """The workers cannot run at all (e.g. the model or backend fails to load on them)."""


class ShardPool:
    """A pool of ShardLabeler actors that labels `Work` items and yields their results."""

    def __init__(
        self,
        spec: WorkerSpec,
        plans: list[ActorPlan],
        max_attempts: int = 3,
        tasks_per_actor: int = 2,
        stall_timeout_s: float = 600.0,
        elastic: Elastic | None = None,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        import ray

        self._ray = ray
        self.spec = spec
        self.max_attempts = max_attempts
        # Two tasks per actor: the next shard is already queued when one finishes.
        self.tasks_per_actor = tasks_per_actor
        self.stall_timeout_s = stall_timeout_s
        self.elastic = elastic
        self._on_change = on_change
        self._actor_class = actor_class()
        self._replacements_left = max(4, 2 * len(plans))
        self._last_death = ""
        self._started = time.monotonic()
        # (seconds since the pool started, alive actors, nodes they are on), on every change.
        self.history: list[tuple[float, int, int]] = []
        self.peak_actors = 0
        self._warned_empty = False
        self.slots = [self._start(plan) for plan in plans]

    def _start(self, plan: ActorPlan) -> _Slot:
        options: dict[str, Any] = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus}
        if plan.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                plan.node_id, soft=not plan.pinned
            )
        spec = replace(
            self.spec,
            threads=plan.threads,
            decode_threads=self.spec.decode_threads or plan.decode_threads,
            device=plan.device if self.spec.device == "auto" else self.spec.device,
        )
        if plan.num_gpus:
            # Two shards at once on a GPU actor: the next one downloads and decodes while the
            # last batches of this one run, so the GPU does not idle between shards. The
            # predictor itself runs one batch at a time (ShardLabeler holds a lock).
            options["max_concurrency"] = 2
        handle = self._actor_class.options(**options).remote(spec)
        return _Slot(plan, handle, ping=handle.ping.remote())

    def close(self) -> None:
        for slot in self.slots:
            self._ray.kill(slot.handle, no_restart=True)
        self.slots = []
        if self.elastic is not None:
            self.elastic.release()

    def run(self, feed: Feed) -> Iterator[ShardResult]:
        """Label every `Work` that `feed` yields; ShardResults in it (skipped) pass through."""
        ray = self._ray
        pending: collections.deque[Work] = collections.deque()  # retries go first
        in_flight: dict[Any, tuple[Work, _Slot]] = {}
        idle_since: float | None = None
        self._changed()  # the pool's size over time starts here
        while True:
            self._watch(pending, in_flight, feed)
            # Pull from the listing: skipped shards pass at once, work waits for an actor. The
            # buffer is small, so the driver never holds more than a few shards ahead.
            while len(pending) < self._buffer and not feed.done:
                item = self._next(feed, wait=not (in_flight or pending))
                if item is None:
                    break
                if isinstance(item, ShardResult):
                    yield item
                else:
                    pending.append(item)
            while pending and (slot := self._free_slot()) is not None:
                work = pending.popleft()
                work.attempts += 1
                ref = slot.handle.label_shard.remote(work.shard, work.output_uri)
                in_flight[ref] = (work, slot)
                slot.in_flight += 1
            if feed.done and not pending and not in_flight:
                return
            if not self.slots and self.elastic is None:
                reason = f"every worker died ({self._last_death})"
                yield from self._fail_all(pending, feed, reason)
                return
            pings = {slot.ping: slot for slot in self.slots if slot.ping is not None}
            waiting = list(in_flight) + list(pings)
            if not waiting:
                if not pending:
                    continue  # the listing is still going
                # Work is waiting but no actor is alive or starting: give up after a while.
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self.stall_timeout_s:
                    yield from self._fail_all(pending, feed, "no live worker")
                    return
                time.sleep(0.2)
                continue
            idle_since = None
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.2)
            for ref in ready:
                if ref in pings:
                    self._ping_done(ref, pings[ref])
                    self._changed()
                    continue
                work, slot = in_flight.pop(ref)
                slot.in_flight -= 1
                result = self._collect(ref, work, slot)
                if result is None:
                    pending.appendleft(work)
                else:
                    yield result

    # --- elastic: grow onto nodes that join, drop lost ones, stop idle ones (pipeline.elastic)

    def _watch(self, pending, in_flight, feed: Feed) -> None:
        elastic = self.elastic
        if elastic is None:
            return
        queued = len(pending) + len(in_flight)
        if feed.done and not pending:
            self._retire_idle()
        if not elastic.due():
            return
        alive = elastic.observe(self._ray.nodes())
        by_id = {node["NodeID"]: node for node in alive}
        for slot in list(self.slots):
            if slot.plan.pinned and slot.plan.node_id not in by_id:
                self._drop(slot, "its node left the cluster")
        actors_on = collections.Counter(slot.plan.node_id for slot in self.slots)
        work_left = bool(pending) or not feed.done
        openings = elastic.openings(alive, actors_on, len(self.slots), work_left)
        for node_id in openings:
            log.info("node %s has room: starting an actor there", node_id[:12])
            self.slots.append(self._start(node_plan(by_id[node_id], elastic.gpu_cluster)))
        if not self.slots and not self._warned_empty:
            self._warned_empty = True
            kind = "a GPU" if elastic.gpu_cluster else "CPUs"
            ask = "asking the autoscaler" if elastic.max_actors else "--max-actors N would ask"
            log.warning(
                "no node with %s for an actor yet: waiting up to %.0f s for one to join (%s)",
                kind,
                self.stall_timeout_s,
                ask,
            )
        elastic.ask(elastic.wanted(queued, feed.done))
        self._changed()

    def _retire_idle(self) -> None:
        """Nothing left to hand out: stop idle actors beyond min_actors (their nodes go idle)."""
        states = [(slot.alive, slot.in_flight) for slot in self.slots]
        for slot in [self.slots[i] for i in self.elastic.retirees(states)]:
            self._drop(slot, "no shard left for it")

    def _drop(self, slot: _Slot, why: str) -> None:
        log.info("stopping the actor on node %s: %s", (slot.plan.node_id or "?")[:12], why)
        self._ray.kill(slot.handle, no_restart=True)
        self.slots.remove(slot)
        self._changed()

    def _changed(self) -> None:
        """Record (and report) the alive actors and their nodes when they change."""
        alive = [slot for slot in self.slots if slot.alive]
        state = (len(alive), len({slot.plan.node_id for slot in alive}))
        if self.history and self.history[-1][1:] == state:
            return
        self.history.append((round(time.monotonic() - self._started, 1), *state))
        self.peak_actors = max(self.peak_actors, state[0])
        if self._on_change is not None:
            self._on_change(*state)

    def _node_alive(self, node_id: str | None) -> bool:
        alive = {node["NodeID"] for node in self._ray.nodes() if node.get("Alive")}
        return node_id in alive

    @property
    def _buffer(self) -> int:
        return max(4, 2 * self.tasks_per_actor * len(self.slots))

    def _next(self, feed: Feed, wait: bool) -> Work | ShardResult | None:
        try:
            return feed.get(timeout=0.1 if wait else None)
        except (queue.Empty, StopIteration):
            return None

    def _free_slot(self) -> _Slot | None:
        free = [s for s in self.slots if s.alive and s.in_flight < self.tasks_per_actor]
        return min(free, key=lambda s: s.in_flight) if free else None

    def _ping_done(self, ref: Any, slot: _Slot) -> None:
        ray = self._ray
        slot.ping = None
        try:
            ray.get(ref)
            slot.alive = True
        except ray.exceptions.ActorDiedError as err:
            if slot.plan.pinned and not self._node_alive(slot.plan.node_id):
                # Its node is gone: the watcher starts actors where there is room now.
                self._last_death = _first_line(err)
                if slot in self.slots:
                    self._drop(slot, "its node left the cluster")
                return
            if "creation task" in str(err) or "__init__" in str(err):
                raise PoolError(f"workers cannot start: {_first_line(err)}") from None
            self._last_death = _first_line(err)
            self._replace(slot)
        except ray.exceptions.RayActorError:
            slot.ping = slot.handle.ping.remote()  # unreachable for now: ask again

    def _replace(self, slot: _Slot) -> None:
        if slot not in self.slots:
            return
        self._ray.kill(slot.handle, no_restart=True)
        if self._replacements_left <= 0:
            self.slots.remove(slot)
            return
        self._replacements_left -= 1
        index = self.slots.index(slot)
        self.slots[index] = self._start(slot.plan)

    def _collect(self, ref: Any, work: Work, slot: _Slot) -> ShardResult | None:
        """The shard's result, a failed result after the last attempt, or None to retry."""
        ray = self._ray
        try:
            result = ray.get(ref)
            result.attempts = work.attempts
            return result
        except ray.exceptions.RayActorError as err:
            # The process or its node died: stop using the actor until a ping says it is back.
            work.last_error = f"worker died: {_first_line(err)}"
            if slot.alive and slot in self.slots:
                slot.alive = False
                slot.ping = slot.handle.ping.remote()
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if err.cause is not None else err
            work.last_error = _first_line(cause)
            if isinstance(cause, ValueError):
                # A shard that cannot be read as configured (ShardError) fails the same way
                # every time: report it now. Storage errors and crashes are worth retrying.
                return _failed(work)
        except ray.exceptions.RayError as err:
            work.last_error = _first_line(err)
        if work.attempts < self.max_attempts:
            return None
        return _failed(work)

    def _fail_all(self, pending, feed: Feed, reason: str) -> Iterator[ShardResult]:
        for work in pending:
            work.last_error = work.last_error or reason
            yield _failed(work)
        while True:
            try:
                item = feed.get(timeout=60)
            except queue.Empty:
                continue  # the listing is slow, not over
            except StopIteration:
                return
            if isinstance(item, ShardResult):
                yield item
            else:
                item.last_error = reason
                yield _failed(item)


def _failed(work: Work) -> ShardResult:
    tries = "1 attempt" if work.attempts == 1 else f"{work.attempts} attempts"
    error = f"{work.last_error} (after {tries})" if work.attempts else work.last_error
    return ShardResult(
        work.shard, work.output_uri, failed=True, error=error, attempts=work.attempts
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray's errors start with a header; the last line names the actual exception.
    return (lines[-1] if lines else type(err).__name__)[:500]
