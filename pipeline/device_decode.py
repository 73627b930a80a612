"""`--decode device`: JPEGs decoded in batches on the predictor's device, preprocessed there.

A GPU labels images faster than the CPU cores beside it can decode them with Pillow, so on
CUDA the JPEGs go to `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG, the H100/H200's
hardware JPEG engines) and the checkpoint's preprocessing (short-side resize with antialias
and its interpolation, center crop, normalize) runs as tensor ops on the same device. The
decoded pixels never go back to the host. On a CPU the same code runs with device "cpu"
(torchvision's libjpeg-turbo decode), which is how tests and CI exercise it.

Three stages, each overlapping the next (see `pipeline.workers.ShardLabeler`):
1. download threads: `prepare` checks the byte and pixel limits from the header (the same
   `open_image` as the Pillow path, so the same files fail with the same one-line errors),
   reads the EXIF orientation, and decides per image whether the batched call can take it;
   whatever it cannot (PNG, WebP, GIF..., CMYK/YCCK, arithmetic-coded or lossless JPEGs, odd
   chroma subsampling, a file not ending in EOI) goes through today's Pillow path right there.
   Encoded bytes of CUDA-bound images are put in pinned host memory.
2. one decode thread (`DeviceBatcher.build`), on its own CUDA stream: the batched decode of
   batch k+1 and its preprocessing while the model runs batch k. An image the batched call
   raises on is decoded alone, and if that raises too, by Pillow (which then gives the error
   row today's path gives).
3. the model, on its own stream, after waiting for the batch's event.

The batch matches the Pillow path's for the same image up to decoder and resampler rounding:
both resize the full-resolution geometry (Pillow may first decode a JPEG at a DCT scale no
smaller than twice the target, which the device path does not) and both round to 8 bits
before normalizing. On the CPU the resize runs on uint8 (Pillow's own fixed-point kernels in
torch); CUDA's antialiased kernels take float32. Nearest (no preset uses it) can pick the
neighbouring source pixel at a few positions. tests/pipeline/test_device_decode.py holds the
agreement and its thresholds.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from models.preprocessing import Preprocessing
from pipeline.preprocess import (
    ImageError,
    ImageLimits,
    decode_record,
    open_image,
    resize_size,
)
from pipeline.shards import Record
from pipeline.storage import one_line

DECODE_MODES = ("auto", "cpu", "device")
GPU_EXTRA = "pip install 'mixer-label[gpu]'"
# Interpolations torch resizes the way Pillow does (antialiased bilinear and bicubic use
# Pillow's kernels; nearest-exact is Pillow's nearest). Lanczos has no torch kernel.
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}
# Frame types the batched call decodes: baseline, extended and progressive Huffman DCT.
_BATCHED_SOF = (0xC0, 0xC1, 0xC2)
# Luma sampling factors of the usual chroma subsamplings (4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1);
# nvJPEG refuses others ("Unknown chroma subsampling").
_LUMA_SAMPLING = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1))
# torchvision 0.29 warns on every decode_jpeg call that TorchCodec will supersede it; the call
# is the documented batched nvJPEG API. A process-wide filter: catch_warnings is not
# thread-safe, and decoding runs in threads.
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)


def torchvision_problem() -> str | None:
    """Why torchvision's image decoding cannot be used here, in one line, or None if it can."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as err:  # ImportError, or a torchvision built for another torch
        reason = one_line(err, 160)
        return f"decode=device needs torchvision ({reason}); install the gpu extra: {GPU_EXTRA}"
    return None


