import pytest
import torch

from models.mixer import PRESETS, MixerConfig, MlpMixer, build_preset, preset_config

# Parameter counts with a 1000-class head, from the paper's geometry (and timm's models).
PAPER_PARAMETERS = {"B/16": 59_880_472, "B/32": 60_293_428, "L/16": 208_196_168}


@pytest.mark.parametrize("name,expected", PAPER_PARAMETERS.items())
def test_parameter_counts_match_the_paper(name, expected):
    with torch.device("meta"):  # counts need shapes only, not 800 MB of weights
        model = MlpMixer(PRESETS[name])
    assert model.num_parameters() == expected


def test_b16_macs_are_about_12_6_giga():
    assert PRESETS["B/16"].macs_per_image() == pytest.approx(12.6e9, rel=0.01)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_a_forward(name):
    # Full geometry, but a small image keeps the big presets cheap on two cores.
    config = PRESETS[name]
    small = config.replace(image_size=config.patch_size * 2) if config.image_size > 64 else config
    model = MlpMixer(small).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, small.image_size, small.image_size)
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, small.num_classes)
    assert features.shape == (2, small.hidden_dim)
    assert torch.isfinite(logits).all()
    assert torch.allclose(model.head(features), logits, atol=1e-5)


def test_presets_can_be_named_many_ways():
    assert preset_config("mixer_b16") is PRESETS["B/16"]
    assert preset_config("b16") is PRESETS["B/16"]
    with pytest.raises(KeyError, match="unknown preset"):
        preset_config("Z/99")


def test_batch_items_are_independent():
    model = build_preset("tiny")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = model(x[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_gelu_kind_is_validated_and_used():
    with pytest.raises(ValueError, match="gelu"):
        MixerConfig(gelu="relu")
    torch.manual_seed(0)
    tanh = MlpMixer(PRESETS["tiny"]).eval()
    erf = MlpMixer(PRESETS["tiny"].replace(gelu="erf")).eval()
    erf.load_state_dict(tanh.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(tanh(x), erf(x))


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple"):
        MixerConfig(patch_size=16, image_size=100)
