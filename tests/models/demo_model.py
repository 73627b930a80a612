"""The demo model (tests/models/data/demo) and its 360 real test images, once per process."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

CHECKPOINT = Path(__file__).parent / "data" / "demo" / "model.safetensors"


@functools.cache
def trained_demo() -> tuple[object, torch.Tensor, torch.Tensor]:
    """(model, the demo's real test images, their fp32 logits)."""
    from models.checkpoints import load_checkpoint
    from pipeline.demo_data import DigitsSpec, write_demo_data
    from pipeline.train import read_split

    model = load_checkpoint(CHECKPOINT).eval()
    with tempfile.TemporaryDirectory(prefix="mixer-demo-") as folder:
        write_demo_data(folder, DigitsSpec())
        images = read_split(f"{folder}/test", model.preprocessing).images
    with torch.inference_mode():
        reference = model(images)
    return model, images, reference
