"""Storage errors: one line each, naming the URI and what to fix."""

from __future__ import annotations


class StorageError(Exception):
    """A storage operation failed; the message names the URI and says what to fix."""


class ObjectNotFound(StorageError):
    """The object does not exist (the bucket does)."""


class StorageUnavailable(StorageError):
    """Storage kept failing for a transient reason (throttling, 5xx, resets, stalls) for the
    whole retry budget: an outage, not a wrong bucket or permission."""


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace so an error message stays on one line (an empty error: its type)."""
    flat = " ".join(str(text).split())
    if not flat and isinstance(text, BaseException):
        flat = type(text).__name__
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
