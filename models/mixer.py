"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601), paper-exact.

Read it against Figure 1: a per-patch linear embedding, N Mixer layers of token mixing then
channel mixing (each `x + MLP(LayerNorm(x))`), a pre-head LayerNorm, global average pooling
and a linear head. Speed tricks live in `models/backends/`, never here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.preprocessing import Preprocessing

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


# (patch, C, blocks, D_S, D_C) from Table 1 of the paper, plus small ones for tests and demos.
PRESETS: dict[str, MixerConfig] = {
    "S/32": MixerConfig(32, 512, 8, 256, 2048),
    "S/16": MixerConfig(16, 512, 8, 256, 2048),
    "B/32": MixerConfig(32, 768, 12, 384, 3072),
    "B/16": MixerConfig(16, 768, 12, 384, 3072),
    "L/32": MixerConfig(32, 1024, 24, 512, 4096),
    "L/16": MixerConfig(16, 1024, 24, 512, 4096),
    "H/14": MixerConfig(14, 1280, 32, 640, 5120),
    # Small enough for unit tests on two CPU cores.
    "tiny": MixerConfig(8, 64, 2, 32, 128, num_classes=10, image_size=32),
    # Sized for the demo: digits upscaled to 32 px, trained on CPU in a minute or two.
    "demo": MixerConfig(4, 128, 4, 64, 256, num_classes=10, image_size=32),
}


def preset_config(name: str) -> MixerConfig:
    """The preset called `name` ("B/16", "mixer_b16", "b16" all work)."""
    key = name.strip()
    for prefix in ("mixer_", "mixer-", "Mixer-"):
        if key.lower().startswith(prefix.lower()):
            key = key[len(prefix) :]
    for preset in PRESETS:
        if key.lower() in (preset.lower(), preset.replace("/", "").lower()):
            return PRESETS[preset]
    raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


class MlpBlock(nn.Module):
    """Dense → GELU → Dense."""

    def __init__(self, dim: int, hidden_dim: int, gelu: GeluKind) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing within each patch."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        c = config
        self.token_norm = nn.LayerNorm(c.hidden_dim, eps=1e-6)
        self.token_mixing = MlpBlock(c.num_tokens, c.tokens_mlp_dim, c.gelu)
        self.channel_norm = nn.LayerNorm(c.hidden_dim, eps=1e-6)
        self.channel_mixing = MlpBlock(c.hidden_dim, c.channels_mlp_dim, c.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, channels)
        y = self.token_norm(x).transpose(1, 2)
        x = x + self.token_mixing(y).transpose(1, 2)
        return x + self.channel_mixing(self.channel_norm(x))


class MlpMixer(nn.Module):
    """The whole network; `forward` takes normalized NCHW float32 and returns logits.

    A model carries what a predictor needs to use it correctly: its preprocessing and label
    names, and (once loaded from a file) its name and the sha256 of its weights.
    """

    def __init__(
        self,
        config: MixerConfig,
        preprocessing: Preprocessing | None = None,
        label_names: list[str] | None = None,
        name: str = "mixer",
    ) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = preprocessing or Preprocessing(input_size=config.image_size)
        self.label_names = label_names or [str(i) for i in range(config.num_classes)]
        if len(self.label_names) != config.num_classes:
            raise ValueError(
                f"{len(self.label_names)} label names for {config.num_classes} classes"
            )
        self.name = name
        self.sha256: str | None = None  # set by load_checkpoint / save_checkpoint
        p = config.patch_size
        self.stem = nn.Conv2d(3, config.hidden_dim, kernel_size=p, stride=p)
        self.blocks = nn.ModuleList(MixerBlock(config) for _ in range(config.num_blocks))
        self.pre_head_norm = nn.LayerNorm(config.hidden_dim, eps=1e-6)
        self.head = nn.Linear(config.hidden_dim, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-head features (the embedding), shape (batch, hidden_dim)."""
        x = self.stem(x).flatten(2).transpose(1, 2)  # (batch, tokens, channels)
        for block in self.blocks:
            x = block(x)
        return self.pre_head_norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weights_sha256(self) -> str:
        """sha256 of the weights themselves, for models that never came from a file."""
        import hashlib

        digest = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()


def build_preset(name: str, seed: int = 0, **overrides: object) -> MlpMixer:
    """A preset with seeded random weights (for benchmarks and tests; no download)."""
    config = preset_config(name).replace(**overrides) if overrides else preset_config(name)
    torch.manual_seed(seed)
    model = MlpMixer(config, name=f"mixer-{name.replace('/', '').lower()}-random-seed{seed}")
    model.sha256 = model.weights_sha256()
    return model.eval()
