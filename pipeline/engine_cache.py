"""TensorRT engines (and any other `models.backends.CacheStore` bytes) under a storage prefix.

`models/` knows nothing of S3; this adapter gives the TensorRT backend a cache on an S3 prefix
(or a local folder) through pipeline.storage, so a cluster builds each engine once and every
GPU worker of the same kind loads it:

    store = StorageCacheStore("s3://bucket/mixer-label/engines/", options)
    create(model, "tensorrt", cache_store=store)
"""

from __future__ import annotations

from pipeline.storage import ObjectNotFound, StorageOptions, open_storage


class StorageCacheStore:
    """`get(key) -> bytes | None` and `put(key, data)` on objects under `prefix_uri`."""

    def __init__(self, prefix_uri: str, options: StorageOptions | None = None) -> None:
        self.prefix_uri = prefix_uri
        self.storage = open_storage(prefix_uri, options)

    def uri(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"cache key {key!r} is not a plain file name")
        return self.storage.join(self.prefix_uri, key)

    def get(self, key: str) -> bytes | None:
        try:
            return self.storage.get(self.uri(key))
        except ObjectNotFound:
            return None

    def put(self, key: str, data: bytes) -> None:
        self.storage.put_atomic(self.uri(key), data)

    def __repr__(self) -> str:
        return f"StorageCacheStore({self.prefix_uri!r})"
