"""What `mixer-label model info` prints: everything that names and sizes a model."""

from __future__ import annotations

from models.mixer import MlpMixer


def describe(model: MlpMixer) -> dict[str, object]:
    """Config, parameter count, GMACs per image, sha256, preprocessing and labels of `model`."""
    config = model.config
    labels = model.label_names
    return {
        "name": model.name,
        "sha256": model.sha256 or model.weights_sha256(),
        "config": config.to_dict(),
        "tokens": config.num_tokens,
        "parameters": model.num_parameters(),
        "gmacs_per_image": round(config.macs_per_image() / 1e9, 3),
        "gflops_per_image": round(2 * config.macs_per_image() / 1e9, 3),
        "preprocessing": model.preprocessing.to_dict(),
        "label_count": len(labels),
        "labels_preview": labels[:10],
    }


def format_description(info: dict[str, object]) -> str:
    """The same as aligned text lines for a terminal."""
    config = info["config"]
    pre = info["preprocessing"]
    lines = [
        f"model           {info['name']}",
        f"sha256          {info['sha256']}",
        "geometry        patch {patch_size}, hidden {hidden_dim}, blocks {num_blocks}, "
        "token MLP {tokens_mlp_dim}, channel MLP {channels_mlp_dim}".format(**config),
        f"input           {config['image_size']} px, {info['tokens']} tokens, "
        f"GELU {config['gelu']}",
        f"parameters      {info['parameters']:,}",
        f"compute         {info['gmacs_per_image']} GMACs per image "
        f"({info['gflops_per_image']} GFLOP)",
        f"preprocessing   resize {pre['interpolation']} to short side "
        f"{round(pre['input_size'] / pre['crop_fraction'])}, center crop {pre['input_size']}, "
        f"mean {tuple(pre['mean'])}, std {tuple(pre['std'])}",
        f"labels          {info['label_count']} ({', '.join(info['labels_preview'])}"
        f"{', ...' if info['label_count'] > len(info['labels_preview']) else ''})",
    ]
    return "\n".join(lines)