def resolve_decode(mode: str, device: str, preprocessing: Preprocessing) -> str:
    """ "cpu" or "device" for a predictor on `device`; ValueError when `device` cannot work.

    auto: device decode where the predictor is on CUDA, torchvision imports and torch can
    resize with the checkpoint's interpolation; else the Pillow path.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
    if mode == "cpu":
        return "cpu"
    problem = torchvision_problem()
    if preprocessing.interpolation not in _TORCH_MODES:
        problem = problem or (
            f"decode=device cannot resize with {preprocessing.interpolation} interpolation"
            " (no torch kernel); use decode=cpu"
        )
    if problem is None and device.startswith("cuda"):
        problem = cuda_decode_problem(device)
    if mode == "device":
        if problem:
            raise ValueError(problem)
        return "device"
    return "device" if device.startswith("cuda") and problem is None else "cpu"


def cuda_decode_problem(device: str) -> str | None:
    """Why decode_jpeg cannot run on this CUDA device (e.g. a torchvision built without
    nvJPEG), from one tiny JPEG decoded there, or None. Without this probe every batch would
    fail and fall back to Pillow image by image: correct, but silently slow."""
    import io

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        decode_jpeg([data], mode=ImageReadMode.RGB, device=torch.device(device))
    except Exception as err:
        reason = one_line(err, 160)
        return f"decode=device: torchvision cannot decode JPEGs on {device} ({reason})"
    return None


# --------------------------------------------------------------------------- stage 1: threads


@dataclass
class Prepared:
    """One record after the header check: bytes for the batched call, a Pillow array, or why not.

    jpeg: the encoded bytes as a uint8 tensor (pinned for CUDA) when the batched call takes it.
    array: the Pillow path's (3, S, S) float32 result (pinned tensor for CUDA) otherwise.
    """

    record: Record
    jpeg: object | None = None  # torch.Tensor
    orientation: int = 1
    array: object | None = None  # np.ndarray or torch.Tensor
    error: str | None = None

    @property
    def has_image(self) -> bool:
        return self.error is None


def prepare(
    record: Record, preprocessing: Preprocessing, limits: ImageLimits, pin: bool = False
) -> Prepared:
    """Stage 1 for one record (runs in the download threads)."""
    import torch

    if record.data is None or record.error is not None:
        return Prepared(record, error=record.error or "no image data")
    try:
        image = open_image(record.data, limits)
    except ImageError as err:
        return Prepared(record, error=str(err))
    if batchable(image, record.data):
        # One copy of the bytes, straight into page-locked memory for a CUDA-bound image.
        jpeg = torch.empty(len(record.data), dtype=torch.uint8, pin_memory=pin)
        jpeg.numpy()[:] = np.frombuffer(record.data, dtype=np.uint8)
        return Prepared(record, jpeg=jpeg, orientation=_exif(image))
    return _pillow(record, preprocessing, limits, pin)


def _pillow(record: Record, preprocessing: Preprocessing, limits: ImageLimits, pin: bool):
    _, array, error = decode_record(record, preprocessing, limits)
    if array is not None and pin:
        import torch

        array = torch.from_numpy(array).pin_memory()
    return Prepared(record, array=array, error=error)


def batchable(image, data: bytes) -> bool:
    """Whether the batched decode takes this (header-opened) image; else Pillow decodes it."""
    if image.format not in ("JPEG", "MPO") or image.mode not in ("RGB", "L"):
        return False  # PNG, WebP, GIF...; CMYK and YCCK JPEGs (Adobe's inverted ones too)
    if image.mode == "RGB":
        if image.info.get("adobe_transform") == 0:
            return False  # stored as RGB, not YCbCr: not every decoder honours the marker
        layers = getattr(image, "layer", [])
        if len(layers) != 3 or any((h, v) != (1, 1) for _, h, v, _ in layers[1:]):
            return False
        if (layers[0][1], layers[0][2]) not in _LUMA_SAMPLING:
            return False
    if _sof_marker(data) not in _BATCHED_SOF:
        return False  # arithmetic-coded, lossless, hierarchical
    # A cut-off file: Pillow says "truncated", some decoders return gray padding instead.
    return data.endswith(b"\xff\xd9")


def _sof_marker(data: bytes) -> int | None:
    """The start-of-frame marker (0xC0..0xCF) of a JPEG, walking the segments before it."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _exif(image) -> int:
    """EXIF orientation 1..8 from the header, 1 when absent or unreadable (as the Pillow path)."""
    with contextlib.suppress(Exception):
        value = int(image.getexif().get(0x0112, 1))
        if 1 <= value <= 8:
            return value
    return 1


# --------------------------------------------------------------------------- stage 2: device


@dataclass
class DeviceBatch:
    """One window of records in input order, and the batch of its images on the device.

    items also keeps the encoded (pinned) bytes alive until the caller is done with the batch:
    nvJPEG reads them asynchronously, outside torch's pinned-memory bookkeeping.
    """

    items: list[Prepared]
    errors: list[str | None]
    batch: object  # torch.Tensor (n_images, 3, S, S) float32 on the device
    event: object | None = None  # torch.cuda.Event: the batch is ready once it has fired
    fallbacks: dict[str, int] = field(default_factory=dict)


