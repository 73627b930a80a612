"""`s3://bucket/prefix` and local paths behind one small interface.

`interface` holds the Storage interface, its errors and value types; `local` the file system;
`s3` (and `s3_stream`) the only modules that touch boto3. Callers import from here.
"""

from __future__ import annotations

from pipeline.storage.errors import ObjectNotFound, StorageError, StorageUnavailable, one_line
from pipeline.storage.interface import ObjectInfo, Storage, StorageOptions
from pipeline.storage.local import LocalStorage
from pipeline.storage.retry import RetryPolicy
from pipeline.storage.s3 import S3Storage, split_s3_uri
from pipeline.storage.uris import check_uri, redact

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "RetryPolicy",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageOptions",
    "StorageUnavailable",
    "check_uri",
    "one_line",
    "open_storage",
    "redact",
    "split_s3_uri",
]


def open_storage(uri: str, options: StorageOptions | None = None) -> Storage:
    """The Storage for a URI: S3 for `s3://...`, the local file system for a path or `file://`.

    A URI carrying a credential (userinfo, a presigned query) is refused here, redacted.
    """
    check_uri(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "s3":
        return S3Storage(options or StorageOptions())
    if scheme in ("", "file"):
        return LocalStorage()
    raise StorageError(
        f"{redact(uri)}: unsupported URI scheme {scheme!r} (use s3://bucket/prefix or a path)"
    )
