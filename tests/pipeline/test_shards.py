"""pipeline.shards: listing and reading tar / Parquet / loose-image shards from both backends."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile

import pytest

from pipeline.shards import (
    Record,
    Shard,
    ShardError,
    list_shards,
    read_records,
    split_member_name,
)
from pipeline.storage import ObjectNotFound, S3Storage
from tests.pipeline import imagegen

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def one_shard(storage, root, name: str, data: bytes) -> Shard:
    storage.put_atomic(storage.join(root, name), data)
    (shard,) = list_shards(storage, root)
    return shard


def test_tar_records_carry_keys_bytes_and_labels(store):
    storage, root = store
    jpg = imagegen.jpeg_bytes(32, 24)
    png = imagegen.png_bytes(20, 20)
    samples = [
        ("cat/001", {"jpg": jpg, "cls": b"3"}),
        ("cat/002", {"json": imagegen.json_bytes({"label": 7, "url": "x"}), "PNG": png}),
        ("dog/001", {"txt": b"a caption", "webp": imagegen.webp_bytes(16, 16)}),
        ("only-text", {"txt": b"no image in this sample"}),
        ("bad-label", {"jpeg": jpg, "cls": b"not a number"}),
        ("multi.dot", {"seg.png": png}),
    ]
    shard = one_shard(storage, root, "shard-000000.tar", imagegen.tar_bytes(samples))
    assert shard.format == "tar" and shard.name == "shard-000000"
    records = list(read_records(storage, shard))
    assert [(r.key, r.label, r.error) for r in records] == [
        ("cat/001", 3, None),
        ("cat/002", 7, None),
        ("dog/001", None, None),
        ("bad-label", None, None),
        ("multi", None, None),
    ]
    assert records[0].data == jpg and records[1].data == png and records[4].data == png


def test_member_names_are_never_paths_on_disk(store, tmp_path, monkeypatch):
    storage, root = store
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    names = ["../../etc/passwd", "/abs/evil", "a/../../b", "./c", "..", "x/" + "y" * 150]
    data = imagegen.tar_bytes([(n, {"jpg": n.encode()}) for n in names])
    shard = one_shard(storage, root, "evil.tar", data)
    records = list(read_records(storage, shard))
    assert [r.key for r in records] == [
        "../../etc/passwd",
        "/abs/evil",
        "a/../../b",
        "c",
        "",
        names[-1],
    ]
    assert [r.data for r in records] == [n.encode() for n in names]
    assert list(cwd.iterdir()) == []  # nothing extracted anywhere
    assert not (tmp_path / "etc").exists()


def test_split_member_name_follows_webdataset():
    assert split_member_name("a/b/c.d.jpg") == ("a/b/c", "d.jpg")
    assert split_member_name("./img.png") == ("img", "png")
    assert split_member_name("noext") == ("noext", "")


def cut_points(data: bytes) -> dict[str, int]:
    """Where to cut a tar: inside member data, exactly at a header, inside a header."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()  # jpg, cls, jpg, cls, ...
    offsets = [m.offset for m in members]
    return {
        "in-data": members[4].offset_data + 500,  # img-000002.jpg: header whole, data cut
        "at-header": offsets[6],  # tarfile itself would end here quietly
        "in-header": offsets[6] + 100,
        "early": offsets[1] + 10,
    }


@pytest.mark.parametrize("where", ["in-data", "at-header", "in-header", "early"])
def test_truncated_tar_yields_what_it_read_then_an_error_record(store, where):
    storage, root = store
    samples = imagegen.image_samples(8)
    full = imagegen.tar_bytes(samples)
    cut = cut_points(full)[where]
    shard = one_shard(storage, root, "cut.tar", full[:cut])
    records = list(read_records(storage, shard))  # never raises
    *good, last = records
    print(where, [(r.key, r.error) for r in records])
    assert last.key == "cut#truncated" and last.data is None
    assert last.error.startswith("truncated tar:") and "\n" not in last.error
    by_key = dict(samples)
    for record in good:
        if record.error is None:
            assert record.data == by_key[record.key]["jpg"]
        else:
            assert record.error.startswith("truncated tar: member data cut off")
    assert [r.key for r in good] == [k for k, _ in samples[: len(good)]]
    expected = {"in-data": 3, "at-header": 3, "in-header": 3, "early": 1}[where]
    assert len(good) == expected
    if where == "in-data":
        assert good[-1].error and good[-1].key == "img-000002"


