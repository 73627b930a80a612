import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import (
    NPZ_BLOCK,
    NPZ_BLOCK_PREFIX,
    NPZ_GLOBAL,
    CheckpointError,
    checkpoint_identity,
    load_checkpoint,
    model_identity,
    resolve_model,
    save_checkpoint,
)
from models.mixer import PRESETS, MlpMixer, build_preset
from models.preprocessing import Preprocessing

OFFICIAL = Path(__file__).parent / "data" / "official_small"


def official_logits():
    images = np.load(OFFICIAL / "input_nhwc.npy", allow_pickle=False)
    return torch.from_numpy(images).permute(0, 3, 1, 2), np.load(OFFICIAL / "logits.npy")


def test_official_npz_matches_the_authors_flax_code():
    model = load_checkpoint(OFFICIAL / "params.npz")
    c = model.config
    assert (c.image_size, c.patch_size, c.hidden_dim, c.num_blocks) == (48, 8, 96, 2)
    assert (c.tokens_mlp_dim, c.channels_mlp_dim, c.num_classes, c.gelu) == (48, 192, 7, "tanh")
    images, expected = official_logits()
    with torch.no_grad():
        logits = model(images).numpy()
    assert np.abs(logits - expected).max() <= 1e-5


def test_exact_gelu_would_miss_the_official_logits():
    # Guards the test above: the tolerance is tight enough to tell the two GELUs apart.
    model = load_checkpoint(OFFICIAL / "params.npz")
    erf = MlpMixer(model.config.replace(gelu="erf")).eval()
    erf.load_state_dict(model.state_dict())
    images, expected = official_logits()
    with torch.no_grad():
        assert np.abs(erf(images).numpy() - expected).max() > 1e-5


