"""`mixer-label demo [--s3]`: the whole system on this machine, with a result you can check."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from console.errors import PARTLY_FAILED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flows.demo import DEMO_DIR
    from pipeline.train_config import TrainConfig

    parser.add_argument(
        "--s3", action="store_true", help="go through an S3 API server on loopback (moto)"
    )
    parser.add_argument(
        "--serve", action="store_true", help="keep the Prefect UI and Ray dashboard up (Ctrl+C)"
    )
    parser.add_argument("--dir", default=DEMO_DIR, help="where everything goes")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: {TrainConfig().epochs})",
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    from flows.demo import DemoOptions, run_demo

    options = DemoOptions(
        root=Path(args.dir), s3=args.s3, serve=args.serve, epochs=args.epochs, verbose=args.verbose
    )
    # A plain `kill` stops the demo like Ctrl+C does: the servers it started stop with it.
    signal.signal(signal.SIGTERM, _interrupt)
    report = run_demo(options)
    if not report.ok:
        for line in report.checks.problems():
            print(f"mixer-label demo: check failed: {line}", file=sys.stderr)
        return PARTLY_FAILED
    return 0
