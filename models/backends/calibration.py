"""Calibration and check inputs that need no download: synthetic, normalized, deterministic.

Static int8 calibrates its activation scales on them; `auto`'s measurement and the benchmark
compare precisions on them where no real images are at hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CALIBRATION_IMAGES = 32  # enough for stable per-tensor ranges; more only costs setup time


def calibration_files(checkpoint_name: str) -> tuple[str, ...]:
    """Names, beside a checkpoint, of the real images `auto` checks precisions on (first wins).

    `mixer-label train` writes `calibration.npy`; `<stem>.calibration.npy` lets several
    checkpoints share a folder.
    """
    stem = checkpoint_name.rsplit(".", 1)[0]
    return (f"{stem}.calibration.npy", "calibration.npy")


def synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth, image-like normalized inputs in [-1, 1]: upsampled low-resolution noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, max(2, size // 8), max(2, size // 8), generator=generator)
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    detail = 0.1 * torch.randn(count, 3, size, size, generator=generator)
    return (2 * images - 1 + detail).clamp(-1, 1).contiguous()


def blob_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Sharp-edged two-level images in [-1, 1]: random blobs on a background, per channel."""
    generator = torch.Generator().manual_seed(seed)
    cells = max(2, size // 4)
    mask = torch.rand(count, 1, cells, cells, generator=generator) > 0.6
    mask = torch.nn.functional.interpolate(mask.float(), size=(size, size), mode="nearest")
    background = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    foreground = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    return (background + mask * (foreground - background)).contiguous()


def calibration_images(config, count: int = CALIBRATION_IMAGES, seed: int = 1) -> torch.Tensor:
    """Normalized synthetic calibration images: half smooth noise, half sharp blobs.

    Smooth noise alone has no sharp edges, so its activation ranges come out narrow and real
    images with edges get clipped (BENCHMARKS.md has the demo model's worst logits cosine
    for each choice).
    """
    size = config.image_size
    smooth = synthetic_images(count - count // 2, size, seed=seed)
    return torch.cat([smooth, blob_images(count // 2, size, seed=seed)])