def write_npz(model: MlpMixer, path: Path, drop: str | None = None, **extra) -> None:
    """Our model written in the official layout, inverting the loader's table by hand."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays = {}
    for ours, (theirs, _) in NPZ_GLOBAL.items():
        arrays[theirs] = state[ours]
    for i in range(model.config.num_blocks):
        for ours, (theirs, _) in NPZ_BLOCK.items():
            arrays[NPZ_BLOCK_PREFIX.format(i=i) + theirs] = state[f"blocks.{i}.{ours}"]
    for key, value in arrays.items():
        if key.endswith("kernel"):
            arrays[key] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    arrays.update(extra)
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)


@pytest.mark.parametrize("classes", [1000, 21843, 10])
def test_npz_round_trip_any_class_count(tmp_path, classes):
    model = build_preset("tiny", num_classes=classes)
    write_npz(model, tmp_path / "m.npz")
    loaded = load_checkpoint(tmp_path / "m.npz")
    assert loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert len(loaded.sha256) == 64


def test_npz_missing_key_names_file_and_key(tmp_path):
    write_npz(build_preset("tiny"), tmp_path / "m.npz", drop="MixerBlock_1/LayerNorm_1/scale")
    with pytest.raises(CheckpointError, match=r"m\.npz.*MixerBlock_1/LayerNorm_1/scale"):
        load_checkpoint(tmp_path / "m.npz")


def test_npz_wrong_shape_names_the_key(tmp_path):
    model = build_preset("tiny")
    write_npz(model, tmp_path / "m.npz", **{"MixerBlock_0/LayerNorm_0/bias": np.zeros(5)})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.token_norm\.bias.*shape"):
        load_checkpoint(tmp_path / "m.npz")


def test_npz_with_pickled_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"stem/kernel": np.array([object()], dtype=object)})
    with pytest.raises(CheckpointError, match="evil.npz.*pickled"):
        load_checkpoint(path)


def timm_state_dict(model: MlpMixer) -> dict[str, torch.Tensor]:
    renames = {
        "stem.": "stem.proj.",
        "token_norm": "norm1",
        "channel_norm": "norm2",
        "token_mixing": "mlp_tokens",
        "channel_mixing": "mlp_channels",
        "pre_head_norm": "norm",
    }
    out = {}
    for key, value in model.state_dict().items():
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        out[key] = value
    return out


def test_timm_state_dict_loads_with_exact_gelu(tmp_path):
    model = build_preset("tiny", gelu="erf")
    torch.save({"state_dict": timm_state_dict(model)}, tmp_path / "m.pth")
    loaded = load_checkpoint(tmp_path / "m.pth")
    assert loaded.config.gelu == "erf"
    assert loaded.preprocessing.interpolation == "bicubic"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_npz_with_leftover_keys_names_them_and_the_file(tmp_path):
    extra = {"encoder_norm/scale": np.ones(64), "pre_logits/kernel": np.ones((2, 2))}
    write_npz(build_preset("tiny"), tmp_path / "m.npz", drop="head/bias", **extra)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "m.npz")
    message = str(caught.value)
    assert "m.npz" in message and "missing keys ['head/bias']" in message
    assert "unexpected keys ['encoder_norm/scale', 'pre_logits/kernel']" in message


def test_timm_state_dict_with_a_leftover_key_is_refused(tmp_path):
    state = timm_state_dict(build_preset("tiny", gelu="erf"))
    state["fc_norm.weight"] = torch.ones(64)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"m\.pth.*unexpected keys \['fc_norm\.weight'\]"):
        load_checkpoint(tmp_path / "m.pth")


def test_our_safetensors_with_a_leftover_key_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    save_checkpoint(build_preset("tiny"), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["blocks.2.token_norm.weight"] = torch.ones(64)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.2\.token_norm"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_in_a_pth_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth.*pickled"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_bare_legacy_pickle_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="legacy.pt"):
        load_checkpoint(path)


def test_own_format_keeps_config_labels_and_preprocessing(tmp_path):
    model = build_preset("tiny")
    model.label_names = [f"digit {i}" for i in range(10)]
    model.preprocessing = Preprocessing(32, 1.0, "bicubic", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    model.name = "digits"
    sha = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.sha256 == sha
    assert loaded.config == model.config
    assert loaded.label_names == model.label_names
    assert loaded.preprocessing == model.preprocessing
    assert loaded.name == "digits"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoints_are_written_like_any_file_by_the_umask(tmp_path):
    import os
    import stat

    path = tmp_path / "m.safetensors"
    save_checkpoint(build_preset("tiny"), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_current_umask()
    previous = os.umask(0o027)
    try:
        save_checkpoint(build_preset("tiny"), path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not list(tmp_path.glob("*.tmp"))


def _current_umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not weights")
    with pytest.raises(CheckpointError, match="notes.txt.*unknown checkpoint format"):
        load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="nope.npz.*no such"):
        load_checkpoint(tmp_path / "nope.npz")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.md", "a zip, but not weights")
    (tmp_path / "other.zip").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="other.zip"):
        load_checkpoint(tmp_path / "other.zip")


def test_resolve_model_takes_presets_and_files(tmp_path):
    assert resolve_model("tiny").config == PRESETS["tiny"]
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a preset"):
        resolve_model("no-such-model")


def test_same_weights_give_the_same_file_and_sha256(tmp_path):
    # Resume compares model sha256s across runs: saving must be byte-for-byte repeatable.
    model = build_preset("tiny")
    first = save_checkpoint(model, tmp_path / "a.safetensors")
    second = save_checkpoint(model, tmp_path / "b.safetensors")
    assert first == second
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert load_checkpoint(tmp_path / "b.safetensors").sha256 == first


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    # A worker loads the checkpoint before building its predictor: the load's peak is part of
    # the predictor's memory budget (1.5x the weights). Measured in a fresh process.
    path = tmp_path / "s32.safetensors"
    model = build_preset("S/32")
    weights_mb = 4 * model.num_parameters() / 2**20
    save_checkpoint(model, path)
    probe = (
        "import sys, torch\n"
        "from bench.measure import current_rss_bytes, peak_rss_bytes\n"
        "from models.checkpoints import load_checkpoint\n"
        "torch.zeros(1)\n"
        "base = current_rss_bytes()\n"
        "model = load_checkpoint(sys.argv[1])\n"
        "assert all(p.device.type == 'cpu' for p in model.parameters())\n"
        "print((peak_rss_bytes() - base) / 2**20)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=root
    )
    assert done.returncode == 0, done.stderr
    peak_mb = float(done.stdout.split()[-1])
    print(f"load peak {peak_mb:.0f} MB for {weights_mb:.0f} MB of weights")
    assert peak_mb < 1.25 * weights_mb
    loaded = load_checkpoint(path)
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))


def test_identity_from_the_header_matches_what_loading_gives(tmp_path):
    # The driver names the model in resume checks and summaries from checkpoint_identity; the
    # workers write what load_checkpoint gives. They must agree for every format.
    model = build_preset("tiny", gelu="erf")
    model.name = "digits"
    save_checkpoint(model, tmp_path / "own.safetensors")
    write_npz(model, tmp_path / "official.npz")
    torch.save({"state_dict": timm_state_dict(model)}, tmp_path / "timm.pth")
    from safetensors.torch import save_file

    save_file(timm_state_dict(model), str(tmp_path / "timm.safetensors"))
    for name in ("own.safetensors", "official.npz", "timm.pth", "timm.safetensors"):
        loaded = load_checkpoint(tmp_path / name)
        identity = checkpoint_identity(tmp_path / name)
        assert (identity.name, identity.sha256) == (loaded.name, loaded.sha256), name
    assert checkpoint_identity(tmp_path / "own.safetensors").name == "digits"
    preset = model_identity("tiny")
    assert (preset.name, preset.sha256) == (build_preset("tiny").name, build_preset("tiny").sha256)


def test_identity_refuses_what_loading_refuses(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not weights")
    with pytest.raises(CheckpointError, match="notes.txt.*unknown checkpoint format"):
        checkpoint_identity(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="nope.npz.*no such"):
        checkpoint_identity(tmp_path / "nope.npz")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="foreign.safetensors.*format="):
        checkpoint_identity(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a preset"):
        model_identity("no-such-model")


def test_identity_reads_no_weights_into_memory(tmp_path):
    # Measured in a fresh process: loading S/32 would add its 76 MB of weights to the peak.
    path = tmp_path / "s32.safetensors"
    save_checkpoint(build_preset("S/32"), path)
    probe = (
        "import sys, torch\n"
        "from bench.measure import current_rss_bytes, peak_rss_bytes\n"
        "from models.checkpoints import checkpoint_identity, file_sha256\n"
        "torch.zeros(1)\n"
        "base = current_rss_bytes()\n"
        "identity = checkpoint_identity(sys.argv[1])\n"
        "assert identity.sha256 == file_sha256(sys.argv[1])\n"
        "print((peak_rss_bytes() - base) / 2**20)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=root
    )
    assert done.returncode == 0, done.stderr
    peak_mb = float(done.stdout.split()[-1])
    print(f"identity peak {peak_mb:.1f} MB for a {path.stat().st_size / 2**20:.0f} MB file")
    assert peak_mb < 16


def test_a_safetensors_header_length_of_128_mod_256_is_not_read_as_a_pickle(tmp_path) -> None:
    """Its first byte is then 0x80, a pickle's protocol opcode; the format is told by byte 8."""
    import struct

    from safetensors.torch import save_file

    from models.checkpoints import detect_format

    path = tmp_path / "w.safetensors"
    for pad in range(0, 512, 8):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        if length % 256 == 128:
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert detect_format(path) == "safetensors"
