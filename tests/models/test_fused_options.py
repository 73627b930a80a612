"""FusedMixer's GPU-minded options computed on the CPU against its plain path (issue 20 item 3).

The options only move work into GEMM epilogues and LayerNorm passes, so in fp32 they compute
the plain path's numbers up to the order of sums. A changed weight or a dropped bias must
break the comparison, or it would not be checking anything.
"""

from __future__ import annotations

import pytest
import torch

from models.backends.torch_fused import FusedMixer
from models.mixer import build_preset

# On the CPU `_addmm_activation` computes the erf GELU (within 1e-3 of tanh): the options
# that put the GELU in the epilogue are compared at that tolerance, the others at fp32's.
OPTIONS = [
    ({"residual_in_gemm": True}, 1e-5),
    ({"residual_in_gemm": True, "token_gelu_in_gemm": True}, 2e-3),
    ({"residual_in_gemm": True, "gelu_in_gemm": True, "token_gelu_in_gemm": True}, 2e-3),
]


@pytest.fixture(scope="module")
def case():
    model = build_preset("tiny", seed=3)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain, plain_features = FusedMixer(model, torch.float32)(images)
    return model, images, plain, plain_features


def max_difference(module: FusedMixer, images, plain, plain_features) -> float:
    with torch.inference_mode():
        logits, features = module(images)
    return max((logits - plain).abs().max().item(), (features - plain_features).abs().max().item())


@pytest.mark.parametrize(("flags", "tolerance"), OPTIONS)
def test_option_computes_the_plain_paths_logits_and_features(case, flags, tolerance):
    model, images, plain, plain_features = case
    difference = max_difference(
        FusedMixer(model, torch.float32, **flags), images, plain, plain_features
    )
    print(f"{flags}: max difference {difference:.1e}")
    assert difference < tolerance


@pytest.mark.parametrize("mutation", ["token fc2 weight", "carried channel bias dropped"])
@pytest.mark.parametrize(("flags", "tolerance"), OPTIONS)
def test_the_comparison_fails_for_a_mutated_option_module(case, flags, tolerance, mutation):
    model, images, plain, plain_features = case
    module = FusedMixer(model, torch.float32, **flags)
    with torch.no_grad():
        if mutation == "token fc2 weight":
            module.blocks[0].token_fc2_weight[3, 5] += 0.5
        else:  # the bias residual_in_gemm leaves to the next norm, lost on the way
            module.blocks[1].channel_fc2_bias.zero_()
    difference = max_difference(module, images, plain, plain_features)
    print(f"{flags}, {mutation}: max difference {difference:.1e}")
    assert difference >= tolerance
