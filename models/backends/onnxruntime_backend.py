"""onnxruntime on its CPU provider (fp32) or CUDA provider (fp32, fp16).

The graph is `onnx_graph.export_cached`: exported once per weights sha256 and precision into
the cache folder, then loaded with every graph optimization on. onnxruntime's CPU provider
has no bf16 GEMM, so bf16 belongs to torch (CPU) and TensorRT (GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.backends.base import BackendError, Predictor
from models.backends.hardware import usable_cpus
from models.backends.onnx_graph import FEATURES_NAME, export_cached
from models.export import INPUT_NAME, OUTPUT_NAME
from models.mixer import MlpMixer

PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32", "fp16")}


class OnnxRuntimePredictor(Predictor):
    """One onnxruntime session over the exported graph."""

    name = "onnxruntime"

    def __init__(
        self,
        model: MlpMixer,
        precision: str = "fp32",
        device: str = "cpu",
        batch_size: int | None = None,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(model)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendError(f"onnxruntime does not import here ({err})") from None
        kind = "cuda" if device.startswith("cuda") else "cpu"
        if precision not in PRECISIONS[kind]:
            raise BackendError(
                f"onnxruntime on {kind.upper()} runs {', '.join(PRECISIONS[kind])}, "
                f"not {precision!r}"
            )
        if kind == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
                )
            index = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.precision, self.device = precision, device
        self.preferred_batch_size = batch_size or (256 if kind == "cuda" else 16)
        self.onnx_path = export_cached(model, precision, cache_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads or kind == "cpu":
            options.intra_op_num_threads = threads or usable_cpus()
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # .cpu(): a device-decoded batch (pipeline.device_decode) may arrive on the GPU; this
        # session is fed from host memory.
        feed = {INPUT_NAME: np.ascontiguousarray(batch.cpu().numpy(), dtype=np.float32)}
        logits, features = self.session.run([OUTPUT_NAME, FEATURES_NAME], feed)
        return torch.from_numpy(logits).float(), torch.from_numpy(features).float()