class DeviceBatcher:
    """Decodes and preprocesses windows of prepared records on one device (stage 2)."""

    def __init__(
        self,
        preprocessing: Preprocessing,
        device: str,
        limits: ImageLimits = ImageLimits(),
        resize_dtype=None,
    ) -> None:
        """resize_dtype: torch.uint8 or torch.float32 for the resize (default: by device)."""
        import torch

        if preprocessing.interpolation not in _TORCH_MODES:
            raise ValueError(f"decode=device cannot resize with {preprocessing.interpolation}")
        self.preprocessing = preprocessing
        self.limits = limits
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # The decode stage's own stream, so its kernels run beside the model's.
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        std = torch.tensor(preprocessing.std, dtype=torch.float32)
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(3, 1, 1).to(self.device)
        self._offset = (-mean / std).view(3, 1, 1).to(self.device)
        self._mode = _TORCH_MODES[preprocessing.interpolation]
        if self.cuda:  # the copies above ran on the current stream; the decode stream reads them
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        # torch resizes uint8 images on the CPU with Pillow's fixed-point kernels (about 5x
        # faster than in float32 there, BENCHMARKS.md); CUDA's antialiased kernels take floats.
        self.resize_dtype = resize_dtype or (torch.uint8 if not self.cuda else torch.float32)

    def windows(self, prepared: Iterable[Prepared], batch_size: int) -> Iterator[list[Prepared]]:
        """Records in order, cut after every `batch_size` images (error rows ride along)."""
        window: list[Prepared] = []
        images = 0
        for item in prepared:
            window.append(item)
            images += item.has_image
            if images == batch_size:
                yield window
                window, images = [], 0
        if window:
            yield window

    def build(self, window: list[Prepared]) -> DeviceBatch:
        """Decode, orient, resize, crop and normalize one window's images on the device."""
        import torch

        if self.cuda:
            # decode_jpeg's outputs are allocated on this stream but written on torchvision's
            # own: a block freed by the last batch's resize must not be handed to this batch's
            # decoder while that resize is still queued. Waiting here costs no overlap with the
            # model, which runs on another stream.
            self.stream.synchronize()
        context = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with context, torch.no_grad():
            fallbacks: dict[str, int] = {}
            decoded = self._decode(window, fallbacks)
            errors = [item.error for item in window]
            size = self.preprocessing.input_size
            rows = [i for i, item in enumerate(window) if item.error is None]
            batch = torch.empty((len(rows), 3, size, size), dtype=torch.float32, device=self.device)
            on_device, arrays = [], []
            for row, i in enumerate(rows):
                if i in decoded:
                    self._resize_crop_into(decoded[i], window[i].orientation, batch[row])
                    on_device.append(row)
                else:
                    arrays.append((row, window[i].array))
            if on_device:
                # Pillow rounds its resampled pixels to 8 bits; so do we, then normalize.
                target = batch if len(on_device) == len(rows) else batch[on_device]
                target.clamp_(0, 255).round_().mul_(self._scale).add_(self._offset)
                if target is not batch:
                    batch[on_device] = target
            for row, array in arrays:
                source = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
                batch[row].copy_(source, non_blocking=True)  # from pinned memory on CUDA
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
        return DeviceBatch(window, errors, batch, event, fallbacks)

    def _decode(self, window: list[Prepared], fallbacks: dict[str, int]) -> dict[int, object]:
        """{index in window: uint8 (3, H, W) on the device} for the batched images; the ones
        that fail are decoded alone, then by Pillow (their Prepared gets the array or error)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        indices = [i for i, item in enumerate(window) if item.jpeg is not None]
        if not indices:
            return {}
        decode = functools.partial(decode_jpeg, mode=ImageReadMode.RGB, device=self.device)
        try:
            images = decode([window[i].jpeg for i in indices])
            return dict(zip(indices, images, strict=True))
        except Exception:
            pass  # some image of the batch: find which, one at a time
        out: dict[int, object] = {}
        for i in indices:
            try:
                out[i] = decode(window[i].jpeg)
            except Exception:
                item = window[i]
                fallback = _pillow(item.record, self.preprocessing, self.limits, False)
                item.jpeg, item.array, item.error = None, fallback.array, fallback.error
                fallbacks["pillow_after_device_error"] = (
                    fallbacks.get("pillow_after_device_error", 0) + 1
                )
        return out

    def _resize_crop_into(self, image, orientation: int, out) -> None:
        import torch.nn.functional as F

        image = orient(image, orientation)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        crop = self.preprocessing.input_size
        new_w, new_h = resize_size(width, height, self.preprocessing.resize_size)
        left = int(round((new_w - crop) / 2.0))
        top = int(round((new_h - crop) / 2.0))
        pixels = image.unsqueeze(0).to(self.resize_dtype)
        if (new_h, new_w) != (height, width):
            antialias = self._mode != "nearest-exact"
            kwargs = {"antialias": antialias, "align_corners": False} if antialias else {}
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode=self._mode, **kwargs)
        out.copy_(pixels[0, :, top : top + crop, left : left + crop])


def orient(image, orientation: int):
    """Apply EXIF orientation 1..8 to a (C, H, W) tensor, as PIL.ImageOps.exif_transpose."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image
