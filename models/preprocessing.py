"""How a checkpoint expects its images: stored beside the weights, never guessed at serve time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos"]


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to input_size / crop_fraction, center crop, scale, normalize.

    The published Mixer checkpoints: 224 px, crop fraction 0.875 (short side 256), bilinear,
    RGB scaled to [-1, 1] (mean = std = 0.5).
    """

    input_size: int = 224
    crop_fraction: float = 0.875
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], not {self.crop_fraction}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest", "lanczos"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    def replace_size(self, input_size: int) -> Preprocessing:
        """The same recipe at another input size (a checkpoint's own geometry)."""
        return dataclasses.replace(self, input_size=input_size)

    @property
    def resize_size(self) -> int:
        """Short side before the center crop."""
        return int(round(self.input_size / self.crop_fraction))

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Preprocessing:
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
