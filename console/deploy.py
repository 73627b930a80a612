"""`mixer-label deploy`: serve the `nightly` deployment here, or register it on a work pool."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from console.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flows.deploy import PREFECT_YAML

    parser.add_argument(
        "--work-pool",
        metavar="NAME",
        help="register on this process work pool (created if missing) instead of serving here",
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a flow parameter (repeatable), e.g. -p input_uri=s3://bucket/images/",
    )
    parser.add_argument(
        "--cron", help="override the schedule, e.g. '30 1 * * *' (default: prefect.yaml's)"
    )
    parser.add_argument(
        "--timezone",
        help="IANA time zone of the cron, e.g. Europe/Berlin (default: prefect.yaml's)",
    )
    parser.add_argument("--name", default="nightly", help="deployment in prefect.yaml")
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_YAML, help=argparse.SUPPRESS)
    parser.add_argument(
        "--limit", type=int, help="when serving: most runs at the same time (default: no limit)"
    )


def parse_parameter(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as JSON when it is JSON (64, true)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"parameter {text!r} must look like NAME=VALUE")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    if isinstance(parsed, (dict, list)):  # only scalars are parameters here
        parsed = value
    return key.strip(), parsed


def main(args: argparse.Namespace) -> int:
    from flows.deploy import absolute_paths, check_spec, load_spec, register, require_api, serve

    parameters = dict(parse_parameter(p) for p in args.param)
    spec = load_spec(args.name, args.prefect_file).with_overrides(
        parameters=parameters, cron=args.cron, timezone=args.timezone, work_pool=args.work_pool
    )
    spec = replace(spec, parameters=absolute_paths(spec.parameters))
    check_spec(spec)
    url = require_api()
    ui = ui_link(url)
    if args.work_pool:
        deployment_id = register(spec)
        print(
            f"registered label-images/{spec.name} ({deployment_id}) on work pool "
            f"{spec.work_pool!r} at {url}; start a worker where it should run: "
            f"prefect worker start --pool {spec.work_pool}"
        )
        if ui:
            print(f"Prefect UI: {ui}/deployments/deployment/{deployment_id}")
        return 0
    if ui:
        print(f"serving label-images/{spec.name}; Prefect UI: {ui}/deployments", flush=True)
    serve(spec, limit=args.limit)
    return 0


def ui_link(api_url: str) -> str | None:
    """The UI root to print, or None (and a warning saying why) when its pages would fail."""
    from flows.prefect_ui import client_ui_url, ui_problem, ui_url

    ui = client_ui_url() or ui_url(api_url)
    problem = ui_problem(api_url, ui)
    if problem:
        print(f"mixer-label deploy: warning: {problem}", file=sys.stderr)
        return None
    return ui
