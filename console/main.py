"""`mixer-label COMMAND ...`: wires the command modules together.

Each command is a module of this package with `add_arguments(parser)` and `main(args) -> int`;
modules import their heavy dependencies inside main(), so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence

from console.errors import exit_code

# (command, module, one-line help), in the order `mixer-label --help` lists them.
COMMANDS: list[tuple[str, str, str]] = [
    ("model", "console.model", "inspect a model: `mixer-label model info CHECKPOINT|PRESET`"),
    ("run", "console.run", "label every image under INPUT into Parquet under OUTPUT"),
    ("train", "console.train", "train a small Mixer on labeled shards (DATA/train, DATA/test)"),
    (
        "bench",
        "console.bench",
        "model-only speed per backend/precision vs this machine's GEMM peak",
    ),
    (
        "deploy",
        "console.deploy",
        "the nightly Prefect deployment: serve it here until stopped, or register it on a "
        "process work pool with --work-pool NAME",
    ),
    (
        "demo",
        "console.demo",
        "the whole system on the digits data set: data, training, Prefect + Ray, checked results",
    ),
]


def build_parser(commands: Sequence[tuple[str, str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixer-label",
        description="Label images with an MLP-Mixer: Ray actors, S3 shards, Parquet out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's start-up notices, the workers' output and INFO logs",
    )
    for name, module_name, help_text in commands:
        command = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            formatter_class=HelpFormatter,
        )
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        # SETTING_FLAGS: how the library's setting names read as this command's flags, where
        # not simply --name-with-dashes (console.errors names a wrong setting by its flag).
        command.set_defaults(
            handler=module.main, setting_flags=getattr(module, "SETTING_FLAGS", {})
        )
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, where there is one worth saying.

    Not for flags that are off (False) or unset (None, empty), nor where the help says it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        if unset or default in ("", []) or "default" in text:
            return text
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_code(args.command, lambda: args.handler(args), args.setting_flags)


if __name__ == "__main__":
    raise SystemExit(main())