def test_gzipped_tar_and_its_truncation(store):
    storage, root = store
    samples = imagegen.image_samples(5)
    data = gzip.compress(imagegen.tar_bytes(samples))
    storage.put_atomic(storage.join(root, "a.tar.gz"), data)
    storage.put_atomic(storage.join(root, "b.tgz"), data[: len(data) // 2])
    a, b = list_shards(storage, root)
    assert (a.name, a.format, b.name, b.format) == ("a", "tar", "b", "tar")
    assert [r.key for r in read_records(storage, a)] == [k for k, _ in samples]
    b_records = list(read_records(storage, b))
    assert b_records[-1].key == "b#truncated" and b_records[-1].error


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"this is not a tar archive" * 40, "not a readable tar")],
)
def test_unreadable_tar_is_one_error_record(store, data, reason):
    storage, root = store
    shard = one_shard(storage, root, "junk.tar", data)
    (record,) = read_records(storage, shard)
    assert record.key == "junk#unreadable" and reason in record.error


def test_oversized_member_becomes_an_error_record_without_being_read(store):
    storage, root = store
    samples = [("big", {"jpg": b"x" * 5000, "cls": b"1"}), ("small", {"jpg": b"y" * 10})]
    shard = one_shard(storage, root, "s.tar", imagegen.tar_bytes(samples))
    big, small = read_records(storage, shard, max_bytes=1000)
    assert big == Record("big", None, 1, "file too large: 5000 bytes exceeds limit 1000")
    assert small == Record("small", b"y" * 10)


def test_a_vanished_shard_raises_instead_of_yielding_garbage(store):
    storage, root = store
    shard = one_shard(storage, root, "gone.tar", imagegen.tar_bytes(imagegen.image_samples(1)))
    storage.delete(shard.uri)
    with pytest.raises(ObjectNotFound, match="gone.tar"):
        list(read_records(storage, shard))


def test_parquet_shards_img2dataset_and_hf_styles(store):
    storage, root = store
    images = [imagegen.jpeg_bytes(16, 16, seed=i) for i in range(5)]
    rows = [(f"k{i}", images[i]) for i in range(5)] + [("k5", None)]
    storage.put_atomic(
        storage.join(root, "a.parquet"),
        imagegen.parquet_bytes(rows, labels=list(range(6)), row_group_size=2),
    )
    storage.put_atomic(
        storage.join(root, "b.parquet"),
        imagegen.parquet_bytes(rows, "image", "url", struct_column=True),
    )
    storage.put_atomic(
        storage.join(root, "c.parquet"), imagegen.parquet_bytes(rows, "pixels", "name")
    )
    a, b, c = list_shards(storage, root)
    assert [s.format for s in (a, b, c)] == ["parquet"] * 3
    for shard in (a, b):
        records = list(read_records(storage, shard))
        assert [r.key for r in records] == [f"k{i}" for i in range(6)]
        assert [r.data for r in records[:5]] == images
        assert records[5] == Record("k5", None, 5 if shard is a else None, "no image bytes (null)")
    # A custom column name; without a key column the row number is the key.
    records = list(read_records(storage, c, image_column="pixels"))
    assert [r.key for r in records] == [str(i) for i in range(6)]
    with pytest.raises(ShardError, match=r"no image column one of jpg.*columns: name, pixels"):
        list(read_records(storage, c))


def test_parquet_reads_only_the_columns_it_needs(s3_server, s3_bucket):
    class Counting(S3Storage):
        fetched = 0

        def get(self, uri, start=None, end=None):
            data = super().get(uri, start, end)
            Counting.fetched += len(data)
            return data

    storage = Counting()
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": ["a", "b"],
            "jpg": [b"1" * 100, b"2" * 100],
            "caption": [os.urandom(1_000_000), os.urandom(1_000_000)],  # incompressible
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    uri = f"s3://{s3_bucket}/in/wide.parquet"
    storage.put_atomic(uri, sink.getvalue().to_pybytes())
    (shard,) = list_shards(storage, f"s3://{s3_bucket}/in")
    assert [r.data for r in read_records(storage, shard)] == [b"1" * 100, b"2" * 100]
    assert Counting.fetched < 100_000  # the 2 MB caption column never travelled


def test_unreadable_parquet_is_one_error_record(store):
    storage, root = store
    shard = one_shard(storage, root, "x.parquet", b"PAR1 but not really" * 10)
    (record,) = read_records(storage, shard)
    assert record.key == "x#unreadable" and record.error.startswith("not a readable parquet")


