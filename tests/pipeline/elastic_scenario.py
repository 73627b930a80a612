"""Run in its own process by test_run_cluster.py: an elastic run on a Ray cluster that grows.

The cluster starts with one worker node; the run (max_actors=2) asks the autoscaler for two
actors' worth. This script plays the autoscaler: when the request arrives it adds two nodes.
The pool must start one actor there (not two: max_actors), which labels shards, and lower and
clear its request as the queue drains. Prints the summary and what it saw as JSON.

    python tests/pipeline/elastic_scenario.py INPUT OUTPUT MODEL DATE [one|zero]

With `zero` the cluster starts with its head only (no CPU for an actor) and the script adds
one node when the request arrives: the run must wait for it, then label everything there.
"""

from __future__ import annotations

import json
import sys
import threading


def main(input_uri: str, output_uri: str, model: str, date: str, start: str = "one") -> int:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.elastic import ray_request_resources
    from pipeline.run import RunConfig, label_shards, partition_uri, plan_shards, write_summary

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    # "one": a worker node from the start; "zero": the head only (GPU workers from zero).
    first = cluster.add_node(num_cpus=1) if start == "one" else None
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    requests: list[int] = []  # bundles per request, in order
    kv_after: list[object] = []  # the autoscaler's view of the request after each one
    two_actors = threading.Event()
    added: list[str] = []
    actors_seen: list[tuple[int, int]] = []

    def request(bundles):
        ray_request_resources(bundles)  # the real SDK call, then what the autoscaler reads
        requests.append(len(bundles))
        kv_after.append(_autoscaler_request())
        if len(bundles) == 2 and not added:
            # The autoscaler's part: nodes for the request (the pool's loop calls this on the
            # main thread, where Cluster.add_node must run).
            added.extend(cluster.add_node(num_cpus=1).node_id for _ in range(2 if first else 1))

    def on_progress(event):
        actors_seen.append((event.actors, event.nodes))
        if event.actors >= (2 if first else 1):
            two_actors.set()

    config = RunConfig(
        input_uri, output_uri, model, date=date, batch_size=1, max_actors=2, max_attempts=4
    )
    planned = list(plan_shards(config))

    def listing():
        # Two shards, then the rest only once the pool has grown: the new actor is then idle
        # when they arrive and gets some of them, whatever the speed of this machine.
        yield from planned[:2]
        assert two_actors.wait(180), f"no second actor: {actors_seen}, requests {requests}"
        yield from planned[2:]

    try:
        summary = label_shards(
            listing(), config, on_progress=on_progress, request_resources=request
        )
        write_summary(config, partition_uri(config), summary)
        report = {
            "summary": summary.to_dict(),
            "first_node": first.node_id if first else None,
            "added": added,
            "requests": requests,
            "kv_after": kv_after,
            "actors_seen": actors_seen,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(report))
    return 0


def _autoscaler_request():
    """The request as the (v1) autoscaler reads it from the GCS, or None under autoscaler v2."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2():
        return None
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
