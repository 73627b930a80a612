"""Read and write Mixer weights: official `.npz`, timm state dicts, and our own safetensors.

One key table per foreign format, a shape check per key, and an error that names the file and
the key. Conv kernels arrive HWIO (Flax) and become OIHW; Dense kernels arrive (in, out) and
become Linear weights (out, in); LayerNorm `scale` becomes `weight`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.config import MixerConfig
from models.mixer import MlpMixer, build_preset
from models.preprocessing import Preprocessing
from models.presets import SOURCES, preset_config, source_preprocessing

FORMAT_TAG = "mixer-label/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into an MlpMixer; the message names file and key."""


Transform = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _dense(a: np.ndarray) -> np.ndarray:  # Flax (in, out) -> torch Linear (out, in)
    return a.T


def _conv(a: np.ndarray) -> np.ndarray:  # Flax HWIO -> torch OIHW
    return a.transpose(3, 2, 0, 1)


# Our parameter name -> (official npz key, transform). `{i}` is the block index.
NPZ_GLOBAL = {
    "stem.weight": ("stem/kernel", _conv),
    "stem.bias": ("stem/bias", _same),
    "pre_head_norm.weight": ("pre_head_layer_norm/scale", _same),
    "pre_head_norm.bias": ("pre_head_layer_norm/bias", _same),
    "head.weight": ("head/kernel", _dense),
    "head.bias": ("head/bias", _same),
}
NPZ_BLOCK = {
    "token_norm.weight": ("LayerNorm_0/scale", _same),
    "token_norm.bias": ("LayerNorm_0/bias", _same),
    "token_mixing.fc1.weight": ("token_mixing/Dense_0/kernel", _dense),
    "token_mixing.fc1.bias": ("token_mixing/Dense_0/bias", _same),
    "token_mixing.fc2.weight": ("token_mixing/Dense_1/kernel", _dense),
    "token_mixing.fc2.bias": ("token_mixing/Dense_1/bias", _same),
    "channel_norm.weight": ("LayerNorm_1/scale", _same),
    "channel_norm.bias": ("LayerNorm_1/bias", _same),
    "channel_mixing.fc1.weight": ("channel_mixing/Dense_0/kernel", _dense),
    "channel_mixing.fc1.bias": ("channel_mixing/Dense_0/bias", _same),
    "channel_mixing.fc2.weight": ("channel_mixing/Dense_1/kernel", _dense),
    "channel_mixing.fc2.bias": ("channel_mixing/Dense_1/bias", _same),
}
NPZ_BLOCK_PREFIX = "MixerBlock_{i}/"

# Our parameter name -> timm `mixer_*` name; timm's layout already matches torch's.
TIMM_GLOBAL = {
    "stem.weight": "stem.proj.weight",
    "stem.bias": "stem.proj.bias",
    "pre_head_norm.weight": "norm.weight",
    "pre_head_norm.bias": "norm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
TIMM_BLOCK = {
    "token_norm.weight": "norm1.weight",
    "token_norm.bias": "norm1.bias",
    "token_mixing.fc1.weight": "mlp_tokens.fc1.weight",
    "token_mixing.fc1.bias": "mlp_tokens.fc1.bias",
    "token_mixing.fc2.weight": "mlp_tokens.fc2.weight",
    "token_mixing.fc2.bias": "mlp_tokens.fc2.bias",
    "channel_norm.weight": "norm2.weight",
    "channel_norm.bias": "norm2.bias",
    "channel_mixing.fc1.weight": "mlp_channels.fc1.weight",
    "channel_mixing.fc1.bias": "mlp_channels.fc1.bias",
    "channel_mixing.fc2.weight": "mlp_channels.fc2.weight",
    "channel_mixing.fc2.bias": "mlp_channels.fc2.bias",
}
TIMM_BLOCK_PREFIX = "blocks.{i}."


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: Path) -> str:
    """'npz', 'torch' or 'safetensors', from the bytes, not the file name."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
    # safetensors before the pickle test: its 8-byte header length starts with 0x80 whenever
    # that length is 128 mod 256 (one file in 256 was read as a pickle).
    elif len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    elif head[:1] == b"\x80":  # a bare pickle: torch's legacy format
        return "torch"
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected official .npz, timm .pth or .safetensors)"
    )


def load_checkpoint(path: str | Path) -> MlpMixer:
    """Read a checkpoint file of any supported format into an MlpMixer in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    kind = detect_format(path)
    if kind == "npz":
        model = _load_npz(path)
    elif kind == "torch":
        model = _load_timm(path, _read_torch(path))
    else:
        model = _load_safetensors(path)
    model.sha256 = file_sha256(path)
    return model.eval()


@dataclass(frozen=True)
class ModelIdentity:
    """What names a model in metadata and resume checks: its name and its sha256."""

    name: str
    sha256: str


