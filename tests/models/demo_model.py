"""The demo preset trained on the real digits, once per test process (fp8 numerics tests)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

EPOCHS = 3  # of the demo's 12: about 94% on the test split, in a few minutes on 2 cores


@functools.cache
def trained_demo() -> tuple[object, torch.Tensor, torch.Tensor, float]:
    """(model, the 360 real test images, their fp32 logits, test accuracy), the demo's split."""
    from models.checkpoints import load_checkpoint
    from pipeline.demo_data import DigitsSpec, write_demo_data
    from pipeline.train import TrainConfig, read_split, train

    with tempfile.TemporaryDirectory(prefix="mixer-demo-") as folder:
        root = Path(folder)
        write_demo_data(str(root / "digits"), DigitsSpec(broken=False))
        config = TrainConfig(epochs=EPOCHS, name="mixer-demo-fp8-test")
        result = train(str(root / "digits"), root / "model", config, log=lambda line: None)
        model = load_checkpoint(result.model_path).eval()
        images = read_split(str(root / "digits" / "test"), model.preprocessing).images
    with torch.inference_mode():
        reference = model(images)
    return model, images, reference, result.accuracy
