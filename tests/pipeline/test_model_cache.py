"""pipeline.model_cache: an s3:// checkpoint is downloaded once per node, atomically."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from models.checkpoints import load_checkpoint, save_checkpoint
from models.mixer import build_preset
from pipeline.model_cache import local_model
from pipeline.storage import StorageError, open_storage


def test_s3_checkpoint_is_fetched_once_and_shared(s3_bucket, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MIXER_LABEL_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "tiny.safetensors"
    sha256 = save_checkpoint(build_preset("tiny"), local)
    uri = f"s3://{s3_bucket}/models/tiny.safetensors"
    open_storage(uri).put_atomic(uri, local.read_bytes())
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 32, 32), np.float16), allow_pickle=False)
    calibration = buffer.getvalue()
    beside = f"s3://{s3_bucket}/models/calibration.npy"
    open_storage(beside).put_atomic(beside, calibration)

    with ThreadPoolExecutor(4) as pool:  # four actors of one node asking at once
        paths = list(pool.map(lambda _: local_model(uri), range(4)))
    assert len(set(paths)) == 1
    path = Path(paths[0])
    assert path.is_relative_to(tmp_path / "cache") and path.name == "tiny.safetensors"
    assert load_checkpoint(path).sha256 == sha256
    assert [p.name for p in path.parent.iterdir() if "part" in p.name] == []  # no torn files
    mtime = path.stat().st_mtime_ns
    assert local_model(uri) == str(path) and path.stat().st_mtime_ns == mtime  # not fetched again

    # The calibration images beside it came along: auto checks precisions on them.
    assert (path.parent / "calibration.npy").read_bytes() == calibration

    # A new upload under the same name is a new cache entry, never the stale file.
    save_checkpoint(build_preset("tiny", seed=1), local)
    open_storage(uri).put_atomic(uri, local.read_bytes())
    assert local_model(uri) != str(path)


def test_local_paths_and_presets_pass_through_and_missing_objects_are_named(s3_bucket) -> None:
    assert local_model("B/16") == "B/16"
    assert local_model("/some/file.safetensors") == "/some/file.safetensors"
    uri = f"s3://{s3_bucket}/models/missing.safetensors"
    with pytest.raises(StorageError, match="missing.safetensors"):
        local_model(uri)
