"""`mixer-label model info CHECKPOINT|PRESET`."""

from __future__ import annotations

import argparse
import json

# The model is the positional argument: a wrong one is named by its value alone.
SETTING_FLAGS = {"model": ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser(
        "info",
        help="config, parameters, GMACs, sha256, preprocessing",
        description="config, parameters, GMACs, sha256, preprocessing and labels of a model",
        formatter_class=parser.formatter_class,
    )
    info.add_argument("model", help="checkpoint file (.npz, .pth, .safetensors) or preset (B/16)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    # `model info X -v` as well as `model -v info X`: SUPPRESS leaves the outer flag's value
    # alone when this one is not given.
    info.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="INFO logs too (as `model -v`)",
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.preflight import check_model_spec

    check_model_spec(args.model)  # no such file / no such preset, named before torch loads

    from models.checkpoints import resolve_model
    from models.summary import describe, format_description

    info = describe(resolve_model(args.model))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
