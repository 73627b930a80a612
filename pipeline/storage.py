"""`s3://bucket/prefix` and local paths behind one small interface.

S3 goes through boto3 with the standard AWS configuration chain (environment variables
including `AWS_ENDPOINT_URL_S3`, profiles, instance roles), so S3-compatible stores (MinIO,
Ceph, R2) work the same way given an endpoint. Credentials are never passed in, stored,
pickled or logged: each process resolves its own.

Listing treats the prefix as a folder (`s3://b/data` lists `data/...`, never `database/...`),
streams page by page and is sorted by key. Byte ranges are half-open like a slice.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# Single PUT up to here; above it a multipart upload (S3 caps a single PUT at 5 GiB).
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_PART_SIZE = 16 * 1024 * 1024
STREAM_BUFFER = 1024 * 1024
# A streaming read that breaks mid-object resumes with a ranged GET this many times.
STREAM_RESUMES = 3
_PARTIAL_SUFFIX = ".tmp-partial"  # local put_atomic temp files; never listed


class StorageError(Exception):
    """A storage operation failed; the message names the URI and says what to fix."""


class ObjectNotFound(StorageError):
    """The object does not exist (the bucket does)."""


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
    """

    endpoint_url: str | None = None
    max_pool_connections: int = 32


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

    def exists(self, uri: str) -> bool:
        """Whether the object exists."""
        return self.head(uri) is not None

    def check_writable(self, prefix_uri: str) -> None:
        """Write and delete a tiny probe under prefix_uri; raise StorageError if that fails.

        Run it before any work so a wrong bucket, credentials or permissions fail the run in
        seconds, not after the first shard.
        """
        probe = self.join(prefix_uri, f"_mixer_label_write_probe-{uuid.uuid4().hex[:12]}")
        try:
            self.put_atomic(probe, b"probe\n")
        except StorageError as err:
            reason = str(err).removeprefix(f"{probe}: ").removeprefix("cannot write: ")
            raise StorageError(f"{prefix_uri}: output not writable: {reason}") from None
        try:
            self.delete(probe)
        except StorageError as err:
            # Write-only roles are legitimate: the run never deletes, so only warn.
            log.warning("could not delete the write probe %s: %s", probe, err)


