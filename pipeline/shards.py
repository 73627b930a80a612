"""Shards: the unit of work. Find them under an input URI and stream their records.

Three formats:
- `tar`: WebDataset tars (also .tar.gz / .tgz). Members `KEY.EXT`; the key is the member path
  up to the first dot of its file name (WebDataset's rule), so `a/b.jpg` + `a/b.cls` are one
  sample `a/b`. Every image member is a row; when a key repeats (a second image in a sample,
  or the key again later) the row is keyed by the member name (UniqueKeys, docs/contracts.md).
  `.cls` (an integer) and `.json` (with "label"/"cls"/"class"/"class_id") are carried as the
  ground-truth label of every image of the sample. Read as a stream (`tarfile` mode "r|*"),
  never written to disk, never extracted: a member called `../../etc/passwd.jpg` is only the key
  `../../etc/passwd`.
- `parquet`: img2dataset-style files with an image-bytes column (`jpg`, `image`, ... or a
  struct with a `bytes` field, as Hugging Face writes), a key column `key` or `url`, read one
  row group at a time with only the needed columns fetched (ranged reads).
- `images`: loose image files, grouped per folder into virtual shards of N images named
  `images-000000`, `cats__images-000001`, ... Their ETag hashes the members' ETags, so adding
  an image to a folder only redoes that folder's last shard.

Data errors never raise mid-way: a truncated tar yields what it could read, then an error
record `<shard>#truncated`. Storage errors (network, permissions) do raise, so the shard is
retried.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from pipeline.background import background_map
from pipeline.storage import ObjectInfo, ObjectNotFound, Storage, StorageError, one_line

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "avif"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# Image bytes above this become an error record instead of being read into memory.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_SIDE_FILE_MAX_BYTES = 1024 * 1024  # .cls / .json
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
KEY_COLUMNS = ("key", "url", "id")
LABEL_COLUMNS = ("label", "cls", "class", "class_id")
FOLDER_SEPARATOR = "__"  # `train/000001.tar` -> shard name `train__000001`
_MAX_NAME = 180

ShardFormat = Literal["tar", "parquet", "images"]


class ShardError(ValueError):
    """A shard cannot be read as configured (e.g. no image column); names the shard URI."""


@dataclass(frozen=True)
class Shard:
    """One unit of work.

    uri: the object (tar, parquet) or, for `images`, `<input prefix>#<name>`.
    name: unique in the run and safe as a file name; the output is `<name>.parquet`.
    etag: changes whenever the input does (resume compares it).
    members: for `images` only, the image paths relative to the input prefix.
    """

    uri: str
    name: str
    etag: str
    size: int
    format: ShardFormat
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Record:
    """One input image: its key within the shard and its bytes, or why there are none."""

    key: str
    data: bytes | None
    label: int | None = None
    error: str | None = None


# --------------------------------------------------------------------------- listing


def list_shards(storage: Storage, input_uri: str, images_per_shard: int = 1000) -> Iterator[Shard]:
    """Every shard under input_uri (a folder prefix, or one shard object), streamed in key order.

    Tar and Parquet shards are yielded as soon as the listing reaches them; loose images are
    yielded as each folder's group fills, and the remainders after the listing ends.
    Files with other extensions and hidden paths (a part starting with ".") are skipped.
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be at least 1, not {images_per_shard}")
    base = input_uri.rstrip("/") or input_uri
    names = _UniqueNames()
    pending: dict[str, list[tuple[str, ObjectInfo]]] = {}
    counters: dict[str, int] = {}

    def image_shard(folder: str) -> Shard:
        group, pending[folder] = pending[folder], []
        index = counters.get(folder, 0)
        counters[folder] = index + 1
        stem = f"images-{index:06d}"
        name = names.take(_flatten(f"{folder}/{stem}" if folder else stem), folder + stem)
        digest = hashlib.sha256()
        for rel, info in group:
            digest.update(f"{rel}\0{info.etag}\0{info.size}\n".encode("utf-8", "surrogateescape"))
        return Shard(
            uri=f"{base}#{name}",
            name=name,
            etag=digest.hexdigest()[:32],
            size=sum(info.size for _, info in group),
            format="images",
            members=tuple(rel for rel, _ in group),
        )

    listed = False
    for info in storage.list(input_uri):
        listed = True
        rel = _relative(base, info.uri)
        kind = shard_kind(rel)
        if kind is None:
            continue
        if kind == "images":
            folder = rel.rpartition("/")[0]
            pending.setdefault(folder, []).append((rel, info))
            if len(pending[folder]) >= images_per_shard:
                yield image_shard(folder)
        else:
            name = names.take(_flatten(_strip_suffix(rel)), rel)
            yield Shard(info.uri, name, info.etag, info.size, kind)
    for folder in sorted(pending):
        if pending[folder]:
            yield image_shard(folder)
    if not listed:
        # Not a folder: maybe the URI names a single shard object.
        info = storage.head(input_uri)
        name = input_uri.rstrip("/").rpartition("/")[2]
        kind = shard_kind(name) if info is not None else None
        if info is not None and kind == "images":
            single = _flatten(name)
            yield Shard(f"{input_uri}#{single}", single, info.etag, info.size, "images", ("",))
        elif info is not None and kind is not None:
            yield Shard(info.uri, _flatten(_strip_suffix(name)), info.etag, info.size, kind)


