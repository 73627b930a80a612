"""console.errors: the one place where an error becomes a message and an exit code."""

from __future__ import annotations

import pytest

from console.errors import ERROR, INTERRUPTED, UsageError, exit_code, is_expected
from flows.deploy import DeployError
from models.checkpoints import CheckpointError
from pipeline.storage import StorageError
from pipeline.train import TrainError


def _raise(err: BaseException):
    def handler():
        raise err

    return handler


@pytest.mark.parametrize(
    "err",
    [
        UsageError("--batch-size must be at least 1, not 0"),
        CheckpointError("m.npz: no such file"),
        StorageError("s3://b/in: no such bucket"),
        TrainError("data/train: no shards found"),
        DeployError("unknown time zone 'Mars/Olympus'"),
    ],
)
def test_library_errors_become_one_line_and_exit_2(err, capsys):
    assert exit_code("run", _raise(err)) == ERROR
    err_lines = capsys.readouterr().err.splitlines()
    assert err_lines == [f"mixer-label run: error: {err}"]


def test_a_message_with_newlines_is_printed_on_one_line(capsys):
    assert exit_code("train", _raise(TrainError("first\n  second"))) == ERROR
    assert capsys.readouterr().err == "mixer-label train: error: first second\n"


def test_any_other_error_is_a_bug_and_keeps_its_traceback():
    with pytest.raises(KeyError):
        exit_code("run", _raise(KeyError("x")))
    # A plain ValueError is the user's only where a command says so (bench builds what it
    # is asked for), never in general.
    with pytest.raises(ValueError):
        exit_code("run", _raise(ValueError("x")))
    assert is_expected(ValueError("x"), "bench") and is_expected(OSError("x"), "bench")


def test_return_values_and_interrupts():
    assert exit_code("run", lambda: None) == 0
    assert exit_code("run", lambda: 1) == 1
    assert exit_code("demo", _raise(KeyboardInterrupt())) == INTERRUPTED


def test_a_setting_is_named_by_the_commands_flag(capsys):
    from pipeline.settings import SettingError

    cases = [
        (SettingError("batch_size", "must be at least 1, not 0"), {}, "--batch-size must be"),
        (
            SettingError("learning_rate", "must be positive, not 0.0"),
            {"learning_rate": "--lr"},
            "--lr must",
        ),
        (SettingError("model", "B/61: no such file"), {"model": ""}, "B/61: no such file"),
        (
            SettingError(
                "output", "output URI s3://***@b/out carries a credential", names_itself=True
            ),
            {},
            "output URI s3://***@b/out carries a credential",
        ),
    ]
    for err, flags, expected in cases:
        assert exit_code("run", _raise(err), flags) == ERROR
        assert capsys.readouterr().err.startswith(f"mixer-label run: error: {expected}")
