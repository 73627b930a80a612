"""The demo data set: scikit-learn's handwritten digits as labeled WebDataset tar shards.

1,797 real 8×8 scans (bundled with scikit-learn, no download) are upscaled, turned into RGB
"scans" (dark ink on light paper), encoded as a mix of JPEG and PNG, split train/test
(stratified, seeded) and written as `train/train-NNNNNN.tar` and `test/test-NNNNNN.tar`
(members `KEY.jpg|png` + `KEY.cls`). The test shards also hold a handful of deliberately
broken files without labels, listed in `dataset.json`, so a run can check that its error rows
are exactly those. The same spec always gives byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np

MANIFEST_NAME = "dataset.json"
LABEL_NAMES = [str(d) for d in range(10)]
# Bump when the bytes this module writes change, so a cached model is not reused on new data.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class DigitsSpec:
    """What to build; the same spec always yields the same bytes."""

    image_size: int = 32
    test_fraction: float = 0.2
    seed: int = 0
    images_per_shard: int = 128
    limit: int | None = None  # a stratified subset of this many scans (tests); None = all 1,797
    png_every: int = 3  # every third scan is a PNG, the rest JPEG
    jpeg_quality: int = 90
    broken: bool = True  # add the broken files to the test shards

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), not {self.test_fraction}")
        if self.image_size < 8:
            raise ValueError(
                f"image_size must be at least 8 (the scans are 8×8), not {self.image_size}"
            )
        if self.images_per_shard < 1:
            raise ValueError(f"images_per_shard must be positive, not {self.images_per_shard}")
        if self.limit is not None and not 50 <= self.limit <= 1797:
            raise ValueError(f"limit must be between 50 and 1797 scans, not {self.limit}")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class DemoData:
    """The encoded data set in memory: shard name → tar bytes per split, and its manifest."""

    shards: dict[str, dict[str, bytes]]  # split → {"test-000000.tar": bytes}
    manifest: dict[str, object] = field(default_factory=dict)


def load_scans(limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The digits: (n, 8, 8) uint8 ink in 0..16, (n,) labels, (n,) indices in the full set.

    With `limit`, a stratified, seeded subset of that many scans.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    keep = np.arange(len(labels))
    if limit is not None and limit < len(labels):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(keep, train_size=limit, stratify=labels, random_state=seed)
        keep = np.sort(keep)
    return ink[keep], labels[keep], keep


def render(ink: np.ndarray, size: int) -> np.ndarray:
    """One 8×8 scan as a (size, size, 3) uint8 RGB image: dark ink on light paper, bicubic."""
    from PIL import Image

    paper = (255 - np.round(ink.astype(np.float32) * (255 / 16))).astype(np.uint8)
    big = Image.fromarray(paper, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(big.convert("RGB"))


def encode(image: np.ndarray, fmt: str, jpeg_quality: int = 90) -> bytes:
    """RGB uint8 → JPEG or PNG bytes (no metadata, so the bytes depend on the pixels only)."""
    from PIL import Image

    out = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(out, format="JPEG", quality=jpeg_quality)
    elif fmt == "png":
        Image.fromarray(image).save(out, format="PNG", optimize=False)
    else:
        raise ValueError(f"unknown image format {fmt!r} (jpg or png)")
    return out.getvalue()


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified, seeded train/test split of positions into `labels`, each sorted."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(test)


def broken_files(valid_jpeg: bytes) -> dict[str, tuple[str, bytes, str]]:
    """key → (extension, bytes, what is wrong): inputs every image pipeline meets one day."""
    png_signature = b"\x89PNG\r\n\x1a\n"
    # A well-formed PNG that claims 40,000 × 40,000 pixels with a few bytes of data: the
    # classic decompression bomb, which must be refused from the header alone.
    ihdr = b"IHDR" + (40_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    idat = b"IDAT" + zlib.compress(bytes(64))
    bomb = png_signature + b"".join(_png_chunk(chunk) for chunk in (ihdr, idat, b"IEND"))
    return {
        "broken-truncated-jpeg": ("jpg", valid_jpeg[: len(valid_jpeg) // 2], "JPEG cut in half"),
        "broken-zero-bytes": ("jpg", b"", "zero bytes named .jpg"),
        "broken-text-file": ("jpg", b"this is a text file, not a JPEG\n", "text named .jpg"),
        "broken-png-header-only": ("png", png_signature, "PNG signature and nothing else"),
        "broken-decompression-bomb": ("png", bomb, "PNG header claiming 40000x40000 pixels"),
    }


def tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (fixed mtime, owner, mode) holding `members` in the given order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000  # fixed, so rebuilding gives the same bytes and ETags
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_demo_data(spec: DigitsSpec = DigitsSpec()) -> DemoData:
    """Render, encode, split and shard the digits in memory; nothing touches storage."""
    ink, labels, scan_ids = load_scans(spec.limit, spec.seed)
    train, test = split_indices(labels, spec.test_fraction, spec.seed)
    members: dict[str, list[tuple[str, list[tuple[str, bytes]]]]] = {"train": [], "test": []}
    first_jpeg = b""
    for split, positions in (("train", train), ("test", test)):
        for position in positions:
            # The key and the format follow the scan's index in the full set, so a subset
            # (limit) holds the very same files as the full build.
            scan = int(scan_ids[position])
            fmt = "png" if scan % spec.png_every == 0 else "jpg"
            data = encode(render(ink[position], spec.image_size), fmt, spec.jpeg_quality)
            if fmt == "jpg" and not first_jpeg:
                first_jpeg = data
            key = f"digit-{scan:04d}"
            label = str(int(labels[position])).encode()
            members[split].append((key, [(f"{key}.{fmt}", data), (f"{key}.cls", label)]))

    broken = broken_files(first_jpeg) if spec.broken else {}
    shards = {
        "train": _pack("train", members["train"], spec.images_per_shard, {}),
        "test": _pack("test", members["test"], spec.images_per_shard, broken),
    }
    manifest = _manifest(spec, labels, train, test, shards, broken)
    return DemoData(shards=shards, manifest=manifest)


def write_demo_data(uri: str, spec: DigitsSpec = DigitsSpec(), options=None) -> dict[str, object]:
    """Build the data set and write it under `uri` (local folder or s3://); return the manifest.

    Layout: `uri/train/*.tar`, `uri/test/*.tar`, and `uri/dataset.json` written last, so its
    presence means the shards are complete.
    """
    from pipeline.storage import open_storage

    data = build_demo_data(spec)
    storage = open_storage(uri, options)
    for split, shards in data.shards.items():
        for name, payload in shards.items():
            storage.put_atomic(storage.join(uri, split, name), payload)
    manifest_bytes = json.dumps(data.manifest, indent=2, sort_keys=True).encode()
    storage.put_atomic(storage.join(uri, MANIFEST_NAME), manifest_bytes)
    return data.manifest


def read_manifest(uri: str, options=None) -> dict[str, object] | None:
    """The `dataset.json` under `uri`, or None when there is none (not built yet)."""
    from pipeline.storage import open_storage

    storage = open_storage(uri, options)
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        return None
    return json.loads(storage.get(manifest_uri))


# --- helpers --------------------------------------------------------------------------------


def _pack(
    split: str,
    samples: list[tuple[str, list[tuple[str, bytes]]]],
    per_shard: int,
    broken: dict[str, tuple[str, bytes, str]],
) -> dict[str, bytes]:
    groups = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)] or [[]]
    # Spread the broken files over the shards, so every shard shows error rows beside predictions.
    for n, (key, (ext, data, _)) in enumerate(broken.items()):
        group = groups[n % len(groups)]
        group.insert(len(group) // 2, (key, [(f"{key}.{ext}", data)]))
    return {
        f"{split}-{n:06d}.tar": tar_shard([m for _, files in group for m in files])
        for n, group in enumerate(groups)
    }


def _manifest(
    spec: DigitsSpec,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    shards: dict[str, dict[str, bytes]],
    broken: dict[str, tuple[str, bytes, str]],
) -> dict[str, object]:
    digest = hashlib.sha256()
    for split in sorted(shards):
        for name in sorted(shards[split]):
            digest.update(f"{split}/{name}\n".encode())
            digest.update(hashlib.sha256(shards[split][name]).digest())

    def counts(positions: np.ndarray) -> dict[str, int]:
        values = np.bincount(labels[positions], minlength=10)
        return {LABEL_NAMES[i]: int(v) for i, v in enumerate(values)}

    return {
        "name": "digits",
        "source": "sklearn.datasets.load_digits (1,797 8x8 scans, UCI optical digits)",
        "generator_version": GENERATOR_VERSION,
        "spec": spec.to_dict(),
        "label_names": LABEL_NAMES,
        "fingerprint": digest.hexdigest(),
        "splits": {
            "train": {
                "images": len(train),
                "shards": sorted(shards["train"]),
                "class_counts": counts(train),
            },
            "test": {
                "images": len(test) + len(broken),
                "labeled_images": len(test),
                "shards": sorted(shards["test"]),
                "class_counts": counts(test),
            },
        },
        "broken": {key: reason for key, (_, _, reason) in broken.items()},
    }


def _png_chunk(type_and_body: bytes) -> bytes:
    """Length, type, body, CRC: one PNG chunk."""
    length = (len(type_and_body) - 4).to_bytes(4, "big")
    return length + type_and_body + zlib.crc32(type_and_body).to_bytes(4, "big")
