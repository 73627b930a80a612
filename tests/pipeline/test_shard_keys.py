"""Every image member of a shard yields exactly one record, with a key unique in the shard,
whatever its name (docs/contracts.md, "Row keys")."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from pipeline.shards import list_shards, read_records
from pipeline.storage import open_storage
from tests.pipeline import imagegen


def _tar(members: list[tuple[str, bytes]], **options) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", **options) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _records(store, name: str, data: bytes):
    storage, root = store
    storage.put_atomic(storage.join(root, name), data)
    (shard,) = list(list_shards(storage, root))
    return list(read_records(storage, shard))


def test_repeated_keys_and_several_images_per_sample_all_get_rows(store):
    jpg, png = imagegen.jpeg_bytes(32, 24, seed=1), imagegen.png_bytes(32, 24, seed=2)
    members = [
        ("a.jpg", jpg),
        ("a.cls", b"3"),
        ("d.jpg", jpg),  # one sample, two images
        ("d.png", png),
        ("d.cls", b"7"),
        ("b.jpg", jpg),
        ("a.jpg", png),  # the key "a" again, not adjacent
        ("a.jpg", jpg),  # and the same member name once more, adjacent
        ("c.jpg", jpg),
        ("c.jpg", png),  # a repeated member, adjacent: one sample with two images
    ]
    records = _records(store, "rep.tar", _tar(members))
    keys = [r.key for r in records]
    print(keys)
    assert len(records) == 8  # every image member, .cls files are labels
    assert len(set(keys)) == len(keys)
    assert keys == ["a", "d", "d.png", "b", "a.jpg", "a.jpg#2", "c", "c.jpg"]
    by_key = {r.key: r for r in records}
    assert by_key["d"].label == 7 and by_key["d.png"].label == 7 and by_key["a"].label == 3
    assert by_key["d.png"].data == png and by_key["a.jpg"].data == png
    assert all(r.error is None for r in records)


def test_non_utf8_member_names_become_escaped_keys_and_are_labeled(store, caplog):
    jpg = imagegen.jpeg_bytes(32, 24, seed=3)
    members = [("good.jpg", jpg), ("bad\udcff\udcfe.jpg", jpg), ("tab\there.jpg", jpg)]
    data = _tar(members, format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    assert b"bad\xff\xfe.jpg" in data  # really not UTF-8 in the tar
    with caplog.at_level("WARNING"):
        records = _records(store, "odd.tar", data)
    keys = [r.key for r in records]
    assert keys == ["good", "bad\\xff\\xfe", "tab\\x09here"]
    assert all(r.error is None and r.data == jpg for r in records)
    assert all(k.isprintable() and k.encode("utf-8") for k in keys)
    assert "bad\\xff\\xfe" in caplog.text  # the message names the key


def test_non_utf8_local_file_names_are_labeled(tmp_path):
    if os.uname().sysname == "Darwin":
        pytest.skip("macOS file systems refuse names that are not UTF-8")
    root = tmp_path / "imgs"
    root.mkdir()
    jpg = imagegen.jpeg_bytes(32, 24, seed=4)
    (root / "fine.jpg").write_bytes(jpg)
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as f:  # Latin-1 name
        f.write(jpg)
    storage = open_storage(str(root))
    (shard,) = list(list_shards(storage, str(root)))
    records = list(read_records(storage, shard))
    assert sorted(r.key for r in records) == ["caf\\xe9.jpg", "fine.jpg"]
    assert all(r.error is None and r.data == jpg for r in records)


def test_parquet_null_and_repeated_keys_never_collide_with_real_ones(store):
    jpg = imagegen.jpeg_bytes(32, 24, seed=5)
    storage, root = store
    name = "p"
    rows = [
        ("0", jpg),
        (None, jpg),  # would have been "1" before, a real key below
        ("1", jpg),
        ("x", jpg),
        ("x", jpg),  # repeated
        (None, jpg),
        (f"{name}#row-1", jpg),  # a real key shaped like a made-up one
    ]
    data = imagegen.parquet_bytes(rows, row_group_size=3)
    records = _records(store, f"{name}.parquet", data)
    keys = [r.key for r in records]
    print(keys)
    assert len(keys) == 7 and len(set(keys)) == 7
    assert keys[0] == "0" and keys[2] == "1" and keys[3] == "x" and keys[6] == "p#row-1"
    assert keys[1] == "p#row-1#2" and keys[4] == "x#2" and keys[5] == "p#row-5"