def shard_kind(path: str) -> ShardFormat | None:
    """What a listed file is by its name: a tar or parquet shard, a loose image, or nothing."""
    if any(part.startswith(".") for part in path.split("/")):
        return None  # .DS_Store, ._resource forks, .git/...
    lower = path.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.rpartition(".")[2] in IMAGE_EXTENSIONS and "." in lower.rpartition("/")[2]:
        return "images"
    return None


def _relative(base: str, uri: str) -> str:
    prefix = base if base.endswith("/") else base + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri.rpartition("/")[2]


def _strip_suffix(path: str) -> str:
    lower = path.lower()
    for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES:
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _flatten(path: str) -> str:
    """A relative path as one safe file name: folders joined by "__", odd characters as "_"."""
    name = FOLDER_SEPARATOR.join(_UNSAFE.sub("_", part) for part in path.split("/") if part)
    if not name or name.startswith("."):
        name = "_" + name
    if len(name) > _MAX_NAME:
        name = (
            name[:_MAX_NAME]
            + "-"
            + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        )
    return name


class _UniqueNames:
    """Hands out shard names, disambiguating a clash with a hash of the original path."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def take(self, name: str, source: str) -> str:
        candidate = name
        if candidate in self._taken:
            digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()
            candidate = f"{name}-{digest[:10]}"
        n = 2
        while candidate in self._taken:
            candidate, n = f"{name}-{n}", n + 1
        self._taken.add(candidate)
        return candidate


# --------------------------------------------------------------------------- reading


def read_records(
    storage: Storage,
    shard: Shard,
    image_column: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    fetch_threads: int = 16,
) -> Iterator[Record]:
    """Every record of the shard in order: one per image, with its bytes or an error.

    image_column: the Parquet column holding image bytes (default: the first of IMAGE_COLUMNS).
    fetch_threads: parallel GETs for `images` shards (loose files are latency-bound).
    Raises StorageError when storage fails (retry the shard) and ShardError for a Parquet file
    without the image column; never for broken data.
    """
    if shard.format == "tar":
        return _tar_records(storage, shard, max_bytes)
    if shard.format == "parquet":
        return _parquet_records(storage, shard, image_column, max_bytes)
    if shard.format == "images":
        return _image_records(storage, shard, max_bytes, fetch_threads)
    raise ShardError(f"{shard.uri}: unknown shard format {shard.format!r}")


def too_large(size: int, limit: int) -> str:
    """The one-line error for a file over the byte limit (shared with pipeline.preprocess)."""
    return f"file too large: {size} bytes exceeds limit {limit}"


# Errors that mean "the tar data is broken here", as opposed to storage failing (StorageError).
_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: `dir/stem.ext.ext2` -> ("dir/stem", "ext.ext2")."""
    if name.startswith("./"):
        name = name[2:]  # `tar cf x.tar .` noise, not part of the key
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _image_ext(ext: str) -> bool:
    lower = ext.lower()
    return lower in IMAGE_EXTENSIONS or lower.rpartition(".")[2] in IMAGE_EXTENSIONS


