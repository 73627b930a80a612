"""`mixer-label ...`: the command line of the data plane.

Each command lives in its own module with `add_arguments(parser)` and `main(args) -> int`;
this file only wires them together. flows/cli.py adds the Prefect commands on top.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


class UserFacingError(Exception):
    """An error whose message alone tells the user what to fix; printed as one line."""


# (command, module, one-line help). Modules import their heavy dependencies inside main().
COMMANDS: list[tuple[str, str, str]] = [
    ("model", "pipeline.model_info", "inspect a model: `mixer-label model info CHECKPOINT|PRESET`"),
    ("run", "pipeline.run_command", "label every image under INPUT into Parquet under OUTPUT"),
    ("train", "pipeline.train", "train a small Mixer on labeled shards (DATA/train, DATA/test)"),
    ("bench", "models.bench", "model-only speed per backend/precision vs this machine's GEMM peak"),
]


def build_parser(commands: Sequence[tuple[str, str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixer-label",
        description="Label images with an MLP-Mixer: Ray actors, S3 shards, Parquet out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in commands:
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        command.set_defaults(handler=module.main)
    return parser


def main(argv: Sequence[str] | None = None, commands=COMMANDS) -> int:
    args = build_parser(commands).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `mixer-label ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserFacingError as err:
        print(f"mixer-label {args.command}: error: {err}", file=sys.stderr)
        return 2
