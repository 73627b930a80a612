"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601), paper-exact.

Read it against Figure 1: a per-patch linear embedding, N Mixer layers of token mixing then
channel mixing (each `x + MLP(LayerNorm(x))`), a pre-head LayerNorm, global average pooling
and a linear head. Speed tricks live in `models/backends/`, never here.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import GeluKind, MixerConfig
from models.preprocessing import Preprocessing
from models.presets import PRESETS, preset_config

__all__ = ["PRESETS", "MixerConfig", "MlpMixer", "build_preset", "preset_config"]


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
