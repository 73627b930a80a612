"""The preset registry: each named geometry with the preprocessing of every source of weights.

In timm's `default_cfgs` shape: a preset is a config plus, per source, how that source's
images must be prepared, so weights are never paired with another source's transform. The
loaders (checkpoints.py) take a file's preprocessing from here by its source; the benchmark
finds timm's reference model of a geometry here.

Sources:
- official: google-research/vision_transformer's .npz (Flax, tanh GELU); resize bilinear;
- timm: timm's `mixer_*` state dicts (exact erf GELU); resize bicubic.
Both: 224 px, crop fraction 0.875 (short side 256), RGB scaled to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import GeluKind, MixerConfig
from models.preprocessing import Preprocessing


@dataclass(frozen=True)
class WeightsSource:
    """Where weights of a geometry come from, and the preprocessing they were trained with."""

    source: str  # "official" or "timm"
    preprocessing: Preprocessing
    gelu: GeluKind
    model_name: str | None = None  # timm's model name at 224 px, where it has one


SOURCES: dict[str, WeightsSource] = {
    "official": WeightsSource("official", Preprocessing(224, 0.875, "bilinear"), "tanh"),
    "timm": WeightsSource("timm", Preprocessing(224, 0.875, "bicubic"), "erf"),
}


@dataclass(frozen=True)
class PresetCfg:
    """One named geometry and its sources of weights (by source name)."""

    config: MixerConfig
    sources: dict[str, WeightsSource] = field(default_factory=dict)


def _paper(config: MixerConfig, timm_name: str | None = None) -> PresetCfg:
    sources = {"official": SOURCES["official"]}
    if timm_name:
        timm = SOURCES["timm"]
        sources["timm"] = WeightsSource("timm", timm.preprocessing, timm.gelu, timm_name)
    return PresetCfg(config, sources)


# (patch, C, blocks, D_S, D_C) from Table 1 of the paper, plus small ones for tests and demos.
PRESET_CFGS: dict[str, PresetCfg] = {
    "S/32": _paper(MixerConfig(32, 512, 8, 256, 2048), "mixer_s32_224"),
    "S/16": _paper(MixerConfig(16, 512, 8, 256, 2048), "mixer_s16_224"),
    "B/32": _paper(MixerConfig(32, 768, 12, 384, 3072), "mixer_b32_224"),
    "B/16": _paper(MixerConfig(16, 768, 12, 384, 3072), "mixer_b16_224"),
    "L/32": _paper(MixerConfig(32, 1024, 24, 512, 4096), "mixer_l32_224"),
    "L/16": _paper(MixerConfig(16, 1024, 24, 512, 4096), "mixer_l16_224"),
    "H/14": _paper(MixerConfig(14, 1280, 32, 640, 5120)),
    # Small enough for unit tests on two CPU cores.
    "tiny": PresetCfg(MixerConfig(8, 64, 2, 32, 128, num_classes=10, image_size=32)),
    # Sized for the demo: digits upscaled to 32 px, trained on CPU in a minute or two.
    "demo": PresetCfg(MixerConfig(4, 128, 4, 64, 256, num_classes=10, image_size=32)),
}
PRESETS: dict[str, MixerConfig] = {name: cfg.config for name, cfg in PRESET_CFGS.items()}


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


def source_preprocessing(source: str, image_size: int) -> Preprocessing:
    """`source`'s preprocessing at a checkpoint's own input size."""
    return SOURCES[source].preprocessing.replace_size(image_size)


def timm_name(config: MixerConfig) -> str | None:
    """timm's model with `config`'s geometry at 224 px, if there is one."""
    if config.image_size != 224:
        return None
    for cfg in PRESET_CFGS.values():
        geometry = (cfg.config.patch_size, cfg.config.hidden_dim, cfg.config.num_blocks)
        timm = cfg.sources.get("timm")
        if timm and geometry == (config.patch_size, config.hidden_dim, config.num_blocks):
            return timm.model_name
    return None
