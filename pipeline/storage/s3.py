"""S3 and S3-compatible stores through boto3 (the only modules that import it: this and s3_stream).

S3 goes through boto3 with the standard AWS configuration chain (environment variables
including `AWS_ENDPOINT_URL_S3`, profiles, instance roles), so S3-compatible stores (MinIO,
Ceph, R2) work the same way given an endpoint. Credentials are never passed in, stored,
pickled or logged: each process resolves its own.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

from pipeline.storage.interface import (
    STREAM_BUFFER,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageOptions,
    one_line,
)
from pipeline.storage.s3_stream import S3Stream

log = logging.getLogger(__name__)

# Single PUT up to here; above it a multipart upload (S3 caps a single PUT at 5 GiB).
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_PART_SIZE = 16 * 1024 * 1024
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _aws_env_fingerprint() -> str:
    # Part of the client cache key, so a changed AWS_* environment gets a fresh client; hashed so
    # no credential sits in a dict key that might be printed.
    items = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    return hashlib.sha256(repr(items).encode()).hexdigest()


def s3_client(options: StorageOptions, max_attempts: int = 10) -> Any:
    """A cached boto3 S3 client for this process and these options.

    Clients are thread-safe and hold the connection pool, so one per process is shared by all
    threads; sessions are not thread-safe, so each is made once under a lock.
    max_attempts: 10 rides out throttling (adaptive mode); a pre-flight check uses 2 so a
    wrong endpoint fails in seconds, not after half a minute of back-off.
    """
    key = (
        os.getpid(),
        options.endpoint_url,
        options.max_pool_connections,
        max_attempts,
        _aws_env_fingerprint(),
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "adaptive", "max_attempts": max_attempts},  # SlowDown, 503
                max_pool_connections=options.max_pool_connections,
                connect_timeout=10,
                read_timeout=60,
                tcp_keepalive=True,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
            _CLIENTS[key] = client
        return client


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/part` -> ("bucket", "key/part")."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in the URI (expected s3://bucket/prefix)")
    return bucket, key


_CODE_REASONS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "InvalidAccessKeyId": "wrong AWS credentials: the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "wrong AWS credentials: the secret key does not match the key id",
    "ExpiredToken": "AWS credentials have expired",
    "InvalidToken": "AWS session token is invalid",
    "AccessDenied": "access denied (check the IAM policy for this bucket and prefix)",
    "AllAccessDisabled": "access to bucket {bucket!r} is disabled",
    "NoSuchKey": "no such object",
    "PreconditionFailed": "the object changed while it was being read",
}


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

    def check_writable(self, prefix_uri: str) -> None:
        """As Storage.check_writable, with few retries: a pre-flight check must fail fast."""
        probe = copy.copy(self)
        probe._client = s3_client(self.options, max_attempts=2)
        Storage.check_writable(probe, prefix_uri)

    def join(self, prefix_uri: str, *parts: str) -> str:
        pieces = [prefix_uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        if pieces[0] == "s3:/":  # "s3://" stripped of its slashes
            return "s3://" + "/".join(pieces[1:])
        return "/".join(pieces)

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3_uri(prefix_uri)  # here, so a bad URI fails at the call
        prefix = key if not key or key.endswith("/") else key + "/"
        return self._list(bucket, prefix, prefix_uri)

    def _list(self, bucket: str, prefix: str, prefix_uri: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    if item["Key"].endswith("/"):
                        continue  # a "folder" marker made by consoles, not an object
                    yield ObjectInfo(
                        f"s3://{bucket}/{item['Key']}", item["Size"], item["ETag"].strip('"')
                    )
        except Exception as err:
            raise self.error(err, prefix_uri, "cannot list") from None

    def get(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        bucket, key = split_s3_uri(uri)
        kwargs: dict[str, Any] = {}
        if start or end is not None:
            first = start or 0
            if end is not None and end <= first:
                return b""
            kwargs["Range"] = f"bytes={first}-" + ("" if end is None else str(end - 1))
        try:
            response = self.client.get_object(Bucket=bucket, Key=key, **kwargs)
            return response["Body"].read()
        except Exception as err:
            if error_code(err) == "InvalidRange":
                return b""  # start at or past the end: an empty slice, as for local files
            raise self.error(err, uri, "cannot read") from None

    def open(self, uri: str) -> BinaryIO:
        stream = S3Stream(self, uri, *split_s3_uri(uri))
        stream.start()
        return io.BufferedReader(stream, buffer_size=STREAM_BUFFER)  # type: ignore[return-value]

    def head(self, uri: str) -> ObjectInfo | None:
        bucket, key = split_s3_uri(uri)
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as err:
            code = error_code(err)
            if code in ("404", "NoSuchKey", "NotFound"):
                self._check_bucket(bucket, uri)
                return None
            if code in ("403", "400"):
                # HEAD responses carry no error code; a 1-byte GET tells credentials from policy.
                self._explain_with_get(bucket, key, uri, err)
            raise self.error(err, uri, "cannot stat") from None
        return ObjectInfo(uri, response["ContentLength"], response["ETag"].strip('"'))

    def put_atomic(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3_uri(uri)
        if not key:
            raise StorageError(f"{uri}: no object key to write to")
        try:
            if len(data) <= self.multipart_threshold:
                self.client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
            else:
                self._put_multipart(bucket, key, memoryview(data))
        except StorageError:
            raise
        except Exception as err:
            raise self.error(err, uri, "cannot write") from None

    def _put_multipart(self, bucket: str, key: str, data: memoryview) -> None:
        # The object appears only at complete_multipart_upload, so readers never see a part.
        upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, len(data), self.part_size), start=1):
                chunk = bytes(data[offset : offset + self.part_size])
                response = self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # the original error is the one worth reporting
                log.warning("could not abort multipart upload of s3://%s/%s", bucket, key)
            raise

    def delete(self, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as err:
            raise self.error(err, uri, "cannot delete") from None

    # ---- errors

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """Raise if the bucket is missing, so a 404 on an object never hides a wrong bucket."""
        if bucket in self._buckets_seen:
            return
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as err:
            code = error_code(err)
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
            if code in ("403", "400"):
                self._explain_with_get(bucket, "", uri, err)
            raise self.error(err, uri, "cannot reach bucket") from None
        self._buckets_seen.add(bucket)

    def _explain_with_get(self, bucket: str, key: str, uri: str, head_err: Exception) -> None:
        try:
            self.client.get_object(Bucket=bucket, Key=key or "_", Range="bytes=0-0")
        except Exception as err:
            if error_code(err) not in ("NoSuchKey", "404", "InvalidRange", "403", "400"):
                raise self.error(err, uri, "cannot read") from None

    def error(self, err: Exception, uri: str, action: str) -> StorageError:
        """A one-line StorageError naming the URI; built from codes, never from request data."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(err, StorageError):
            return err
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role)"
            )
        if isinstance(err, EndpointConnectionError):
            endpoint = self.client.meta.endpoint_url
            return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint}")
        if isinstance(err, ClientError):
            code = error_code(err)
            bucket = split_s3_uri(uri)[0]
            if code in _CODE_REASONS:
                reason = _CODE_REASONS[code].format(bucket=bucket)
                cls = ObjectNotFound if code == "NoSuchKey" else StorageError
                return cls(f"{uri}: {action}: {reason} ({code})")
            if code == "404":
                return ObjectNotFound(f"{uri}: {action}: no such object")
            if code == "403":
                return StorageError(f"{uri}: {action}: access denied or wrong credentials (403)")
            message = err.response.get("Error", {}).get("Message", "")
            return StorageError(f"{uri}: {action}: {code}: {one_line(message, 200)}")
        return StorageError(f"{uri}: {action}: {type(err).__name__}: {one_line(err, 200)}")


def error_code(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