def open_storage(uri: str, options: StorageOptions | None = None) -> Storage:
    """The Storage for a URI: S3 for `s3://...`, the local file system for a path or `file://`."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "s3":
        return S3Storage(options or StorageOptions())
    if scheme in ("", "file"):
        return LocalStorage()
    raise StorageError(
        f"{uri}: unsupported URI scheme {scheme!r} (use s3://bucket/prefix or a path)"
    )


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace so an error message stays on one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --------------------------------------------------------------------------- local files


class LocalStorage(Storage):
    """Local paths (or `file://` URIs). ETag = size + mtime_ns, see `head`."""

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri)

    def join(self, prefix_uri: str, *parts: str) -> str:
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        head = prefix_uri.rstrip("/")
        if not tail:
            return prefix_uri
        if not head:
            return ("/" if prefix_uri.startswith("/") else "") + tail
        return f"{head}/{tail}"

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        root = self._path(prefix_uri)
        if not root.is_dir():
            return
        yield from self._walk(prefix_uri, root, "")

    def _walk(self, prefix_uri: str, folder: Path, rel: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise StorageError(
                f"{self.join(prefix_uri, rel)}: cannot list: {one_line(err)}"
            ) from None
        # Sort a folder as "name/" so the walk yields full keys in plain string order, as S3 does
        # ("a-b" < "a/x" because "-" < "/").
        keyed = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                keyed.append((entry.name + "/", entry))
            elif not entry.name.endswith(_PARTIAL_SUFFIX):
                keyed.append((entry.name, entry))
        keyed.sort(key=lambda pair: pair[0])
        for sort_key, entry in keyed:
            child = rel + entry.name
            if sort_key.endswith("/"):
                yield from self._walk(prefix_uri, Path(entry.path), child + "/")
                continue
            try:
                st = entry.stat()
            except OSError:
                continue  # removed since the scan, or a dangling symlink: not an object
            if entry.is_file():
                yield ObjectInfo(self.join(prefix_uri, child), st.st_size, _local_etag(st))

    def get(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            with open(self._path(uri), "rb") as f:
                if start:
                    f.seek(start)
                if end is None:
                    return f.read()
                return f.read(max(0, end - (start or 0)))
        except OSError as err:
            raise _local_error(uri, err, "cannot read") from None

    def open(self, uri: str) -> BinaryIO:
        try:
            return open(self._path(uri), "rb", buffering=STREAM_BUFFER)
        except OSError as err:
            raise _local_error(uri, err, "cannot read") from None

    def head(self, uri: str) -> ObjectInfo | None:
        """Info from os.stat; the ETag is size + mtime_ns.

        Why not a content hash: planning a run heads every input shard and output file, and
        hashing would read every byte of every shard just to decide what to skip. put_atomic
        replaces files (new mtime), and any in-place edit changes the mtime too.
        """
        try:
            st = self._path(uri).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise _local_error(uri, err, "cannot stat") from None
        if not self._path(uri).is_file():
            return None
        return ObjectInfo(uri, st.st_size, _local_etag(st))

    def put_atomic(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_PARTIAL_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX within one file system
        except OSError as err:
            with contextlib.suppress(OSError):  # the parent may not exist or be a file
                tmp.unlink(missing_ok=True)
            raise _local_error(uri, err, "cannot write") from None

    def delete(self, uri: str) -> None:
        try:
            self._path(uri).unlink(missing_ok=True)
        except OSError as err:
            raise _local_error(uri, err, "cannot delete") from None


def _local_etag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def _local_error(uri: str, err: OSError, action: str) -> StorageError:
    reason = err.strerror or one_line(err)
    if isinstance(err, FileNotFoundError):
        return ObjectNotFound(f"{uri}: no such file")
    return StorageError(f"{uri}: {action}: {reason}")


# --------------------------------------------------------------------------- S3

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
            raise self._error(err, prefix_uri, "cannot list") from None

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
            if _error_code(err) == "InvalidRange":
                return b""  # start at or past the end: an empty slice, as for local files
            raise self._error(err, uri, "cannot read") from None

    def open(self, uri: str) -> BinaryIO:
        stream = _S3Stream(self, uri)
        stream.start()
        return io.BufferedReader(stream, buffer_size=STREAM_BUFFER)  # type: ignore[return-value]

    def head(self, uri: str) -> ObjectInfo | None:
        bucket, key = split_s3_uri(uri)
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as err:
            code = _error_code(err)
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
                self.client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
            else:
                self._put_multipart(bucket, key, memoryview(data))
        except StorageError:
            raise
        except Exception as err:
            raise self._error(err, uri, "cannot write") from None

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
            raise self._error(err, uri, "cannot delete") from None

    # ---- errors

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """Raise if the bucket is missing, so a 404 on an object never hides a wrong bucket."""
        if bucket in self._buckets_seen:
            return
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as err:
            code = _error_code(err)
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
            if code in ("403", "400"):
                self._explain_with_get(bucket, "", uri, err)
            raise self._error(err, uri, "cannot reach bucket") from None
        self._buckets_seen.add(bucket)

    def _explain_with_get(self, bucket: str, key: str, uri: str, head_err: Exception) -> None:
        try:
            self.client.get_object(Bucket=bucket, Key=key or "_", Range="bytes=0-0")
        except Exception as err:
            if _error_code(err) not in ("NoSuchKey", "404", "InvalidRange", "403", "400"):
                raise self._error(err, uri, "cannot read") from None

    def _error(self, err: Exception, uri: str, action: str) -> StorageError:
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
            code = _error_code(err)
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


def _error_code(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class _S3Stream(io.RawIOBase):
    """A raw, forward-only stream over one S3 object that resumes after a dropped connection.

    A resume is a ranged GET from the current offset, pinned to the first response's ETag so it
    can never splice two versions of an object together.
    """

    def __init__(self, storage: S3Storage, uri: str):
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._bucket, self._key = split_s3_uri(uri)
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
            raise self._storage._error(err, self._uri, "cannot read") from None
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