def _tar_records(storage: Storage, shard: Shard, max_bytes: int) -> Iterator[Record]:
    with storage.open(shard.uri) as stream:
        try:
            reader = _TailReader(_decompressed(stream))
            tar = tarfile.open(fileobj=reader, mode="r|")  # noqa: SIM115 (closed with stream)
        except _TAR_DATA_ERRORS as err:
            reason = one_line(err)
            yield Record(f"{shard.name}#unreadable", None, error=f"not a readable tar: {reason}")
            return
        keys = UniqueKeys()
        sample_key: str | None = None
        sample = _Sample()
        count = 0
        reading: int | None = None  # the index of the image whose data is being read
        try:
            while (member := tar.next()) is not None:
                tar.members.clear()  # streaming: do not keep every TarInfo of a huge shard
                name = printable_name(member.name, shard.uri)
                key, ext = split_member_name(name)
                if key != sample_key:
                    if sample_key is not None:
                        count += yield from sample.records(sample_key, keys)
                    sample_key, sample = key, _Sample()
                if member.isdir():
                    continue
                image = _image_ext(ext)
                if not image:
                    side = ext.lower()
                    if side not in ("cls", "json") or side in sample.side or not member.isfile():
                        continue  # captions and other members: not ours to label
                    if member.size > _SIDE_FILE_MAX_BYTES:
                        continue
                    extracted = tar.extractfile(member)
                    sample.side[side] = extracted.read() if extracted is not None else b""
                    continue
                # Every image member is a row, also a second image of one sample (d.jpg +
                # d.png) and a key seen before in the shard (see UniqueKeys for the keys).
                name = name[2:] if name.startswith("./") else name
                if not member.isfile():
                    sample.add(name, f"not a regular file in the tar (type {member.type!r})")
                    continue
                if member.size > max_bytes:
                    sample.add(name, too_large(member.size, max_bytes))
                    continue
                reading = sample.add(name, b"")
                extracted = tar.extractfile(member)
                sample.images[reading] = (name, extracted.read() if extracted else b"")
                reading = None
            # tarfile ends quietly on a cut or damaged header; only an all-zero block is an end.
            broken = _end_problem(reader, tar.offset)
        except _TAR_DATA_ERRORS as err:
            broken = one_line(err)
            if reading is not None:
                cut = sample.images[reading][0]
                sample.images[reading] = (cut, f"truncated tar: member data cut off ({broken})")
        if sample_key is not None:
            count += yield from sample.records(sample_key, keys)
        if broken:
            yield Record(
                keys.take(f"{shard.name}#truncated"),
                None,
                error=f"truncated tar: the rest of the shard is unreadable after "
                f"{count} records ({broken})",
            )


def _decompressed(stream: BinaryIO) -> BinaryIO:
    """The stream itself, or a streaming decompressor over it (gzip, bzip2, xz)."""
    magic = stream.peek(6)[:6] if hasattr(stream, "peek") else b""
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(stream)  # type: ignore[return-value]
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream)  # type: ignore[return-value]
    return stream


