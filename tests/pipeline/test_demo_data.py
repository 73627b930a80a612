"""The digits demo data: deterministic, stratified, real WebDataset shards, known broken files."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import Preprocessing
from pipeline.demo_data import (
    DigitsSpec,
    build_demo_data,
    load_scans,
    read_manifest,
    write_demo_data,
)
from pipeline.shards import list_shards, read_records
from pipeline.storage import open_storage
from pipeline.train import read_split

SMALL = DigitsSpec(limit=200, images_per_shard=32)


@pytest.fixture(scope="module")
def small():
    return build_demo_data(SMALL)


def _members(tar_bytes: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return tar.getmembers()


def test_same_spec_gives_the_same_bytes(small):
    again = build_demo_data(SMALL)
    assert again.shards == small.shards
    assert again.manifest["fingerprint"] == small.manifest["fingerprint"]
    other_seed = build_demo_data(DigitsSpec(limit=200, images_per_shard=32, seed=1))
    assert other_seed.manifest["fingerprint"] != small.manifest["fingerprint"]


def test_split_is_stratified_and_disjoint(small):
    splits = small.manifest["splits"]
    train, test = splits["train"], splits["test"]
    assert train["images"] + test["labeled_images"] == 200
    assert test["labeled_images"] == 40  # test_fraction 0.2
    for digit in map(str, range(10)):
        # Every class in both splits, in proportion (the subset has ~20 per class).
        assert 14 <= train["class_counts"][digit] <= 18
        assert 3 <= test["class_counts"][digit] <= 5
    keys = {
        split: {
            m.name.partition(".")[0] for tar in small.shards[split].values() for m in _members(tar)
        }
        for split in ("train", "test")
    }
    assert not keys["train"] & keys["test"]


def test_members_are_images_with_cls_labels_matching_the_scans(small):
    ink, labels, scan_ids = load_scans()  # the full set: keys name the original scan
    formats = set()
    for tar_bytes in small.shards["train"].values():
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 1_700_000_000 and m.mode == 0o644 for m in members)
            files = {m.name: tar.extractfile(m).read() for m in members}
        for name, data in files.items():
            key, _, ext = name.partition(".")
            if ext == "cls":
                continue
            scan = int(key.removeprefix("digit-"))
            assert int(files[f"{key}.cls"]) == labels[scan]
            image = Image.open(io.BytesIO(data))
            formats.add(image.format)
            assert image.size == (32, 32) and image.mode == "RGB"
            # Dark ink on light paper: the darkest pixels sit where the scan has the most ink.
            gray = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX))
            assert np.corrcoef(gray.ravel(), ink[scan].ravel())[0, 1] < -0.8
    assert formats == {"JPEG", "PNG"}


def test_broken_files_are_exactly_the_decode_errors(tmp_path):
    manifest = write_demo_data(str(tmp_path), SMALL)
    assert read_manifest(str(tmp_path)) == manifest
    split = read_split(str(tmp_path / "test"), Preprocessing(32, 1.0))
    assert {e["key"] for e in split.errors} == set(manifest["broken"])
    assert len(manifest["broken"]) == 5
    reasons = {e["key"]: e["error"] for e in split.errors}
    assert "too large" in reasons["broken-decompression-bomb"]
    assert "empty" in reasons["broken-zero-bytes"]
    # Broken files carry no label; every good test image does.
    assert len(split) == manifest["splits"]["test"]["labeled_images"]
    assert (split.labels >= 0).all()


def test_written_to_s3_and_read_back_as_shards(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/digits"
    manifest = write_demo_data(uri, SMALL)
    storage = open_storage(uri)
    shards = list(list_shards(storage, f"{uri}/test/"))
    assert [s.name for s in shards] == [
        n.removesuffix(".tar") for n in manifest["splits"]["test"]["shards"]
    ]
    records = [r for s in shards for r in read_records(storage, s)]
    assert len(records) == manifest["splits"]["test"]["images"]
    assert {r.key for r in records if r.label is None} == set(manifest["broken"])
    assert read_manifest(uri)["fingerprint"] == manifest["fingerprint"]


def test_bad_spec_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsSpec(test_fraction=1.5)
    with pytest.raises(ValueError, match="limit"):
        DigitsSpec(limit=10)
