"""S3 and S3-compatible stores through boto3 (with s3_stream and s3_errors, the only boto3 users).

S3 goes through boto3 with the standard AWS configuration chain (environment variables
including `AWS_ENDPOINT_URL_S3`, profiles, instance roles), so S3-compatible stores (MinIO,
Ceph, R2) work the same way given an endpoint. Credentials are never passed in, stored,
pickled or logged: each process resolves its own.

Every call follows one retry policy (retry.py): botocore's adaptive mode paces requests after
throttling (its client-side rate limiter), and this module retries every transient failure for
a time budget; botocore itself makes one attempt per call, so the budget is the only limit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

from pipeline.storage.errors import StorageError
from pipeline.storage.interface import STREAM_BUFFER, ObjectInfo, Storage, StorageOptions
from pipeline.storage.retry import RetryClock
from pipeline.storage.s3_errors import error_code, to_storage_error, transient
from pipeline.storage.s3_stream import S3Reader
from pipeline.storage.uris import check_uri, safe_endpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

# Single PUT up to here; above it a multipart upload (S3 caps a single PUT at 5 GiB).
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_PART_SIZE = 16 * 1024 * 1024
# A pre-flight check gives an endpoint that refuses connections this long: a wrong endpoint
# fails in seconds, while throttling still gets the whole budget.
PREFLIGHT_UNREACHABLE_S = 5.0
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _aws_env_fingerprint() -> str:
    # Part of the client cache key, so a changed AWS_* environment gets a fresh client; hashed so
    # no credential sits in a dict key that might be printed.
    items = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    return hashlib.sha256(repr(items).encode()).hexdigest()


def s3_client(options: StorageOptions) -> Any:
    """A cached boto3 S3 client for this process and these options.

    Clients are thread-safe and hold the connection pool, so one per process is shared by all
    threads; sessions are not thread-safe, so each is made once under a lock. The read timeout
    is the policy's progress window: a socket silent that long is a stalled read.
    """
    window = options.retry.window_s
    key = (
        os.getpid(),
        options.endpoint_url,
        options.max_pool_connections,
        window,
        _aws_env_fingerprint(),
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                # adaptive: the client-side rate limiter backs off after SlowDown; one attempt
                # per call, the retrying is ours (a time budget, see retry.py).
                retries={"mode": "adaptive", "max_attempts": 1},
                max_pool_connections=options.max_pool_connections,
                connect_timeout=min(10.0, window),
                read_timeout=window,
                tcp_keepalive=True,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
            _CLIENTS[key] = client
        return client


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/part` -> ("bucket", "key/part"); URIs carrying a secret are refused."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{check_uri(uri)}: not an s3:// URI")
    check_uri(uri)
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in the URI (expected s3://bucket/prefix)")
    return bucket, key


class S3Storage(Storage):
    """S3 and S3-compatible stores through boto3; see the module docstring."""

    def __init__(
        self,
        options: StorageOptions | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = MULTIPART_PART_SIZE,
        page_size: int = 1000,
    ):
        self.options = options or StorageOptions()
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.page_size = page_size  # keys per list request; 1000 is S3's maximum
        self.deadline: float | None = None  # monotonic; no retry past it (see with_deadline)
        self._client: Any = None
        self._buckets_seen: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # The client (and the credentials it resolved) never travels; each process makes its own.
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.options)
        return self._client

    @property
    def policy(self):
        return self.options.retry

    def with_deadline(self, deadline: float | None) -> S3Storage:
        """A view of this storage (same client) whose calls stop retrying at `deadline`."""
        view = copy.copy(self)
        view.deadline = deadline
        return view

    def for_preflight(self) -> S3Storage:
        view = copy.copy(self)  # the same client: only the retry policy differs
        retry = dataclasses.replace(self.options.retry, unreachable_s=PREFLIGHT_UNREACHABLE_S)
        view.options = dataclasses.replace(self.options, retry=retry)
        return view

    def check_writable(self, prefix_uri: str) -> None:
        """As Storage.check_writable; an endpoint refusing connections fails in seconds, while
        throttling and 5xx are retried for the whole budget and reported as such."""
        Storage.check_writable(self.for_preflight(), prefix_uri)

    def join(self, prefix_uri: str, *parts: str) -> str:
        pieces = [prefix_uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        if pieces[0] == "s3:/":  # "s3://" stripped of its slashes
            return "s3://" + "/".join(pieces[1:])
        return "/".join(pieces)

    # ---- the retry loop every call goes through

    def _call(self, uri: str, action: str, fn: Callable[[], T]) -> T:
        """fn() under the retry policy; non-transient errors become a StorageError at once."""
        clock = RetryClock(self.policy, self.deadline)
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as err:
                reason = transient(err, self.client.meta.endpoint_url)
                if reason is None:
                    raise
                log.info("retrying %s (%s): %s", uri, action, reason.describe())
                clock.failed(uri, action, reason)

    def _error(self, err: Exception, uri: str, action: str) -> StorageError:
        return to_storage_error(err, uri, action, self.client.meta.endpoint_url)

    # ---- the operations

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3_uri(prefix_uri)  # here, so a bad URI fails at the call
        prefix = key if not key or key.endswith("/") else key + "/"
        return self._list(bucket, prefix, prefix_uri)

    def _list(self, bucket: str, prefix: str, prefix_uri: str) -> Iterator[ObjectInfo]:
        # Our own pagination: a page that fails is retried from its continuation token.
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self._call(
                    prefix_uri, "cannot list", lambda kw=kwargs: self.client.list_objects_v2(**kw)
                )
            except Exception as err:
                raise self._error(err, prefix_uri, "cannot list") from None
            for item in page.get("Contents", ()):
                if item["Key"].endswith("/"):
                    continue  # a "folder" marker made by consoles, not an object
                yield ObjectInfo(
                    f"s3://{bucket}/{item['Key']}", item["Size"], item["ETag"].strip('"')
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _reader(self, uri: str, start: int = 0, end: int | None = None) -> S3Reader:
        bucket, key = split_s3_uri(uri)
        return S3Reader(
            self.client,
            uri,
            bucket,
            key,
            self.policy,
            start=start,
            end=end,
            deadline=self.deadline,
            endpoint=self.client.meta.endpoint_url,
        )

    def get(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        first = start or 0
        if end is not None and end <= first:
            split_s3_uri(uri)
            return b""
        reader = self._reader(uri, first, end)
        try:
            return reader.readall()
        finally:
            reader.close()

    def open(self, uri: str) -> BinaryIO:
        reader = self._reader(uri)
        reader.start()
        return io.BufferedReader(reader, buffer_size=STREAM_BUFFER)  # type: ignore[return-value]

    def head(self, uri: str) -> ObjectInfo | None:
        bucket, key = split_s3_uri(uri)
        try:
            response = self._call(
                uri, "cannot stat", lambda: self.client.head_object(Bucket=bucket, Key=key)
            )
        except Exception as err:
            code = error_code(err)
            if code in ("404", "NoSuchKey", "NotFound"):
                self._check_bucket(bucket, uri)
                return None
            if code in ("403", "400"):
                # HEAD responses carry no error code; a 1-byte GET tells credentials from policy.
                self._explain_with_get(bucket, key, uri, err)
            raise self._error(err, uri, "cannot stat") from None
        return ObjectInfo(uri, response["ContentLength"], response["ETag"].strip('"'))

    def put_atomic(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3_uri(uri)
        if not key:
            raise StorageError(f"{uri}: no object key to write to")
        try:
            if len(data) <= self.multipart_threshold:
                body = bytes(data)
                self._call(
                    uri,
                    "cannot write",
                    lambda: self.client.put_object(Bucket=bucket, Key=key, Body=body),
                )
            else:
                self._put_multipart(uri, bucket, key, memoryview(data))
        except StorageError:
            raise
        except Exception as err:
            raise self._error(err, uri, "cannot write") from None

    def _put_multipart(self, uri: str, bucket: str, key: str, data: memoryview) -> None:
        # The object appears only at complete_multipart_upload, so readers never see a part.
        action = "cannot write"
        client = self.client
        upload_id = self._call(
            uri, action, lambda: client.create_multipart_upload(Bucket=bucket, Key=key)
        )["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, len(data), self.part_size), start=1):
                chunk = bytes(data[offset : offset + self.part_size])

                def upload(number: int = number, chunk: bytes = chunk) -> Any:
                    return client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                    )

                response = self._call(uri, action, upload)
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
            done = {"Parts": parts}
            self._call(
                uri,
                action,
                lambda: client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload=done
                ),
            )
        except BaseException:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # the original error is the one worth reporting
                log.warning("could not abort multipart upload of s3://%s/%s", bucket, key)
            raise

    def delete(self, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self._call(
                uri, "cannot delete", lambda: self.client.delete_object(Bucket=bucket, Key=key)
            )
        except Exception as err:
            raise self._error(err, uri, "cannot delete") from None

    # ---- errors

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """Raise if the bucket is missing, so a 404 on an object never hides a wrong bucket."""
        if bucket in self._buckets_seen:
            return
        try:
            self._call(uri, "cannot reach bucket", lambda: self.client.head_bucket(Bucket=bucket))
        except StorageError:
            raise
        except Exception as err:
            code = error_code(err)
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
            if code in ("403", "400"):
                self._explain_with_get(bucket, "", uri, err)
            raise self._error(err, uri, "cannot reach bucket") from None
        self._buckets_seen.add(bucket)

    def _explain_with_get(self, bucket: str, key: str, uri: str, head_err: Exception) -> None:
        def probe() -> Any:
            return self.client.get_object(Bucket=bucket, Key=key or "_", Range="bytes=0-0")

        try:
            self._call(uri, "cannot read", probe)
        except StorageError:
            raise
        except Exception as err:
            if error_code(err) not in ("NoSuchKey", "404", "InvalidRange", "403", "400"):
                raise self._error(err, uri, "cannot read") from None

    def endpoint(self) -> str | None:
        """The endpoint URL fit to print (no userinfo)."""
        return safe_endpoint(self.client.meta.endpoint_url)
