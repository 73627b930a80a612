"""The one place where an error becomes a one-line message and an exit code.

The library layers raise their own errors (`CheckpointError`, `RunError`, `StorageError`,
`TrainError`, `DeployError`, ...), each with a message that alone tells the user what to fix;
the console prints that message as `mixer-label COMMAND: error: MESSAGE` and exits 2. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

# Exit codes: 0 done, 1 done but some of the work failed (a failed shard, a failed check),
# 2 refused with a one-line error, 130 interrupted (the shell's code for SIGINT).
OK, PARTLY_FAILED, ERROR, INTERRUPTED = 0, 1, 2, 130


MESSAGE_LIMIT = 2000  # characters: a preset list fits, a runaway message does not flood


class UsageError(ValueError):
    """A flag or argument value the console itself refuses; the message names the flag."""


# The errors whose message is meant for the user: (module, class name). They are looked up in
# sys.modules rather than imported: an error of a module nobody imported cannot have been
# raised, and importing one only to compare would pull torch, Ray or boto3 into a failed start.
EXPECTED: tuple[tuple[str, str], ...] = (
    ("console.errors", "UsageError"),
    ("models.checkpoints", "CheckpointError"),
    ("pipeline.runspec", "RunError"),
    ("pipeline.settings", "SettingError"),
    ("pipeline.pool", "PoolError"),
    ("pipeline.storage", "StorageError"),
    ("pipeline.train_config", "TrainError"),
    ("flows.deploy", "DeployError"),
    ("flows.demo", "DemoError"),
    ("pipeline.local_servers", "ServerError"),
)

# Per command, broader errors that are still the user's to fix there: the bench builds every
# backend/precision it is asked for, and one that cannot be built says so in a ValueError;
# a --model or --inputs file it cannot read is an OSError.
EXPECTED_BY_COMMAND: dict[str, tuple[type[BaseException], ...]] = {
    "bench": (ValueError, OSError),
}


def is_expected(err: BaseException, command: str = "") -> bool:
    """True when `err` is one of the errors whose message is for the user."""
    if isinstance(err, EXPECTED_BY_COMMAND.get(command, ())):
        return True
    for module_name, name in EXPECTED:
        module = sys.modules.get(module_name)
        error_type = getattr(module, name, None) if module is not None else None
        if isinstance(error_type, type) and isinstance(err, error_type):
            return True
    return False


def message(err: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """The one line to print for `err`; a setting is named by its flag (`--batch-size`)."""
    from pipeline.storage.errors import one_line  # the project's one whitespace folder

    settings = sys.modules.get("pipeline.settings")
    if settings is not None and isinstance(err, settings.SettingError) and not err.names_itself:
        flag = (flags or {}).get(err.name, "--" + err.name.replace("_", "-"))
        return one_line(f"{flag} {err.problem}" if flag else err.problem, MESSAGE_LIMIT)
    return one_line(str(err), MESSAGE_LIMIT)


def exit_code(
    command: str, handler: Callable[[], int | None], flags: Mapping[str, str] | None = None
) -> int:
    """Run `handler`; its return value, or the exit code of what it raised (printed on stderr).

    `flags`: the command's flag for a setting whose flag is not --name-with-dashes.
    """
    try:
        return int(handler() or OK)
    except BrokenPipeError:  # `mixer-label ... | head` closed the pipe: not an error
        sys.stderr.close()
        return OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        if not is_expected(err, command):
            raise
        print(f"mixer-label {command}: error: {message(err, flags)}", file=sys.stderr)
        return ERROR
