"""Ask a Ray cluster's autoscaler for N GPUs and wait until they have joined; 0 releases them.

Optional: `mixer-label run --max-actors N --actor-device gpu` asks the autoscaler for GPUs
itself and grows onto them as they join (docs/scaling-out.md). Reserving first still helps
when the first shards should not wait for nodes to boot, and gives a fixed pool (`--actors N`)
its GPUs:

    python infra/ray/reserve_gpus.py 16 --timeout 1800 && mixer-label run ...
    python infra/ray/reserve_gpus.py 0        # let idle nodes go again

The request is Ray's `request_resources`: it bypasses the upscaling speed and holds the
cluster at that size until it is replaced (0 replaces it with nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def cluster_gpus(nodes: list[dict]) -> int:
    """GPUs on the alive nodes of `ray.nodes()`."""
    return int(sum(n.get("Resources", {}).get("GPU", 0) for n in nodes if n.get("Alive")))


def wait_for_gpus(wanted: int, timeout_s: float, poll_s: float = 5.0) -> int:
    """Poll until the cluster has `wanted` GPUs; returns how many it has at the end."""
    import ray

    deadline = time.monotonic() + timeout_s
    have = cluster_gpus(ray.nodes())
    while have < wanted and time.monotonic() < deadline:
        print(f"{have}/{wanted} GPUs joined", file=sys.stderr, flush=True)
        time.sleep(poll_s)
        have = cluster_gpus(ray.nodes())
    return have


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpus", type=int, help="GPUs to hold (0: release the reservation)")
    parser.add_argument("--address", default="auto", help="Ray cluster to join (default: auto)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between checks")
    args = parser.parse_args(argv)
    if args.gpus < 0:
        parser.error(f"gpus must be 0 or more, not {args.gpus}")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    try:
        request_resources(bundles=[{"GPU": 1}] * args.gpus)
        if args.gpus == 0:
            print("GPU reservation released; idle nodes leave after idle_timeout")
            return 0
        have = wait_for_gpus(args.gpus, args.timeout, args.poll)
    finally:
        ray.shutdown()
    if have < args.gpus:
        print(
            f"reserve_gpus: only {have} of {args.gpus} GPUs joined within {args.timeout:.0f} s "
            "(instance limits, capacity in the zones, or max_workers)",
            file=sys.stderr,
        )
        return 1
    print(f"{have} GPUs ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
