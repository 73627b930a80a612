"""A forward-only stream over one S3 object that resumes after a dropped connection."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from pipeline.storage.interface import StorageError, one_line

log = logging.getLogger(__name__)

# A streaming read that breaks mid-object resumes with a ranged GET this many times.
STREAM_RESUMES = 3


class S3Stream(io.RawIOBase):
    """A raw, forward-only stream over one S3 object that resumes after a dropped connection.

    A resume is a ranged GET from the current offset, pinned to the first response's ETag so it
    can never splice two versions of an object together.
    """

    def __init__(self, storage: Any, uri: str, bucket: str, key: str):
        # storage: the S3Storage (its `client` and `error`); not imported, so no import cycle.
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._bucket, self._key = bucket, key
        self._body: Any = None
        self._etag: str | None = None
        self._size: int | None = None
        self._pos = 0

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        if self._etag:
            kwargs["IfMatch"] = f'"{self._etag}"'
        try:
            response = self._storage.client.get_object(Bucket=self._bucket, Key=self._key, **kwargs)
        except Exception as err:
            raise self._storage.error(err, self._uri, "cannot read") from None
        self._body = response["Body"]
        if self._etag is None:
            self._etag = response["ETag"].strip('"')
            self._size = response["ContentLength"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._size is not None and self._pos >= self._size:
            return 0
        for attempt in range(STREAM_RESUMES + 1):
            try:
                if self._body is None:
                    self.start()
                data = self._body.read(len(buffer))
                if not data and self._size is not None and self._pos < self._size:
                    raise OSError(f"stream ended at byte {self._pos} of {self._size}")
                break
            except StorageError:
                raise
            except Exception as err:  # connection reset, timeout, short read
                self._close_body()
                if attempt == STREAM_RESUMES:
                    raise StorageError(
                        f"{self._uri}: read failed at byte {self._pos} after {attempt} resumes: "
                        f"{type(err).__name__}: {one_line(err, 200)}"
                    ) from None
                log.info("resuming %s at byte %d after %s", self._uri, self._pos, err)
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # already broken; closing is best effort
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()
