"""Model weights named by an s3:// URI, downloaded once per node into a local cache.

The calibration images beside the checkpoint (`auto` checks precisions on them) come along.

Actors on the same node share one download: a file lock serializes them, and the file appears
under its final name only when complete, so a crash mid-download never leaves a torn checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def cache_dir() -> Path:
    """`models/` in the cache folder (`$MIXER_LABEL_CACHE`, else ~/.cache/mixer-label)."""
    from models.backends.cache import default_cache_dir

    return default_cache_dir() / "models"


def local_model(spec: str, storage_options=None) -> str:
    """A local path (or preset name) for `spec`; s3:// checkpoints are fetched once per node."""
    if not spec.startswith("s3://"):
        return spec
    from models.backends.cache import file_lock
    from models.backends.calibration import calibration_files
    from pipeline.storage import StorageError, open_storage

    storage = open_storage(spec, storage_options)
    info = storage.head(spec)
    if info is None:
        raise StorageError(f"{spec}: no such model object")
    # Keyed by URI and ETag: a new upload under the same name is a new cache entry.
    digest = hashlib.sha256(f"{spec}\n{info.etag}".encode()).hexdigest()[:20]
    target = cache_dir() / digest / spec.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        return str(target)
    with file_lock(target):  # the other actors of this node wait here
        if not target.is_file():
            # The calibration images first: a complete checkpoint means both are there.
            for name in calibration_files(target.name):
                uri = storage.join(spec.rstrip("/").rsplit("/", 1)[0], name)
                if storage.head(uri) is not None:
                    _download(storage, uri, target.with_name(name))
            _download(storage, spec, target)
    return str(target)


def _download(storage, uri: str, target: Path) -> None:
    from models.backends.cache import atomic_file

    with storage.open(uri) as source, atomic_file(target) as sink:
        for chunk in iter(lambda: source.read(8 << 20), b""):
            sink.write(chunk)
