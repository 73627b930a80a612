"""The elastic pool's rules over `ray.nodes()`-shaped dicts: who gets actors, what is asked for.

The pool itself growing on a real multi-node cluster is test_run_cluster.py's.
"""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.elastic import Elastic
from pipeline.pool import node_plan
from pipeline.run import RunConfig


def node(node_id: str, cpus: int = 0, gpus: int = 0, alive: bool = True) -> dict:
    resources = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_a_cpu_cluster_gives_each_cpu_node_one_actor_within_max():
    elastic = Elastic(max_actors=2, request=None)
    alive = elastic.observe([node("head"), node("a", 4), node("b", 4), node("gone", 4, alive=0)])
    assert [n["NodeID"] for n in alive] == ["head", "a", "b"]
    assert elastic.openings(alive, Counter(), 0) == ["a", "b"]  # the head has no CPU for one
    assert elastic.openings(alive, Counter({"a": 1}), 1) == ["b"]
    grown = [*alive, node("c", 4)]
    assert elastic.openings(grown, Counter({"a": 1, "b": 1}), 2) == []  # max_actors holds
    plan = node_plan(node("c", 4), gpu_cluster=False)
    assert (plan.num_cpus, plan.num_gpus, plan.node_id, plan.pinned) == (4, 0.0, "c", True)


def test_once_a_gpu_joins_only_gpus_get_actors_one_each():
    elastic = Elastic(request=None)
    alive = elastic.observe([node("head", 8), node("cpu", 16)])
    assert not elastic.gpu_cluster and elastic.openings(alive, Counter(), 0) == ["cpu", "head"]
    alive = elastic.observe([node("head", 8), node("cpu", 16), node("g", 16, gpus=2)])
    assert elastic.gpu_cluster
    # CPU actors already running keep going; new actors go to the GPUs, one per GPU.
    assert elastic.openings(alive, Counter({"cpu": 1, "head": 1}), 2) == ["g", "g"]
    plan = node_plan(node("g", 16, gpus=2), gpu_cluster=True)
    assert (plan.num_cpus, plan.num_gpus, plan.device, plan.pinned) == (8, 1.0, "cuda", True)


def test_gpu_workers_from_zero_are_asked_for_as_gpus_and_cpu_mode_ignores_gpus():
    asked = []
    elastic = Elastic(max_actors=8, request=asked.append, gpu_cluster=True)
    alive = elastic.observe([node("head")])  # a head only: no GPU has joined yet
    assert elastic.openings(alive, Counter(), 0) == []
    elastic.ask(elastic.wanted(queued=100, listing_done=True))
    assert asked == [[{"GPU": 1.0}] * 8]
    cpu = Elastic(cpu_only=True, request=None)
    alive = cpu.observe([node("g", 16, gpus=4)])
    assert not cpu.gpu_cluster and cpu.openings(alive, Counter(), 0) == ["g"]
    assert cpu.bundle() == {"CPU": 16.0}


def test_the_request_follows_the_queue_and_is_cleared_at_the_end():
    asked = []
    elastic = Elastic(min_actors=1, max_actors=4, request=asked.append)
    elastic.observe([node("a", 8)])
    elastic.ask(elastic.wanted(queued=2, listing_done=False))  # still listing: ask for max
    elastic.ask(elastic.wanted(queued=2, listing_done=False))  # unchanged: not asked again
    elastic.ask(elastic.wanted(queued=3, listing_done=True))
    elastic.ask(elastic.wanted(queued=0, listing_done=True))
    elastic.release()
    assert [len(bundles) for bundles in asked] == [4, 3, 0]
    assert asked[0] == [{"CPU": 8.0}] * 4
    assert Elastic(min_actors=2, max_actors=4).wanted(queued=1, listing_done=True) == 2
    # Without max_actors nothing is asked: the pool only uses what joins.
    unbounded = []
    Elastic(request=unbounded.append).ask(Elastic().wanted(5, False))
    assert unbounded == []


def test_gpu_bundles_and_a_failing_request_does_not_stop_the_run(caplog):
    def refuse(bundles):
        raise RuntimeError("autoscaler unreachable")

    elastic = Elastic(max_actors=2, request=refuse)
    elastic.observe([node("g", 8, gpus=1)])
    elastic.ask(2)
    assert elastic.requested == [{"GPU": 1.0}, {"GPU": 1.0}]
    assert "autoscaler unreachable" in caplog.text


def test_retiring_stops_at_min_actors_and_polls_follow_the_clock():
    now = [0.0]
    elastic = Elastic(min_actors=1, poll_s=2.0, clock=lambda: now[0], request=None)
    assert elastic.may_retire(2) and not elastic.may_retire(1)
    assert elastic.due() and not elastic.due()
    now[0] = 2.0
    assert elastic.due()


def test_idle_actors_still_starting_stop_before_ready_ones_and_nothing_grows_after():
    elastic = Elastic(min_actors=1, max_actors=3, request=None)
    # (ready, shards in flight): the ready idle actor is kept, the starting one stops.
    assert elastic.retirees([(True, 0), (False, 0)]) == [1]
    assert elastic.retirees([(True, 0), (True, 1), (False, 0)]) == [2, 0]
    assert elastic.retirees([(True, 2), (True, 1)]) == []  # busy actors never stop
    assert Elastic(min_actors=0, request=None).retirees([(True, 0), (False, 0)]) == [1, 0]
    # The listing is over and nothing waits: a node with room gets no actor any more.
    alive = elastic.observe([node("a", 4), node("b", 4)])
    assert elastic.openings(alive, Counter({"a": 1}), 1, work_left=False) == []
    assert elastic.openings(alive, Counter({"a": 1}), 1, work_left=True) == ["b"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"actors": 2, "max_actors": 4}, "actors is a fixed pool size"),
        ({"min_actors": -1}, "min_actors must be at least 0"),
        ({"min_actors": 3, "max_actors": 2}, "max_actors must be at least 1 and at least"),
        ({"max_actors": 0}, "max_actors must be at least 1"),
        ({"actor_device": "tpu"}, "actor_device must be auto, cpu or gpu"),
    ],
)
def test_bad_bounds_are_refused_naming_them(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig("in", "out", "tiny", **changes)


def test_the_run_command_refuses_actors_with_bounds(capsys):
    from console.main import main

    code = main(["run", "in", "out", "--model", "tiny", "--actors", "2", "--max-actors", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "actors is a fixed pool size" in err
