"""Local paths (and `file://` URIs) behind the storage interface."""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.storage.errors import ObjectNotFound, StorageError, one_line
from pipeline.storage.interface import STREAM_BUFFER, ObjectInfo, Storage

PARTIAL_SUFFIX = ".tmp-partial"  # put_atomic temp files; never listed


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
            elif not entry.name.endswith(PARTIAL_SUFFIX):
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
            raw = open(self._path(uri), "rb", buffering=0)  # noqa: SIM115 (the reader closes it)
        except OSError as err:
            raise _local_error(uri, err, "cannot read") from None
        return io.BufferedReader(_StorageErrorsOnRead(raw, uri), STREAM_BUFFER)

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
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
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


class _StorageErrorsOnRead(io.RawIOBase):
    """A file whose read errors (EIO from a failing disk or mount) are StorageErrors.

    Readers of a stream (tar, gzip, Pillow) take an OSError for broken data and say so in an
    image's row; a disk that fails to read is the storage's failure, so the shard fails and
    is retried instead, as an S3 read past its budget does.
    """

    def __init__(self, raw: io.FileIO, uri: str) -> None:
        self._raw, self._uri = raw, uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer) -> int:
        try:
            return self._raw.readinto(buffer)
        except OSError as err:
            raise _local_error(self._uri, err, "cannot read") from None

    def close(self) -> None:
        self._raw.close()
        super().close()


def _local_error(uri: str, err: OSError, action: str) -> StorageError:
    reason = err.strerror or one_line(err)
    if isinstance(err, FileNotFoundError):
        return ObjectNotFound(f"{uri}: no such file")
    return StorageError(f"{uri}: {action}: {reason}")