def checkpoint_identity(path: str | Path) -> ModelIdentity:
    """The name and sha256 that `load_checkpoint(path)` would give, from the header alone.

    The driver of a run needs only these (for resume checks and the summary); the workers
    load the weights. The file is hashed as a stream and no tensor is read into memory. The
    name follows the loaders: our safetensors header's `name`, else the file's stem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    name = path.stem
    if detect_format(path) == "safetensors":
        metadata, keys = _safetensors_header(path)
        if metadata.get("format") == FORMAT_TAG:
            name = metadata.get("name") or path.stem
        elif "stem.proj.weight" not in keys:  # the same refusal as _load_safetensors
            raise CheckpointError(f"{path}: safetensors header lacks format={FORMAT_TAG!r}")
    return ModelIdentity(name, file_sha256(path))


def model_identity(spec: str | Path) -> ModelIdentity:
    """`resolve_model(spec)`'s name and sha256; a checkpoint file is not loaded to learn them.

    A preset has no file: its seeded weights are its identity, so it is built (presets are for
    benchmarks and tests).
    """
    if Path(spec).exists():
        return checkpoint_identity(spec)
    model = resolve_model(spec)
    return ModelIdentity(model.name, model.sha256 or model.weights_sha256())


def _safetensors_header(path: Path) -> tuple[dict[str, str], set[str]]:
    """(metadata, tensor keys) of a safetensors file; only its JSON header is read."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (struct.error, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return metadata, set(header)


def resolve_model(spec: str | Path) -> MlpMixer:
    """A checkpoint path, or a preset name ("B/16") with seeded random weights."""
    if Path(spec).exists():
        return load_checkpoint(spec)
    try:
        preset_config(str(spec))
    except KeyError:
        raise CheckpointError(f"{spec}: neither a checkpoint file nor a preset name") from None
    return build_preset(str(spec))