def test_loose_images_become_virtual_shards(store):
    storage, root = store
    for folder, count in (("", 3), ("cats", 5), ("cats/kittens", 1)):
        for i in range(count):
            key = f"{folder}/{i:03d}.jpg" if folder else f"{i:03d}.jpg"
            storage.put_atomic(storage.join(root, key), imagegen.jpeg_bytes(16, 16, seed=i))
    storage.put_atomic(storage.join(root, "cats/.DS_Store"), b"junk")
    storage.put_atomic(storage.join(root, "cats/notes.txt"), b"not an image")
    shards = list(list_shards(storage, root, images_per_shard=2))
    summary = [(s.name, s.format, s.members) for s in shards]
    assert summary == [
        ("images-000000", "images", ("000.jpg", "001.jpg")),
        ("cats__images-000000", "images", ("cats/000.jpg", "cats/001.jpg")),
        ("cats__images-000001", "images", ("cats/002.jpg", "cats/003.jpg")),
        # Partial groups once the listing ends, by folder.
        ("images-000001", "images", ("002.jpg",)),
        ("cats__images-000002", "images", ("cats/004.jpg",)),
        ("cats__kittens__images-000000", "images", ("cats/kittens/000.jpg",)),
    ]
    records = list(read_records(storage, shards[1]))
    assert [r.key for r in records] == ["cats/000.jpg", "cats/001.jpg"]
    assert records[1].data == imagegen.jpeg_bytes(16, 16, seed=1)
    # Resume: the same listing gives the same names and ETags; a new image only changes the
    # ETag of its folder's last group.
    again = list(list_shards(storage, root, images_per_shard=2))
    assert [(s.name, s.etag) for s in again] == [(s.name, s.etag) for s in shards]
    storage.put_atomic(storage.join(root, "cats/005.jpg"), imagegen.jpeg_bytes(16, 16))
    after = {s.name: s.etag for s in list_shards(storage, root, images_per_shard=2)}
    before = {s.name: s.etag for s in shards}
    changed = sorted(name for name in before if after[name] != before[name])
    assert changed == ["cats__images-000002"]


def test_loose_image_errors_are_records(store):
    storage, root = store
    storage.put_atomic(storage.join(root, "a.jpg"), b"x" * 3000)
    storage.put_atomic(storage.join(root, "b.jpg"), b"small")
    (shard,) = list_shards(storage, root)
    storage.delete(storage.join(root, "b.jpg"))
    big, gone = read_records(storage, shard, max_bytes=1000)
    assert big == Record("a.jpg", None, error="file too large: 3000 bytes exceeds limit 1000")
    assert gone == Record("b.jpg", None, error="object disappeared after the listing")


def test_names_are_unique_safe_and_flattened(store):
    storage, root = store
    tar = imagegen.tar_bytes(imagegen.image_samples(1))
    paths = [
        "train/000000.tar",
        "train__000000.tar",  # clashes with the flattened name above
        "weird name (1)#.tar",
        "deep/er/still/x.parquet",
        ".hidden/skip.tar",
        "_SUCCESS.json",
    ]
    for path in paths:
        storage.put_atomic(storage.join(root, path), tar)
    shards = list(list_shards(storage, root))
    names = [s.name for s in shards]
    assert len(names) == len(set(names)) == 4
    assert all(SAFE_NAME.match(n) and not n.startswith(".") for n in names)
    assert "deep__er__still__x" in names and "weird_name_1_" in names
    assert {"train__000000"} < set(names)
    assert all(pickle.loads(pickle.dumps(s)) == s for s in shards)


def test_a_single_shard_object_as_input(store):
    storage, root = store
    uri = storage.join(root, "only.tar")
    storage.put_atomic(uri, imagegen.tar_bytes(imagegen.image_samples(2)))
    (shard,) = list_shards(storage, uri)
    assert (shard.uri, shard.name, shard.format) == (uri, "only", "tar")
    assert [r.key for r in read_records(storage, shard)] == ["img-000000", "img-000001"]
    assert list(list_shards(storage, storage.join(root, "missing"))) == []
    photo = storage.join(root, "photo.jpg")
    storage.put_atomic(photo, b"jpeg bytes")
    (single,) = list_shards(storage, photo)
    assert (single.name, single.format) == ("photo.jpg", "images")
    assert list(read_records(storage, single)) == [Record("photo.jpg", b"jpeg bytes")]


def test_list_shards_streams_while_listing(s3_server, s3_bucket):
    storage = S3Storage(page_size=10)
    root = f"s3://{s3_bucket}/many"
    tar = imagegen.tar_bytes(imagegen.image_samples(1))
    for i in range(35):
        storage.put_atomic(f"{root}/shard-{i:06d}.tar", tar)
    calls = []
    storage.client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kw: calls.append(1)
    )
    shards = list_shards(storage, root)
    first = next(shards)
    assert first.name == "shard-000000" and len(calls) == 1  # the listing has 3 more pages
    assert len(list(shards)) == 34 and len(calls) == 4


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_a_local_disk_read_error_fails_the_shard_instead_of_becoming_a_row():
    from pipeline.storage import StorageError, open_storage

    # Reading /proc/self/mem at offset 0 fails with a real EIO, as a failing disk does.
    storage = open_storage("/proc/self")
    shard = Shard("/proc/self/mem", "mem", "etag", 1 << 20, "tar")
    with pytest.raises(StorageError, match=r"/proc/self/mem: cannot read: Input/output error"):
        list(read_records(storage, shard))
