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


# Every preset's parameter count, from the paper's Table 1 geometry (B/16 with 1000 classes:
# 59,880,472, as timm's mixer_b16_224). A preset missing here fails the test below.
EXPECTED_PARAMETERS = {
    "S/32": 19_104_624,
    "S/16": 18_528_264,
    "B/32": 60_293_428,
    "B/16": 59_880_472,
    "L/32": 206_939_264,
    "L/16": 208_196_168,
    "H/14": 432_350_952,
    "tiny": 48_938,
    "demo": 306_826,
}
PAPER_MILLIONS = {"S/32": 19, "S/16": 18, "B/32": 60, "B/16": 59, "L/32": 206, "L/16": 207}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_presets_parameter_count_is_checked(name):
    assert name in EXPECTED_PARAMETERS, f"preset {name!r} has no expected parameter count"
    with torch.device("meta"):
        count = MlpMixer(PRESETS[name]).num_parameters()
    assert count == EXPECTED_PARAMETERS[name]
    if name in PAPER_MILLIONS:  # the paper's Table 1 rounds (down or to nearest) to millions
        assert abs(count / 1e6 - PAPER_MILLIONS[name]) < 1.3


def test_each_weights_source_carries_its_own_preprocessing():
    from models.presets import PRESET_CFGS, source_preprocessing, timm_name

    b16 = PRESET_CFGS["B/16"]
    assert b16.sources["official"].preprocessing.interpolation == "bilinear"
    assert b16.sources["timm"].preprocessing.interpolation == "bicubic"
    assert b16.sources["timm"].model_name == "mixer_b16_224" == timm_name(PRESETS["B/16"])
    assert source_preprocessing("official", 384).input_size == 384
    assert timm_name(PRESETS["tiny"]) is None
