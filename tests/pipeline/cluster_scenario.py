"""Run in its own process by test_run_cluster.py: label shards on a 3-node Ray cluster and lose
a worker node while the run is going. Prints the run summary and per-shard facts as JSON.

Its own process because a process holds one Ray connection, and the test session's may be open.

    python tests/pipeline/cluster_scenario.py INPUT OUTPUT MODEL DATE
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys


def main(input_uri: str, output_uri: str, model: str, date: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.run import RunConfig, run_labeling

    # A head without CPUs (drivers only) and two one-CPU worker nodes: one actor on each.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    workers = {node.node_id: node for node in (cluster.add_node(num_cpus=1) for _ in range(2))}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    lost: dict[str, object] = {}
    results = []

    def lose_a_node(result) -> None:
        results.append(result)
        if lost:
            return
        # The node that just finished a shard already holds the next one. A machine that
        # disappears takes its Ray processes and its workers with it: kill both.
        lost.update(node=result.worker_node, pid=result.worker_pid, after=len(results))
        cluster.remove_node(workers[result.worker_node], allow_graceful=False)
        with contextlib.suppress(ProcessLookupError):  # already gone with its raylet
            os.kill(result.worker_pid, signal.SIGKILL)

    try:
        config = RunConfig(input_uri, output_uri, model, date=date, batch_size=1, max_attempts=4)
        summary = run_labeling(config, on_shard_done=lose_a_node)
        report = {
            "summary": summary.to_dict(),
            "lost": lost,
            "shards": [
                {"node": r.worker_node, "pid": r.worker_pid, "attempts": r.attempts}
                for r in results
            ],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:5]))
