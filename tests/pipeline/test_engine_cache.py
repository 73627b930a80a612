"""pipeline.engine_cache: the TensorRT engine cache on S3 (moto) and on a local folder."""

from __future__ import annotations

import pytest

from models.backends import CacheStore
from pipeline.engine_cache import StorageCacheStore


def check_round_trip(store: StorageCacheStore) -> None:
    assert isinstance(store, CacheStore)  # what the TensorRT backend accepts
    assert store.get("mixer-abc-bf16.plan") is None
    store.put("mixer-abc-bf16.plan", b"\x00engine" * 1000)
    assert store.get("mixer-abc-bf16.plan") == b"\x00engine" * 1000
    store.put("mixer-abc-bf16.plan", b"rebuilt")
    assert store.get("mixer-abc-bf16.plan") == b"rebuilt"
    with pytest.raises(ValueError, match="not a plain file name"):
        store.get("../escape")


def test_engine_cache_on_s3(s3_server, s3_bucket):
    store = StorageCacheStore(f"s3://{s3_bucket}/engines/")
    check_round_trip(store)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["engines/mixer-abc-bf16.plan"]


def test_engine_cache_in_a_local_folder(tmp_path):
    check_round_trip(StorageCacheStore(str(tmp_path / "engines")))
    assert (tmp_path / "engines" / "mixer-abc-bf16.plan").read_bytes() == b"rebuilt"
