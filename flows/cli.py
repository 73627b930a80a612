"""The `mixer-label` console script: the data-plane commands plus the Prefect ones."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline import cli as pipeline_cli

COMMANDS = [
    *pipeline_cli.COMMANDS,
    (
        "deploy",
        "flows.deploy",
        "the nightly Prefect deployment: serve it here until stopped, or register it on a "
        "process work pool with --work-pool NAME",
    ),
    (
        "demo",
        "flows.demo",
        "the whole system on the digits data set: data, training, Prefect + Ray, checked results",
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_cli.main(argv, COMMANDS)


if __name__ == "__main__":
    raise SystemExit(main())
