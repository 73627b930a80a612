"""The ONNX graph that onnxruntime and TensorRT run: logits and features, precision inside.

TensorRT 10+ builds strongly typed networks: each tensor's type comes from the graph, not
from builder flags. So a reduced-precision graph carries its casts itself: the input is cast
to fp16/bf16 once, every GEMM runs in that type, each LayerNorm casts up to fp32 and back
(its mean and variance need the range), the pooled features are averaged in fp32 and the
logits leave as fp32. The graph is `FusedMixer` (token-major, a GEMM stem, no Conv: ONNX's
Conv has no bf16) exported by `models.export.export_onnx`. fp8 is the fp32 graph with e4m3
Q/DQ pairs around the block GEMMs (onnx_fp8.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.backends.cache import default_cache_dir
from models.backends.torch_fused import FusedMixer
from models.export import OPSET, OUTPUT_NAME, export_onnx
from models.mixer import MlpMixer

FEATURES_NAME = "features"
OUTPUT_NAMES = (OUTPUT_NAME, FEATURES_NAME)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_VERSION = 1  # bump when the exported graph changes, so caches do not serve old ones
log = logging.getLogger(__name__)


def export_module(model: MlpMixer, precision: str) -> FusedMixer:
    """The module to export at `precision`: GELU computed (no table), LayerNorm in fp32."""
    if precision not in DTYPES:
        raise ValueError(f"ONNX graphs come in {', '.join(DTYPES)}, not {precision!r}")
    return FusedMixer(model, DTYPES[precision], gelu_by_table=False, norm_in_fp32=True).eval()


def onnx_file_name(model: MlpMixer, precision: str, opset: int = OPSET) -> str:
    digest = model.sha256 or model.weights_sha256()
    return f"mixer-{digest[:16]}-{precision}-opset{opset}-g{GRAPH_VERSION}.onnx"


def export_cached(
    model: MlpMixer, precision: str, cache_dir: str | Path | None = None, opset: int = OPSET
) -> Path:
    """The ONNX file of `model` at `precision`, exported once per weights sha256."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / "onnx" / onnx_file_name(model, precision, opset)
    if not path.exists() and precision == "fp8":  # Q/DQ nodes in the fp32 graph (onnx_fp8.py)
        log.info("exporting %s with fp8 Q/DQ to %s", model.name, path)
        export_fp8(model, path)
    elif not path.exists():
        log.info("exporting %s at %s to %s", model.name, precision, path)
        export_onnx(
            export_module(model, precision), path, model.config.image_size, opset, OUTPUT_NAMES
        )
    return path


def export_fp8(model: MlpMixer, path: str | Path, images: torch.Tensor | None = None) -> Path:
    """`model`'s fp8 Q/DQ graph (onnx_fp8.py) at `path`, its activation scales calibrated on
    `images` (default: `torch_int8.calibration_images`)."""
    from models.backends.onnx_fp8 import activation_amax, insert_qdq
    from models.backends.torch_int8 import calibration_images

    path = Path(path)
    base = path.with_name(path.stem + "-fp32-base.onnx")
    export_onnx(export_module(model, "fp32"), base, model.config.image_size, OPSET, OUTPUT_NAMES)
    try:
        if images is None:
            images = calibration_images(model.config)
        return insert_qdq(base, path, activation_amax(base, images))
    finally:
        base.unlink(missing_ok=True)
