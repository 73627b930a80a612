"""Where exported graphs and built engines are kept: a local folder, or any store you pass.

models/ knows nothing of S3; a remote cache (an S3 prefix shared by a cluster, so it builds a
TensorRT engine once) is any object with `get(key) -> bytes | None` and `put(key, data)`.
pipeline/ adapts its Storage to that protocol.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class CacheStore(Protocol):
    """Bytes by key; `get` returns None for a key never put. Keys are safe file names."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


def default_cache_dir() -> Path:
    """$MIXER_LABEL_CACHE, else $XDG_CACHE_HOME/mixer-label, else ~/.cache/mixer-label."""
    if os.environ.get("MIXER_LABEL_CACHE"):
        return Path(os.environ["MIXER_LABEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixer-label"


class LocalCacheStore:
    """A folder of files named by key, each written atomically (temp file, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if not key or "/" in key or "\\" in key or key.startswith("."):
            raise ValueError(f"cache key {key!r} is not a plain file name")
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as f:
            f.write(data)

    def __repr__(self) -> str:
        return f"LocalCacheStore({str(self.root)!r})"


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A file that becomes `target` (fsynced, renamed) when the block ends without an error.

    Opened like any new file, so it gets the umask's permissions: a cache several users or
    services of one node share stays readable (tempfile's files are 0600).
    """
    partial = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:12]}")
    try:
        with open(partial, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock named after `path` (`path.lock`), shared by every process here.

    The processes of one machine (actors of a node) wait here while the first builds, measures
    or downloads what `path` will hold, then find it done.
    """
    import fcntl  # POSIX only; imported here so the module itself imports anywhere

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
