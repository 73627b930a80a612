"""`mixer-label model info CHECKPOINT|PRESET`."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="config, parameters, GMACs, sha256, preprocessing")
    info.add_argument("model", help="checkpoint file (.npz, .pth, .safetensors) or preset (B/16)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args: argparse.Namespace) -> int:
    from models.checkpoints import resolve_model
    from models.summary import describe, format_description

    info = describe(resolve_model(args.model))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
