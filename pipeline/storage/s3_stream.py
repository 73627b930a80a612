"""Reading one S3 object (or a byte range of it) that survives resets, throttling and stalls.

Every byte read from S3 goes through `S3Reader`: `S3Storage.get` (whole objects, ranged GETs,
Parquet footers, loose images) reads one to the end, `S3Storage.open` wraps one as a buffered
stream (tar shards). A body that breaks or stalls mid-way is resumed with a ranged GET from the
byte reached, pinned to the first response's ETag (If-Match) so two versions of an object are
never spliced together; retries follow the storage's RetryPolicy (retry.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import Any

from pipeline.storage.errors import StorageError, StorageUnavailable
from pipeline.storage.retry import RetryClock, RetryPolicy, Transient
from pipeline.storage.s3_errors import error_code, to_storage_error, transient

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024


class S3Reader(io.RawIOBase):
    """A forward-only raw stream over bytes [start, end) of one object (end None: to its end).

    client: a boto3 S3 client; endpoint is only used in error messages. `deadline` (monotonic
    seconds) stops retrying when a shard's time is up.
    """

    def __init__(
        self,
        client: Any,
        uri: str,
        bucket: str,
        key: str,
        policy: RetryPolicy,
        start: int = 0,
        end: int | None = None,
        deadline: float | None = None,
        endpoint: str | None = None,
    ):
        super().__init__()
        self._client = client
        self._uri = uri
        self._bucket, self._key = bucket, key
        self._policy = policy
        self._clock = RetryClock(policy, deadline)
        self._endpoint = endpoint
        self._body: Any = None
        self._etag: str | None = None
        self._pos = start
        self._end = end  # exclusive; learned from the first response when None
        self.empty = False  # the range starts at or past the object's end
        self._window_start = 0.0
        self._window_bytes = 0
        self._since_failure = 0  # bytes read since the last failed attempt

    @property
    def etag(self) -> str | None:
        return self._etag

    def start(self) -> None:
        """Send the first GET now (so a missing object fails at open, not at the first read)."""
        while self._body is None and not self.empty:
            try:
                self._request()
            except Exception as err:
                self._retry_or_raise(err)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self.empty or (self._end is not None and self._pos >= self._end):
                self._close_body()
                return 0
            deadline = self._clock.deadline
            if deadline is not None and time.monotonic() > deadline:
                self._close_body()
                raise StorageUnavailable(
                    f"{self._uri}: cannot read: the shard's deadline passed at byte {self._pos}"
                )
            try:
                if self._body is None:
                    self._request()
                    if self.empty:
                        return 0
                data = self._read1(len(buffer))
            except Exception as err:
                self._retry_or_raise(err)
                continue
            n = len(data)
            buffer[:n] = data
            self._pos += n
            self._since_failure += n
            # Real progress since the last failure (a window's worth at the minimum rate, or the
            # end of the range) starts the retry budget over.
            if self._since_failure >= self._policy.min_bytes_per_s * self._policy.window_s or (
                self._end is not None and self._pos >= self._end
            ):
                self._clock.progressed()
            return n

    def readall(self) -> bytes:
        chunks = []
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while n := self.readinto(view):
            chunks.append(bytes(view[:n]))
        return b"".join(chunks)

    # ---- one attempt

    def _request(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._pos or self._end is not None:
            last = "" if self._end is None else str(self._end - 1)
            kwargs["Range"] = f"bytes={self._pos}-{last}"
        if self._etag:
            kwargs["IfMatch"] = f'"{self._etag}"'
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key, **kwargs)
        except Exception as err:
            if error_code(err) == "InvalidRange" and self._etag is None:
                self.empty = True  # start at or past the end: an empty slice, as for files
                return
            raise
        if self._etag is None:
            self._etag = str(response.get("ETag", "")).strip('"') or None
        # The bytes this response holds: a range past the object's end is cut to it.
        length = response.get("ContentLength")
        if length is not None:
            end = self._pos + int(length)
            self._end = end if self._end is None else min(self._end, end)
        self._body = response["Body"]
        self._window_start, self._window_bytes = time.monotonic(), 0

    def _read1(self, size: int) -> bytes:
        # read1 returns what has arrived instead of waiting for `size` bytes, so a trickle is
        # seen (and abandoned) after one window, not after the whole buffer dribbles in.
        raw = getattr(self._body, "_raw_stream", None)
        if raw is not None and hasattr(raw, "read1"):
            data = raw.read1(size)
        else:
            data = self._body.read(size)
        if not data and self._end is not None and self._pos < self._end:
            raise ConnectionResetError(f"body ended at byte {self._pos} of {self._end}")
        now = time.monotonic()
        self._window_bytes += len(data)
        elapsed = now - self._window_start
        if elapsed >= self._policy.window_s:
            rate = self._window_bytes / elapsed
            if rate < self._policy.min_bytes_per_s:
                raise _Stalled(f"{self._window_bytes} bytes in {elapsed:.1f} s")
            self._window_start, self._window_bytes = now, 0
        return data

    def _retry_or_raise(self, err: Exception) -> None:
        self._close_body()
        if isinstance(err, StorageError):
            raise err
        if isinstance(err, _Stalled):
            reason: Transient | None = Transient("stalled", str(err))
        else:
            reason = transient(err, self._endpoint)
        if reason is None:
            raise to_storage_error(err, self._uri, "cannot read", self._endpoint) from None
        self._since_failure = 0
        log.info("retrying %s at byte %d: %s", self._uri, self._pos, reason.describe())
        self._clock.failed(self._uri, "cannot read", reason)

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # already broken; closing is best effort
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


class _Stalled(Exception):
    """A body read below the policy's minimum rate for a whole window."""
