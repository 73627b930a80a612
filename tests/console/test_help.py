"""`--help` of every command describes every option and shows its default."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from console.main import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[2]


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (and `model info`'s), by name."""

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:  # argparse keeps subcommands there
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    found = {}
    for name, parser in children(build_parser()).items():
        found[name] = parser
        for sub_name, sub in children(parser).items():
            found[f"{name} {sub_name}"] = sub
    return found


PARSERS = _command_parsers()


def test_every_command_is_there():
    assert {name for name, _, _ in COMMANDS} <= set(PARSERS)
    assert "model info" in PARSERS


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_is_described_and_shows_its_default(name):
    parser = PARSERS[name]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{name}: {flag} has no description"
        meaningful = action.default not in (None, False, True, "", [], argparse.SUPPRESS)
        if meaningful and action.option_strings:
            # What the help formatter will print for it (before %(default)s is filled in).
            shown = parser.formatter_class(prog=parser.prog)._get_help_string(action)
            assert "default" in shown, f"{name}: {flag}'s help does not show its default"


def test_the_rendered_help_shows_the_defaults_people_ask_for():
    run = PARSERS["run"].format_help()
    assert "images per model call (default: 64)" in " ".join(run.split())
    train = " ".join(PARSERS["train"].format_help().split())
    assert "passes over the training split (default: 12)" in train
    assert "(default: demo)" in train and "(default: 0.002)" in train


def test_help_comes_without_torch():
    # `mixer-label train --help` once imported torch to learn the training defaults.
    probe = (
        "import sys\nfrom console.main import main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["model", "info", "tiny", "-v"], True),
        (["model", "-v", "info", "tiny"], True),
        (["model", "info", "tiny"], False),
    ],
)
def test_verbose_is_taken_before_or_after_the_model_action(argv, verbose):
    args = build_parser().parse_args(argv)
    assert args.verbose is verbose and args.model == "tiny"