class _TailReader:
    """Passes reads through, keeping the byte count and the last bytes read.

    tarfile stops without an error at a truncated or invalid header past the first member;
    the tail lets us look at the block where it stopped.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._read1 = getattr(raw, "read1", None)
        self.error: str | None = None
        self.total = 0
        self._tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        if self.error:
            return b""
        try:
            # read1: a decompressor hands over what it has before it hits a cut, not nothing.
            data = self._read1(size) if self._read1 else self._raw.read(size)
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as err:
            # Seen by tarfile as a plain end of data (so it keeps what it buffered); reported
            # by _end_problem.
            self.error = one_line(err)
            return b""
        self.total += len(data)
        self._tail += data
        if len(self._tail) > 4 * tarfile.RECORDSIZE:
            del self._tail[: -2 * tarfile.RECORDSIZE]
        return data

    def block_at(self, offset: int) -> bytes | None:
        start = offset - (self.total - len(self._tail))
        return bytes(self._tail[start : start + tarfile.BLOCKSIZE]) if start >= 0 else None


def _end_problem(reader: _TailReader, offset: int) -> str | None:
    """None if the tar ended with its end-of-archive block at `offset`, else what is wrong."""
    block = reader.block_at(offset)
    if reader.error:
        return reader.error
    if block is None:
        return None  # tarfile read past our window: it saw more than a header; trust it
    if len(block) < tarfile.BLOCKSIZE:
        return f"unexpected end of data at byte {reader.total}"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"invalid tar header at byte {offset}"
    return None


class _Sample:
    """The members of one WebDataset sample: its images (in order) and .cls/.json side files."""

    def __init__(self) -> None:
        self.images: list[tuple[str, bytes | str]] = []  # (member name, bytes or an error)
        self.side: dict[str, bytes] = {}

    def add(self, name: str, data: bytes | str) -> int:
        self.images.append((name, data))
        return len(self.images) - 1

    def records(self, key: str, keys: UniqueKeys) -> Iterator[Record]:
        """One record per image member (none if the sample has none); returns the count."""
        if not self.images:
            log.debug("sample %r has no image member; skipped", key)
            return 0
        label = _label(self.side)
        for i, (name, data) in enumerate(self.images):
            # The first image keeps the sample key; any other image, or one whose sample key
            # was already used in this shard, is keyed by its member name.
            row_key = keys.take(key, name) if i == 0 else keys.take(name)
            if isinstance(data, str):
                yield Record(row_key, None, label, data)
            else:
                yield Record(row_key, data, label)
        return len(self.images)


class UniqueKeys:
    """Hands out row keys unique in one shard (the rule is in docs/contracts.md).

    take(key, fallback): `key` if free, else `fallback` if free, else the first free of
    `<fallback or key>#2`, `#3`, ... `reserved` keys (real keys a Parquet file holds further
    on) are never handed out in place of another key, so a made-up key cannot take a real one.
    """

    def __init__(self, reserved: frozenset[str] | set[str] = frozenset()) -> None:
        self._taken: set[str] = set()
        self._reserved = reserved

    def take(self, key: str, fallback: str | None = None, real: bool = False) -> str:
        """A free key; `real` marks `key` as one of the reserved (real) keys itself."""
        if key not in self._taken and (real or key not in self._reserved):
            self._taken.add(key)
            return key
        if fallback is not None and fallback not in self._taken and fallback not in self._reserved:
            self._taken.add(fallback)
            return fallback
        base = fallback or key
        n = 2
        while f"{base}#{n}" in self._taken or f"{base}#{n}" in self._reserved:
            n += 1
        self._taken.add(f"{base}#{n}")
        return f"{base}#{n}"


def printable_name(name: str, where: str = "") -> str:
    """A file or member name as a printable key: bytes that are not UTF-8 (surrogate escapes
    from tarfile or os) and control characters become `\\xNN` escapes; other names unchanged."""
    if name.isprintable():
        return name
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as surrogateescape keeps it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable() or char == " ":
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    escaped = "".join(out)
    log.warning("%s: name %r is not printable UTF-8; labeled as key %s", where, name, escaped)
    return escaped


def _label(files: dict[str, bytes | str]) -> int | None:
    cls = files.get("cls")
    if isinstance(cls, bytes):
        try:
            return int(cls.strip())
        except ValueError:
            pass
    meta = files.get("json")
    if isinstance(meta, bytes):
        try:
            value = json.loads(meta)
        except ValueError:
            return None
        if isinstance(value, dict):
            for name in LABEL_COLUMNS:
                if isinstance(value.get(name), int) and not isinstance(value[name], bool):
                    return value[name]
    return None


def _parquet_records(
    storage: Storage, shard: Shard, image_column: str | None, max_bytes: int
) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(_RangeFile(storage, shard.uri, shard.size))
    except StorageError:
        raise
    except Exception as err:  # ArrowInvalid, OSError: not Parquet, or a torn footer
        yield Record(
            f"{shard.name}#unreadable", None, error=f"not a readable parquet file: {one_line(err)}"
        )
        return
    schema = parquet.schema_arrow
    names = schema.names
    column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    if column is None or column not in names:
        wanted = repr(image_column) if image_column else f"one of {', '.join(IMAGE_COLUMNS)}"
        raise ShardError(
            f"{shard.uri}: no image column {wanted} (columns: {', '.join(names)}); "
            "name it with --image-column"
        )
    field_type = schema.field(column).type
    if pa.types.is_struct(field_type):
        if field_type.get_field_index("bytes") < 0:
            raise ShardError(f"{shard.uri}: struct column {column!r} has no 'bytes' field")
    elif not (pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type)):
        raise ShardError(f"{shard.uri}: column {column!r} is {field_type}, not image bytes")
    key_column = next((c for c in KEY_COLUMNS if c in names and c != column), None)
    label_column = next(
        (c for c in LABEL_COLUMNS if c in names and pa.types.is_integer(schema.field(c).type)),
        None,
    )
    columns = [c for c in (key_column, column, label_column) if c is not None]
    # Keys unique in the shard: a null or repeated key gets a made-up one, which must not be a
    # real key further down the file, so the key column is read first (it is small).
    keys_seen = UniqueKeys(_real_keys(parquet, key_column) if key_column else frozenset())
    row = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group, columns=columns)
        except StorageError:
            raise
        except Exception as err:
            yield Record(
                keys_seen.take(f"{shard.name}#row-group-{group}"),
                None,
                error=f"unreadable parquet row group {group} ({group_rows} rows): {one_line(err)}",
            )
            row += group_rows
            continue
        for start in range(0, table.num_rows, 256):  # bounded Python-object churn
            batch = table.slice(start, 256)
            images = batch.column(column).to_pylist()
            keys = batch.column(key_column).to_pylist() if key_column else [None] * len(images)
            labels = batch.column(label_column).to_pylist() if label_column else None
            for i, value in enumerate(images):
                if not key_column:
                    key = keys_seen.take(str(row), real=True)  # no key column: row numbers
                elif keys[i] is None:
                    key = keys_seen.take(f"{shard.name}#row-{row}")
                else:
                    key = keys_seen.take(str(keys[i]), real=True)
                label = labels[i] if labels else None
                data = value.get("bytes") if isinstance(value, dict) else value
                if data is None:
                    yield Record(key, None, label, "no image bytes (null)")
                elif len(data) > max_bytes:
                    yield Record(key, None, label, too_large(len(data), max_bytes))
                else:
                    yield Record(key, data, label)
                row += 1


def _real_keys(parquet: Any, key_column: str) -> set[str]:
    """Every non-null key of the file (row groups that cannot be read are left out)."""
    real: set[str] = set()
    for group in range(parquet.num_row_groups):
        try:
            values = parquet.read_row_group(group, columns=[key_column]).column(0).to_pylist()
        except StorageError:
            raise
        except Exception:  # reported as an error row when the images are read
            continue
        real.update(str(v) for v in values if v is not None)
    return real


class _RangeFile(io.RawIOBase):
    """A seekable read-only file over an object, reading with ranged GETs (for Parquet)."""

    def __init__(self, storage: Storage, uri: str, size: int | None = None):
        super().__init__()
        self._storage, self._uri, self._pos = storage, uri, 0
        if size is None:
            info = storage.head(uri)
            if info is None:
                raise ObjectNotFound(f"{uri}: no such object")
            size = info.size
        self._size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        data = self._storage.get(self._uri, self._pos, end)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _image_records(
    storage: Storage, shard: Shard, max_bytes: int, fetch_threads: int
) -> Iterator[Record]:
    base = shard.uri.rpartition("#")[0]
    # Keys in listing order, before the threads: file names that are not UTF-8 become
    # printable escapes, kept unique in the shard.
    keys = UniqueKeys()
    members = [
        (rel, keys.take(printable_name(rel or base.rpartition("/")[2], base)))
        for rel in shard.members
    ]

    def fetch(member: tuple[str, str]) -> Record:
        rel, key = member
        uri = storage.join(base, rel) if rel else base  # "" when the input was one image
        try:
            # A ranged GET: never more than max_bytes + 1 in memory, whatever the file's size.
            data = storage.get(uri, 0, max_bytes + 1)
        except ObjectNotFound:
            return Record(key, None, error="object disappeared after the listing")
        if len(data) > max_bytes:
            info = storage.head(uri)
            return Record(key, None, error=too_large(info.size if info else len(data), max_bytes))
        return Record(key, data)

    return background_map(fetch, members, fetch_threads, name="fetch")
