"""Real test images and shards, made in memory: good images, broken ones, WebDataset tars.

Reuse it from any test (run, flow, demo):

    from tests.pipeline import imagegen
    data = imagegen.jpeg_bytes(64, 48)                  # a real JPEG
    zoo = imagegen.broken_zoo()                         # {name: ZooImage(data, expect, ...)}
    keys = imagegen.write_tar_shards(storage, "s3://b/in", shards=3, images_per_shard=4)

Images carry a pattern (colored quadrants plus a gradient) so a crop or a rotation shows.
Nothing here touches the network; writing goes through a `pipeline.storage` Storage.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Quadrant colors (top-left, top-right, bottom-left, bottom-right) of `pattern_image`.
QUADRANTS = ((220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40))


def pattern_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image: four colored quadrants, a faint gradient, seeded noise."""
    img = np.zeros((height, width, 3), dtype=np.float32)
    half_h, half_w = height // 2, width // 2
    img[:half_h, :half_w] = QUADRANTS[0]
    img[:half_h, half_w:] = QUADRANTS[1]
    img[half_h:, :half_w] = QUADRANTS[2]
    img[half_h:, half_w:] = QUADRANTS[3]
    ramp = np.linspace(-15, 15, width, dtype=np.float32)[None, :, None]
    noise = np.random.default_rng(seed).normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img + ramp + noise, 0, 255).astype(np.uint8)


def pattern_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """`pattern_array` as a PIL image converted to `mode` (RGB, L, RGBA, CMYK, P, LA, I;16)."""
    rgb = Image.fromarray(pattern_array(width, height, seed))
    if mode == "RGB":
        return rgb
    if mode == "I;16":
        # Full 16-bit range, so a converter that clips at 255 shows up as a white image.
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(gray)  # uint16 → mode I;16
    if mode == "RGBA":
        alpha = np.full((height, width), 255, dtype=np.uint8)
        alpha[:, : width // 4] = 0  # the left quarter is fully transparent
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]))  # → RGBA
    if mode == "LA":
        return pattern_image(width, height, "RGBA", seed).convert("LA")
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


def jpeg_bytes(
    width: int = 64,
    height: int = 48,
    mode: str = "RGB",
    quality: int = 90,
    exif_orientation: int | None = None,
    seed: int = 0,
) -> bytes:
    """A real JPEG of the pattern (modes RGB, L, CMYK), optionally with an EXIF Orientation."""
    image = pattern_image(width, height, mode, seed)
    out = io.BytesIO()
    kwargs: dict[str, object] = {"quality": quality}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # Orientation tag
        kwargs["exif"] = exif.tobytes()
    image.save(out, "JPEG", **kwargs)
    return out.getvalue()


def png_bytes(
    width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0, transparency: bool = False
) -> bytes:
    """A real PNG of the pattern in `mode` (RGB, RGBA, L, LA, P, I;16); P may get a clear index."""
    image = pattern_image(width, height, mode, seed)
    out = io.BytesIO()
    if mode == "P" and transparency:
        image.save(out, "PNG", transparency=0)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """Any PIL image as bytes in `fmt` (PNG, JPEG, WEBP, ...)."""
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def webp_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A real (lossy) WebP of the pattern."""
    out = io.BytesIO()
    pattern_image(width, height, "RGB", seed).save(out, "WEBP", quality=90)
    return out.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height pixels; the body is a few bytes.

    Decoding it would allocate width * height * 3 bytes; a safe reader refuses from the header.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def truncate(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` fraction of `data` (a download or a write cut short)."""
    return data[: max(1, int(len(data) * keep))]


@dataclass(frozen=True)
class ZooImage:
    """One file of the broken-file zoo and what a labeler must do with it.

    expect: "ok" (a prediction row) or "error" (an error row); error_contains: a substring of
    the one-line error (lowercase); ext: the file extension it is stored under.
    """

    data: bytes
    expect: str
    ext: str
    error_contains: str = ""


