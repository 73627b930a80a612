"""The elastic pool's rules: which nodes get actors, and what the run asks the autoscaler for.

The pool (pipeline.pool.ShardPool) calls `Elastic.poll` from its loop; the rules here are
plain functions of `ray.nodes()` and the queue, so they are tested without a cluster.

- Growth: every `poll_s` the pool reads the cluster. An alive node that joined gets actors as
  `plan_actors` would have given it at the start (one per GPU on a GPU cluster, one per CPU
  node on a CPU-only cluster), pinned to it, up to `max_actors` in all. A cluster counts as a
  GPU cluster from the moment any node has a GPU (or from the start with actor_device="gpu";
  "cpu" never is one); from then on CPU-only nodes (a head, a driver node) get no actors.
- Loss: an actor whose node is gone is dropped (pinned, it cannot restart elsewhere); its
  shards are labeled again by the others, and a node that joins in its place gets a new one.
- Shrinking: once the listing is over and no shard waits, an idle actor beyond `min_actors`
  is stopped (one still starting before one that is ready), so its node goes idle and the
  autoscaler can take it back before the run ends; from then on no actor is started.
- Requests: with `max_actors` set, the run asks the autoscaler (`request_resources`) for
  min(max_actors, shards still to label) actors' worth (at least `min_actors`), one bundle
  per actor: {"GPU": 1} on a GPU cluster, else {"CPU": n} with n the CPUs of the CPU nodes
  seen. The request is lowered as the queue drains and cleared (an empty request) at the end.
  Without `max_actors` the pool uses what joins but asks for nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RequestHook = Callable[[list[dict[str, float]]], None]


def ray_request_resources(bundles: list[dict[str, float]]) -> None:
    """The autoscaler SDK's request; an empty list clears what this driver asked for."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def alive_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def node_gpus(node: dict[str, Any]) -> int:
    return int(node.get("Resources", {}).get("GPU", 0))


def node_cpus(node: dict[str, Any]) -> int:
    return int(node.get("Resources", {}).get("CPU", 0))


def actors_for_node(node: dict[str, Any], gpu_cluster: bool) -> int:
    """How many actors a node holds: one per GPU on a GPU cluster, else one per CPU node."""
    if gpu_cluster:
        return node_gpus(node)
    return 1 if node_cpus(node) > 0 else 0


@dataclass
class Elastic:
    """Bounds, request hook and clock of an elastic pool; the pool asks it what to change."""

    min_actors: int = 1
    max_actors: int | None = None
    poll_s: float = 2.0
    request: RequestHook | None = ray_request_resources
    clock: Callable[[], float] = time.monotonic
    gpu_cluster: bool = False  # True from the start for actor_device="gpu"
    cpu_only: bool = False  # actor_device="cpu": GPUs are never used
    cpus_per_node: int = 1  # the bundle of a CPU actor: the CPUs of the CPU nodes seen
    requested: list[dict[str, float]] | None = None  # the request in force (None: never made)
    _next_poll: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.min_actors < 0:
            raise ValueError(f"min_actors must be at least 0, not {self.min_actors}")
        if self.max_actors is not None and self.max_actors < max(1, self.min_actors):
            raise ValueError(
                f"max_actors ({self.max_actors}) must be at least 1 and at least min_actors "
                f"({self.min_actors})"
            )

    def due(self) -> bool:
        """True once per `poll_s`: time to read the cluster again."""
        now = self.clock()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        return True

    def observe(self, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The alive nodes; notes whether this is a GPU cluster and a CPU node's size."""
        alive = alive_nodes(nodes)
        if not self.cpu_only and any(node_gpus(n) for n in alive):
            self.gpu_cluster = True
        cpu_nodes = [
            node_cpus(n) for n in alive if (self.cpu_only or not node_gpus(n)) and node_cpus(n)
        ]
        if cpu_nodes:
            self.cpus_per_node = max(cpu_nodes)
        return alive

    def openings(
        self,
        alive: list[dict[str, Any]],
        actors_on: Counter,
        total: int,
        work_left: bool = True,
    ) -> list[str]:
        """Node ids that should get one more actor each (a node may appear several times).

        `actors_on` counts this pool's actors per node id, `total` all of them (also those
        not placed yet); the result keeps the total within `max_actors`. With no work left to
        hand out (`work_left` False: the listing is over and no shard waits) nothing grows: a
        new actor would only start in order to be stopped.
        """
        if not work_left:
            return []
        room = None if self.max_actors is None else self.max_actors - total
        out: list[str] = []
        for node in sorted(alive, key=lambda n: n["NodeID"]):
            want = actors_for_node(node, self.gpu_cluster) - actors_on.get(node["NodeID"], 0)
            for _ in range(max(0, want)):
                if room is not None and len(out) >= room:
                    return out
                out.append(node["NodeID"])
        return out

    def may_retire(self, actors: int) -> bool:
        """An idle actor may stop (nothing left to give it) while more than min_actors run."""
        return actors > self.min_actors

    def retirees(self, actors: list[tuple[bool, int]]) -> list[int]:
        """Which actors to stop once nothing is left to hand out, by index into `actors`.

        `actors` gives (ready, shards in flight) per actor. Only idle ones stop, and only
        while more than `min_actors` remain; those still starting go first, so the actors
        kept are ones that can take a shard that fails and comes back.
        """
        left = len(actors)
        out: list[int] = []
        for index in sorted(range(len(actors)), key=lambda i: actors[i][0]):
            ready, in_flight = actors[index]
            if in_flight == 0 and self.may_retire(left):
                out.append(index)
                left -= 1
        return out

    def wanted(self, queued: int, listing_done: bool) -> int:
        """Actors worth asking for: one per shard still to label, within the bounds."""
        if self.max_actors is None:
            return 0
        if listing_done and queued == 0:
            return 0
        need = self.max_actors if not listing_done else min(self.max_actors, queued)
        return max(self.min_actors, need)

    def bundle(self) -> dict[str, float]:
        return {"GPU": 1.0} if self.gpu_cluster else {"CPU": float(self.cpus_per_node)}

    def ask(self, actors: int) -> None:
        """Request `actors` bundles from the autoscaler, if that changes the request."""
        if self.request is None or self.max_actors is None:
            return
        bundles = [self.bundle() for _ in range(actors)]
        if bundles == self.requested:
            return
        self.requested = bundles
        try:
            self.request(bundles)
        except Exception as err:  # a hint to the autoscaler: the run goes on without it
            log.warning("could not request resources from the autoscaler: %s", err)

    def release(self) -> None:
        """Clear this run's request (at the end, also after an error)."""
        if self.requested:
            self.ask(0)
