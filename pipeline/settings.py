"""A setting whose value cannot work, named so that each caller can say it its own way.

The library names a setting by its field (`batch_size`, as the flow's parameter form does); the
console names the same setting by its flag (`--batch-size`). SettingError carries the name and
the problem apart, and the checks here say what would be right.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class SettingError(ValueError):
    """`name` (a field name) has a value that cannot work; str(): "NAME PROBLEM".

    names_itself: the problem already names the value (a URI, redacted), so it stands alone.
    """

    def __init__(self, name: str, problem: str, *, names_itself: bool = False) -> None:
        super().__init__(problem if names_itself else f"{name} {problem}")
        self.name = name
        self.problem = problem
        self.names_itself = names_itself


def closest(value: str, choices: Sequence[str]) -> str | None:
    """The choice most like `value` (a typo's intended name), or None when none is close."""
    by_case = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(value.lower(), list(by_case), n=1, cutoff=0.5)
    return by_case[match[0]] if match else None


def check_one_of(name: str, value: object, choices: Sequence[str]) -> None:
    """SettingError unless `value` is one of `choices`; the message lists them all."""
    if value in choices:
        return
    near = closest(str(value), choices)
    hint = f" (closest: {near})" if near else ""
    raise SettingError(name, f"must be one of {', '.join(choices)}, not {value!r}{hint}")


def check_at_least(name: str, value: int | float | None, minimum: int, optional=False) -> None:
    """SettingError unless `value` >= minimum (None passes when the setting is optional)."""
    if value is None and optional:
        return
    if value is None or value < minimum:
        raise SettingError(name, f"must be at least {minimum}, not {value}")


def is_preset(name: str) -> bool:
    """True when `name` names a preset ("B/16", "b16", "mixer_b16")."""
    from models.presets import preset_config

    try:
        preset_config(name)
    except KeyError:
        return False
    return True


def unknown_preset(name: str) -> str:
    """What to say of a name that is no preset: the list, and the closest one."""
    from models.presets import PRESETS

    near = closest(name, list(PRESETS))
    return f"presets: {', '.join(PRESETS)}" + (f"; closest: {near}" if near else "")
