"""Parity with timm's mixer_b16_224: same random weights, logits within 1e-4 in fp32."""

import pytest
import torch

from models.checkpoints import load_checkpoint

timm = pytest.importorskip("timm", reason="timm (dev extra) is not installed")


@pytest.fixture(scope="module")
def timm_b16():
    torch.manual_seed(0)
    model = timm.create_model("mixer_b16_224", pretrained=False).eval()
    # timm's init zeroes biases and some weights: randomize everything so no key can hide.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return model


def test_b16_matches_timm_within_1e4(tmp_path, timm_b16):
    torch.save(timm_b16.state_dict(), tmp_path / "mixer_b16_224.pth")
    ours = load_checkpoint(tmp_path / "mixer_b16_224.pth")
    assert ours.num_parameters() == 59_880_472
    assert ours.config.gelu == "erf"
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = timm_b16(x)
        logits = ours(x)
        features = ours.forward_features(x)
        timm_features = timm_b16.forward_head(timm_b16.forward_features(x), pre_logits=True)
    diff = (logits - expected).abs().max().item()
    print(f"timm mixer_b16_224 parity: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    assert (features - timm_features).abs().max().item() <= 1e-4
