"""A multi-node Ray cluster in its own process, driven over stdin by tests/infra/test_multinode.py.

`ray.cluster_utils.Cluster`: a head without CPUs (it only hosts drivers, like the head of
infra/ray/cluster-aws.yaml and infra/kuberay/) and two one-CPU worker nodes. Drivers join it
by address from other processes, as `ray job submit` or a Prefect worker would.

Prints `ADDRESS <gcs address>` and `WORKERS <node id> <node id>` when ready, then answers:
  actors  -> `ACTORS <json>`   the ShardLabeler actors: node, state, restarts
  remove  -> `REMOVED <id>`    kills the second worker node at once (no graceful drain)
  stop (or end of input)       shuts the cluster down
"""

from __future__ import annotations

import json
import sys


def labeler_actors() -> list[dict]:
    """ShardLabeler actors from the GCS actor table (no dashboard needed)."""
    from ray._private import state

    return [
        {
            "node_id": info["Address"]["NodeID"],
            "state": info["State"],
            "restarts": info["NumRestarts"],
            "job_id": info["JobID"],
        }
        for info in state.actors().values()
        if info["ActorClassName"] == "ShardLabeler"
    ]


def main() -> int:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        # This process is a driver too, only to read the actor table.
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        print(f"ADDRESS {cluster.address}", flush=True)
        print("WORKERS " + " ".join(w.node_id for w in workers), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "actors":
                print("ACTORS " + json.dumps(labeler_actors()), flush=True)
            elif command == "remove":
                cluster.remove_node(workers[1], allow_graceful=False)
                print(f"REMOVED {workers[1].node_id}", flush=True)
            elif command == "stop":
                break
            else:
                print(f"ERROR unknown command {command!r}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
