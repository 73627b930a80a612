"""The geometry of one Mixer (the paper's Table 1 names), as a frozen, typed value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

GeluKind = Literal["tanh", "erf"]


@dataclass(frozen=True)
class MixerConfig:
    """Geometry of one Mixer; the paper's names in brackets."""

    patch_size: int = 16  # P
    hidden_dim: int = 768  # C
    num_blocks: int = 12  # N
    tokens_mlp_dim: int = 384  # D_S
    channels_mlp_dim: int = 3072  # D_C
    num_classes: int = 1000
    image_size: int = 224
    # The official Flax code uses the tanh approximation, timm the exact erf: a checkpoint
    # must run with the GELU it was trained with.
    gelu: GeluKind = "tanh"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"gelu must be 'tanh' or 'erf', not {self.gelu!r}")

    @property
    def num_tokens(self) -> int:
        """S: patches per image."""
        return (self.image_size // self.patch_size) ** 2

    def replace(self, **changes: object) -> MixerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> MixerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown MixerConfig fields: {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]

    def macs_per_image(self) -> int:
        """Multiply-accumulates of one forward pass (matmuls and the stem; norms ignored)."""
        s, c = self.num_tokens, self.hidden_dim
        stem = s * c * 3 * self.patch_size**2
        token_mixing = 2 * c * s * self.tokens_mlp_dim
        channel_mixing = 2 * s * c * self.channels_mlp_dim
        head = c * self.num_classes
        return stem + self.num_blocks * (token_mixing + channel_mixing) + head
