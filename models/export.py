"""ONNX export with a dynamic batch axis, checked against onnxruntime.

Opset 18 keeps LayerNorm a single node (it exists since 17), which TensorRT and onnxruntime
fuse. The export is the input of the onnxruntime and TensorRT backends.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.mixer import MlpMixer

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
log = logging.getLogger(__name__)


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    image_size: int | None = None,
    opset: int = OPSET,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> Path:
    """Write `model` as ONNX with input `images` (batch, 3, H, W) and output `logits`.

    A module that returns several tensors names them in `output_names`; every output gets
    the dynamic batch axis.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = image_size or _image_size(model)
    example = torch.randn(2, 3, size, size)
    model = model.eval()
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}},
            dynamo=False,  # the TorchScript exporter gives one LayerNormalization node per norm
            external_data=False,
        )
    tmp.replace(path)
    return path


def onnx_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_onnx(
    model: torch.nn.Module, path: str | Path, batch: torch.Tensor | None = None
) -> float:
    """Max abs logit difference between `model` and onnxruntime running `path` on `batch`."""
    import onnxruntime as ort

    if batch is None:
        size = _image_size(model)
        batch = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy().astype(np.float32)})
    with torch.no_grad():
        reference = model.eval()(batch).float().numpy()
    return float(np.abs(ours - reference).max())


def _image_size(model: torch.nn.Module) -> int:
    if isinstance(model, MlpMixer):
        return model.config.image_size
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("pass image_size for a model without a MixerConfig")
    return config.image_size
