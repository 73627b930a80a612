"""The storage interface every backend implements, its errors and its small value types.

Listing treats the prefix as a folder (`s3://b/data` lists `data/...`, never `database/...`),
streams page by page and is sorted by key. Byte ranges are half-open like a slice.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pipeline.storage.errors import StorageError, StorageUnavailable
from pipeline.storage.retry import RetryPolicy

log = logging.getLogger(__name__)

STREAM_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, size in bytes and ETag (a change detector)."""

    uri: str
    size: int
    etag: str


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3; picklable and credential-free (credentials come from the AWS chain).

    endpoint_url: an S3-compatible endpoint (MinIO, Ceph, R2, a local test server); None uses
    the chain (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, config files), else AWS itself.
    max_pool_connections: HTTP connections per process; size it to the download thread pool.
    retry: how long calls retry transient failures and how slow a read may get (retry.py).
    """

    endpoint_url: str | None = None
    max_pool_connections: int = 32
    retry: RetryPolicy = RetryPolicy()


class Storage(ABC):
    """List, read, and atomically write objects under URIs of one scheme."""

    @abstractmethod
    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        """Every object under the folder prefix_uri, recursively, sorted by key, streamed."""

    @abstractmethod
    def get(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or bytes [start, end) of it (end exclusive, like a slice)."""

    @abstractmethod
    def open(self, uri: str) -> BinaryIO:
        """A buffered, streaming, read-only binary file over the object (use `with`)."""

    @abstractmethod
    def head(self, uri: str) -> ObjectInfo | None:
        """The object's info, or None when it does not exist."""

    @abstractmethod
    def put_atomic(self, uri: str, data: bytes) -> None:
        """Write data so readers see either the old object or all of the new one."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the object; a missing object is fine."""

    @abstractmethod
    def join(self, prefix_uri: str, *parts: str) -> str:
        """prefix_uri / part / part..., with exactly one slash between parts."""

    def for_preflight(self) -> Storage:
        """This storage as pre-flight checks use it: a remote endpoint that refuses connections
        fails in seconds (a wrong endpoint), while throttling keeps the whole retry budget."""
        return self

    def with_deadline(self, deadline: float | None) -> Storage:
        """This storage, with retries stopping at `deadline` (monotonic seconds) if remote."""
        return self

    def exists(self, uri: str) -> bool:
        """Whether the object exists."""
        return self.head(uri) is not None

    def check_writable(self, prefix_uri: str) -> None:
        """Write and delete a tiny probe under prefix_uri; raise StorageError if that fails.

        Run it before any work so a wrong bucket, credentials or permissions fail the run in
        seconds, not after the first shard. Throttling or an outage that outlasts the retry
        budget is reported as that (StorageUnavailable), never as "not writable".
        """
        probe = self.join(prefix_uri, f"_mixer_label_write_probe-{uuid.uuid4().hex[:12]}")
        try:
            self.put_atomic(probe, b"probe\n")
        except StorageUnavailable as err:
            reason = str(err).removeprefix(f"{probe}: ").removeprefix("cannot write: ")
            raise StorageUnavailable(
                f"{prefix_uri}: cannot check that the output is writable: {reason}"
            ) from None
        except StorageError as err:
            reason = str(err).removeprefix(f"{probe}: ").removeprefix("cannot write: ")
            raise StorageError(f"{prefix_uri}: output not writable: {reason}") from None
        try:
            self.delete(probe)
        except StorageError as err:
            # Write-only roles are legitimate: the run never deletes, so only warn.
            log.warning("could not delete the write probe %s: %s", probe, err)