def broken_zoo() -> dict[str, ZooImage]:
    """The inputs every labeler must survive, by key: broken files and awkward-but-valid ones."""
    return {
        "truncated": ZooImage(truncate(jpeg_bytes(128, 96), 0.4), "error", "jpg", "truncated"),
        "empty": ZooImage(b"", "error", "jpg", "empty file"),
        "text": ZooImage(b"hello, this is not a picture\n" * 4, "error", "jpg", "not an image"),
        "bomb": ZooImage(bomb_png(), "error", "png", "too large"),
        "cmyk": ZooImage(jpeg_bytes(64, 48, mode="CMYK"), "ok", "jpg"),
        "gray16": ZooImage(png_bytes(64, 48, mode="I;16"), "ok", "png"),
        "palette": ZooImage(png_bytes(64, 48, mode="P"), "ok", "png"),
        "palette_transparent": ZooImage(
            png_bytes(64, 48, mode="P", transparency=True), "ok", "png"
        ),
        "rgba": ZooImage(png_bytes(64, 48, mode="RGBA"), "ok", "png"),
        "gray_alpha": ZooImage(png_bytes(64, 48, mode="LA"), "ok", "png"),
        "exif_rotated": ZooImage(jpeg_bytes(64, 32, exif_orientation=6), "ok", "jpg"),
        "webp": ZooImage(webp_bytes(64, 48), "ok", "webp"),
    }


# One WebDataset sample: (key, {extension: bytes}); e.g. ("cat/001", {"jpg": b"...", "cls": b"3"}).
Sample = tuple[str, dict[str, bytes]]


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """A WebDataset tar: members KEY.EXT in sample order, adjacent per sample."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mtime = 1_700_000_000  # fixed, so the same samples give the same bytes
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def image_samples(
    count: int, start: int = 0, label_every: int | None = 1, size: tuple[int, int] = (48, 40)
) -> list[Sample]:
    """`count` samples keyed `img-000000`... with a JPEG each and a `.cls` label (index % 10)."""
    samples = []
    for i in range(start, start + count):
        files = {"jpg": jpeg_bytes(*size, seed=i)}
        if label_every and i % label_every == 0:
            files["cls"] = str(i % 10).encode()
        samples.append((f"img-{i:06d}", files))
    return samples


def zoo_samples() -> list[Sample]:
    """The broken-file zoo as WebDataset samples keyed `zoo-<name>`."""
    return [(f"zoo-{name}", {item.ext: item.data}) for name, item in broken_zoo().items()]


def write_tar_shards(
    storage,
    prefix_uri: str,
    shards: int = 2,
    images_per_shard: int = 4,
    name: str = "shard-{:06d}.tar",
    size: tuple[int, int] = (48, 40),
) -> list[str]:
    """Write `shards` WebDataset tars of good JPEGs under prefix_uri; return all image keys."""
    keys = []
    for s in range(shards):
        samples = image_samples(images_per_shard, start=s * images_per_shard, size=size)
        storage.put_atomic(storage.join(prefix_uri, name.format(s)), tar_bytes(samples))
        keys.extend(key for key, _ in samples)
    return keys


def parquet_bytes(
    rows: Sequence[tuple[str, bytes | None]],
    image_column: str = "jpg",
    key_column: str = "key",
    labels: Sequence[int] | None = None,
    struct_column: bool = False,
    row_group_size: int = 1000,
) -> bytes:
    """An img2dataset-style Parquet: key + image bytes (or an HF-style {bytes, path} struct)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [key for key, _ in rows]
    images = [data for _, data in rows]
    if struct_column:
        image_array = pa.array(
            [None if d is None else {"bytes": d, "path": f"{k}.jpg"} for k, d in rows],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        image_array = pa.array(images, type=pa.binary())
    columns = {key_column: pa.array(keys, type=pa.string()), image_column: image_array}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out, row_group_size=row_group_size)
    return out.getvalue()


def json_bytes(value: object) -> bytes:
    """A `.json` side file."""
    return json.dumps(value).encode()
