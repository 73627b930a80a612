"""Image bytes -> the (3, H, W) float32 array a checkpoint expects, safely.

One function, `load_image`, for labeling and training alike: decode (Pillow; JPEGs at a reduced
DCT scale when the target is much smaller), EXIF orientation, any mode to RGB, resize the short
side, center crop, scale to [0, 1], normalize. Sizes follow torchvision's Resize(int) +
CenterCrop exactly, so published checkpoints see the pixels they were evaluated with.

Hostile input is expected: every failure is an `ImageError` with a one-line reason, and the
pixel count is checked from the header before any pixel is decoded.

Alpha is composited on white, not dropped: fully transparent pixels often hold arbitrary (or
black) color that no viewer ever shows, and white is what most viewers put behind them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.preprocessing import Preprocessing
from pipeline.background import background_map
from pipeline.shards import DEFAULT_MAX_BYTES, Record, too_large
from pipeline.storage import one_line

# Pillow warns (and does not stop) between MAX_IMAGE_PIXELS and twice that; make the warning an
# exception so no half-checked image is ever decoded. Process-wide on purpose: training and
# serving both want it, and per-call `catch_warnings` is not thread-safe.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Formats we decode. A closed list: Pillow also opens EPS (which runs Ghostscript), PSD, ICO...
Image.init()
FORMATS = tuple(
    f
    for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")
    if f in Image.OPEN
)
_JPEG_FORMATS = ("JPEG", "MPO")
# Decode a JPEG at 1/2, 1/4 or 1/8 scale only down to DRAFT_MARGIN x the resize target, so a
# real resampling filter still does the last step (see test_preprocess / the report numbers).
DRAFT_MARGIN = 2
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """An image that cannot be used; the message is one line saying why."""


@dataclass(frozen=True)
class ImageLimits:
    """Refuse images above these sizes before decoding them.

    max_pixels: width x height from the header (default: Pillow's MAX_IMAGE_PIXELS, ~89.5 M).
    Pillow's own bomb check still applies above that global, so raising max_pixels past it also
    needs PIL.Image.MAX_IMAGE_PIXELS raised. max_bytes: size of the encoded file.
    """

    max_pixels: int = 89_478_485
    max_bytes: int = DEFAULT_MAX_BYTES


def load_image(
    data: bytes | None, preprocessing: Preprocessing, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Decode, orient, resize, crop and normalize one image -> (3, H, W) float32."""
    image = decode_rgb(data, limits, min_side=preprocessing.resize_size)
    image = resize_center_crop(image, preprocessing)
    return to_array(image, preprocessing)


def decode_rgb(
    data: bytes | None, limits: ImageLimits = ImageLimits(), min_side: int | None = None
) -> Image.Image:
    """Bytes -> an upright RGB PIL image; ImageError with a one-line reason otherwise.

    min_side: the short side the caller will resize to; JPEGs may then be decoded at a reduced
    scale (never below DRAFT_MARGIN x min_side). None decodes at full size.
    """
    image = open_image(data, limits)
    fmt = image.format or "image"
    try:
        if min_side and fmt in _JPEG_FORMATS:
            # DCT scaling: decode 1/2..1/8 of the pixels; keeps both sides >= the requested ones.
            target = min_side * DRAFT_MARGIN
            image.draft(image.mode, (target, target))
        image.load()
    except Exception as err:
        raise _corrupt(err, fmt) from None
    with contextlib.suppress(Exception):  # unreadable EXIF: keep the pixels as stored
        ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def open_image(data: bytes | None, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image's header only (no pixel decoded yet), with the byte and pixel limits checked.

    Shared by the Pillow path and the device path (pipeline.device_decode), so both refuse
    the same files with the same one-line errors before any decode.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(too_large(len(data), limits.max_bytes))
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        width, height = _header_size(data)
        limit = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
        raise ImageError(f"too large: {width}x{height} pixels exceeds limit {limit}") from None
    except UnidentifiedImageError:
        raise ImageError(_not_an_image(data)) from None
    except Exception as err:  # plugins raise assorted types on hostile headers
        raise _corrupt(err, _magic_format(data) or "image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(f"too large: {width}x{height} pixels exceeds limit {limits.max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(f"corrupt image: {width}x{height} pixels")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha over white, 16-bit scaled (not clipped), CMYK converted."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float32)
        if mode == "F" and values.size and float(values.max()) <= 1.0:
            values *= 255.0  # float images in [0, 1]
        elif mode != "F":
            values /= 257.0  # 0..65535 -> 0..255
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported color mode {mode}") from None


def resize_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision Resize(short): the short side becomes `short`, the long side truncates."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def resize_center_crop(image: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    """Resize the short side to preprocessing.resize_size, then center crop input_size.

    Only the cropped window is resampled (Pillow's `box`), which gives the same pixels as
    resizing all and cropping, but costs the crop's size, however extreme the aspect ratio.
    """
    width, height = image.size
    crop = preprocessing.input_size
    new_w, new_h = resize_size(width, height, preprocessing.resize_size)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), _RESAMPLE[preprocessing.interpolation], box=box)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    std_arr = np.asarray(std, dtype=np.float32)
    return 1.0 / (255.0 * std_arr), -np.asarray(mean, dtype=np.float32) / std_arr


def to_array(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """An RGB image -> (3, H, W) float32, (pixel / 255 - mean) / std."""
    scale, offset = _affine(tuple(preprocessing.mean), tuple(preprocessing.std))
    pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    return np.ascontiguousarray((pixels * scale + offset).transpose(2, 0, 1))


# --------------------------------------------------------------------------- errors


def _corrupt(err: Exception, fmt: str) -> ImageError:
    message = one_line(err, 200)
    if "truncated" in message.lower() or isinstance(err, EOFError):
        return ImageError(f"corrupt image: truncated {fmt}")
    return ImageError(f"corrupt image: {fmt}: {message}")


def _magic_format(data: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _header_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header, without Pillow's bomb check (which hides them)."""
    prefix = data[:16]
    for fmt in FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(prefix):
            continue
        try:
            return factory(io.BytesIO(data)).size
        except Exception:
            continue
    return (0, 0)


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _not_an_image(data: bytes) -> str:
    """Why Pillow could not identify the bytes, with a guess at what they are."""
    fmt = _magic_format(data)
    if fmt is not None:
        return f"corrupt image: damaged or truncated {fmt} header"
    kind = sniff_type(data)
    if kind.startswith("image/"):
        return f"unsupported image format ({kind})"
    return f"not an image ({kind}?)"


def sniff_type(data: bytes) -> str:
    """A best guess at a MIME type for bytes that are not a decodable image."""
    head = data[:512]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"heim", b"heis"):
            return "image/heic"
        if brand in (b"avif", b"avis"):
            return "image/avif"
        return "video/mp4"
    for magic, kind in (
        (b"%PDF", "application/pdf"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x1f\x8b", "application/gzip"),
        (b"\x00\x00\x01\x00", "image/x-icon"),
        (b"8BPS", "image/vnd.adobe.photoshop"),
        (b"%!PS", "application/postscript"),
    ):
        if head.startswith(magic):
            return kind
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "image/svg+xml"
    if text.startswith((b"<!doctype html", b"<html")):
        return "text/html"
    if text.startswith(b"<?xml"):
        return "application/xml"
    if text.startswith((b"{", b"[")):
        return "application/json"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the 512-byte mark is still text.
        decoded = head[: err.start].decode("utf-8") if err.start > len(head) - 4 else ""
    if decoded and all(c.isprintable() or c in "\t\r\n" for c in decoded):
        return "text/plain"
    return "application/octet-stream"


# --------------------------------------------------------------------------- in threads

Decoded = tuple[Record, "np.ndarray | None", "str | None"]


def decode_in_threads(
    records: Iterable[Record],
    preprocessing: Preprocessing,
    threads: int = 4,
    limits: ImageLimits = ImageLimits(),
    ahead: int | None = None,
) -> Iterator[Decoded]:
    """(record, array, None) or (record, None, error) per record, in input order.

    A feeder thread pulls records (the download) and hands them to `threads` decoders (Pillow
    and numpy release the GIL), keeping at most `ahead` results in flight (default 128, about
    77 MB at 224 px; pass about 2 x the batch size), so memory stays bounded and the next batch
    is decoding while the model runs. An exception from the records iterator (a storage
    failure) is raised here, after the records before it.
    """
    decode = functools.partial(decode_record, preprocessing=preprocessing, limits=limits)
    ahead = ahead or max(128, 4 * threads)
    return background_map(decode, records, max(1, threads), ahead, name="decode")


def decode_record(
    record: Record, preprocessing: Preprocessing, limits: ImageLimits = ImageLimits()
) -> Decoded:
    """One record through the Pillow path: (record, array, None) or (record, None, error)."""
    if record.data is None or record.error is not None:
        return record, None, record.error or "no image data"
    try:
        return record, load_image(record.data, preprocessing, limits), None
    except ImageError as err:
        return record, None, str(err)
    except Exception as err:  # a decoder bug must cost one row, not the shard
        return record, None, f"decode failed: {type(err).__name__}: {one_line(err, 200)}"
