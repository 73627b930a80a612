"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from models.mixer import MlpMixer, build_preset


@pytest.fixture(scope="module")
def tiny() -> MlpMixer:
    """The tiny preset with seeded weights; one per test module (some tests free its weights)."""
    return build_preset("tiny")