def save_checkpoint(model: MlpMixer, path: str | Path) -> str:
    """Write our safetensors format (config, labels, preprocessing in its header); return sha256."""
    from safetensors.torch import save_file

    metadata = {
        "format": FORMAT_TAG,
        "name": model.name,
        "config": json.dumps(model.config.to_dict()),
        "preprocessing": json.dumps(model.preprocessing.to_dict()),
        "label_names": json.dumps(model.label_names),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _sort_safetensors_header(tmp)
    # safetensors creates its file 0600; a checkpoint is shared like any file (umask decides).
    tmp.chmod(0o666 & ~_umask())
    tmp.replace(path)
    model.sha256 = file_sha256(path)
    return model.sha256


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _sort_safetensors_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys, so the same weights give the same sha256.

    safetensors writes its header from a hash map in arbitrary order; resume compares model
    sha256s across runs, so the bytes must not depend on that order.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        encoded = canonical.encode()
        if len(encoded) > length:  # cannot happen for the same content; never corrupt a file
            raise CheckpointError(f"{path}: canonical header longer than the written one")
        f.seek(8)
        f.write(encoded.ljust(length, b" "))  # safetensors pads its header with spaces


# --- official npz -------------------------------------------------------------------------


def _load_npz(path: Path) -> MlpMixer:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {_strip_prefix(k): archive[k] for k in archive.files}
    except ValueError as err:  # numpy refuses object (pickled) arrays
        raise CheckpointError(f"{path}: refused a pickled array in the .npz ({err})") from None
    config = _npz_geometry(path, arrays)
    table = _expand(NPZ_GLOBAL, NPZ_BLOCK, NPZ_BLOCK_PREFIX, config.num_blocks)
    check_keys(path, arrays, {theirs for theirs, _ in table.values()})
    state = {}
    for ours, (theirs, transform) in table.items():
        state[ours] = _take(path, arrays, theirs, transform)
    return _assemble(path, config, state, source_preprocessing("official", config.image_size))


def _strip_prefix(key: str) -> str:
    # Some exports nest everything under "params/" or "opt/target/"; the layout is the same.
    for prefix in ("opt/target/", "params/"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _npz_geometry(path: Path, arrays: Mapping[str, np.ndarray]) -> MixerConfig:
    stem = _require(path, arrays, "stem/kernel")
    token = _require(path, arrays, "MixerBlock_0/token_mixing/Dense_0/kernel")
    channel = _require(path, arrays, "MixerBlock_0/channel_mixing/Dense_0/kernel")
    head = _require(path, arrays, "head/kernel")
    blocks = _count_blocks(arrays, r"MixerBlock_(\d+)/")
    return MixerConfig(
        patch_size=stem.shape[0],
        hidden_dim=stem.shape[3],
        num_blocks=blocks,
        tokens_mlp_dim=token.shape[1],
        channels_mlp_dim=channel.shape[1],
        num_classes=head.shape[1],
        image_size=_image_size(path, token.shape[0], stem.shape[0]),
        gelu=SOURCES["official"].gelu,
    )


# --- timm state dicts -----------------------------------------------------------------------


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused a pickled payload that is not plain tensors ({first_line})"
        ) from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(payload, dict) and isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
    if not isinstance(payload, dict) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def _load_timm(path: Path, tensors: Mapping[str, torch.Tensor]) -> MlpMixer:
    arrays = {k: v.detach().float().numpy() for k, v in tensors.items()}
    stem = _require(path, arrays, "stem.proj.weight")
    token = _require(path, arrays, "blocks.0.mlp_tokens.fc1.weight")
    channel = _require(path, arrays, "blocks.0.mlp_channels.fc1.weight")
    head = _require(path, arrays, "head.weight")
    config = MixerConfig(
        patch_size=stem.shape[2],
        hidden_dim=stem.shape[0],
        num_blocks=_count_blocks(arrays, r"blocks\.(\d+)\."),
        tokens_mlp_dim=token.shape[0],
        channels_mlp_dim=channel.shape[0],
        num_classes=head.shape[0],
        image_size=_image_size(path, token.shape[1], stem.shape[2]),
        gelu=SOURCES["timm"].gelu,  # timm's nn.GELU default
    )
    table = _expand(TIMM_GLOBAL, TIMM_BLOCK, TIMM_BLOCK_PREFIX, config.num_blocks)
    check_keys(path, arrays, set(table.values()))
    state = {ours: _take(path, arrays, theirs, _same) for ours, theirs in table.items()}
    preprocessing = source_preprocessing("timm", config.image_size)
    return _assemble(path, config, state, preprocessing)


# --- our safetensors ------------------------------------------------------------------------


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, each tensor read into memory of its own.

    The safetensors library validates the header (offsets inside the file, no overlaps, size =
    dtype x shape); the bytes are then read with readinto rather than through its memory map,
    whose pages would count in the process's resident memory beside the copies (about three
    times the weights' size at the peak, BENCHMARKS.md).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except SafetensorError as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    tensors = {}
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
        for key in keys:
            entry = header[key]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: key {key!r} has unsupported dtype {entry['dtype']}")
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            file.seek(8 + header_size + start)
            if file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - start:
                raise CheckpointError(f"{path}: key {key!r} is cut short")
            tensors[key] = tensor
    return metadata, tensors


def _load_safetensors(path: Path) -> MlpMixer:
    metadata, tensors = _read_safetensors(path)
    if metadata.get("format") != FORMAT_TAG:
        if "stem.proj.weight" in tensors:  # timm weights saved as safetensors
            return _load_timm(path, tensors)
        raise CheckpointError(f"{path}: safetensors header lacks format={FORMAT_TAG!r}")
    try:
        config = MixerConfig.from_dict(json.loads(metadata["config"]))
        preprocessing = Preprocessing.from_dict(json.loads(metadata["preprocessing"]))
        label_names = json.loads(metadata["label_names"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: bad header entry: {err}") from None
    arrays = {k: v.float().numpy() for k, v in tensors.items()}
    del tensors  # fp32 tensors share memory with their arrays; others are copies now
    with torch.device("meta"):  # the keys only: no memory, no random init
        expected = MlpMixer(config).state_dict().keys()
    check_keys(path, arrays, set(expected))
    state = {k: _take(path, arrays, k, _same) for k in expected}
    return _assemble(
        path, config, state, preprocessing, label_names, metadata.get("name") or path.stem
    )


# --- shared helpers -------------------------------------------------------------------------


def _expand(global_table: dict, block_table: dict, block_prefix: str, blocks: int) -> dict:
    table = dict(global_table)
    for i in range(blocks):
        theirs_prefix = block_prefix.format(i=i)
        for ours, theirs in block_table.items():
            if isinstance(theirs, tuple):
                table[f"blocks.{i}.{ours}"] = (theirs_prefix + theirs[0], theirs[1])
            else:
                table[f"blocks.{i}.{ours}"] = theirs_prefix + theirs
    return table


def check_keys(path: Path, found: Mapping[str, object], wanted: set[str]) -> None:
    """Fail unless the file's keys are exactly `wanted`, naming every missing and leftover one.

    A leftover key means the file is not what the loader took it for (another architecture,
    a deeper model, a different head), so it must not load silently (as vit_jax's
    `inspect_params`).
    """
    missing, unexpected = sorted(wanted - set(found)), sorted(set(found) - wanted)
    if missing or unexpected:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        raise CheckpointError(f"{path}: keys do not match the model: {'; '.join(parts)}")


def _require(path: Path, arrays: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in arrays:
        raise CheckpointError(f"{path}: missing key {key!r}")
    return arrays[key]


def _take(path: Path, arrays: Mapping, key: str, transform: Transform) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(transform(_require(path, arrays, key)))).float()


def _count_blocks(arrays: Mapping[str, object], pattern: str) -> int:
    indices = {int(m.group(1)) for k in arrays if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def _image_size(path: Path, num_tokens: int, patch: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"{path}: {num_tokens} tokens is not a square grid of patches")
    return side * patch


def _assemble(
    path: Path,
    config: MixerConfig,
    state: dict[str, torch.Tensor],
    preprocessing: Preprocessing,
    label_names: list[str] | None = None,
    name: str | None = None,
) -> MlpMixer:
    # Built on the meta device and then handed the loaded tensors (assign=True): one copy of
    # the weights in memory, never a randomly initialized second one.
    with torch.device("meta"):
        model = MlpMixer(config, preprocessing, label_names, name=name or path.stem)
    expected = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    missing = set(expected) - set(state)
    if missing:
        raise CheckpointError(f"{path}: missing key {sorted(missing)[0]!r}")
    model.load_state_dict(state, assign=True)
    return model
