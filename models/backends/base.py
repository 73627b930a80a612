"""The one interface every runtime implements: a batch of normalized images in, fp32 logits out.

A predictor is made once per process (see `models.backends.create`) and then called for every
batch. It carries what the caller needs to use it correctly: the model's name, weights sha256,
preprocessing and label names, so weights never meet the wrong transform.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from models.backends.auto import Choice
from models.mixer import MixerConfig, MlpMixer
from models.names import PRECISIONS
from models.preprocessing import Preprocessing

__all__ = ["PRECISIONS", "BackendError", "Predictor"]


class BackendError(RuntimeError):
    """A backend or precision that cannot run here; the message says which and why."""


class Predictor(ABC):
    """Runs one model on one device at one precision; `predict` is the hot path."""

    name: str  # the backend: "torch", "onnxruntime", "tensorrt"
    precision: str  # one of PRECISIONS
    device: str  # "cpu" or "cuda:N"
    preferred_batch_size: int  # the batch size this predictor runs fastest per image
    max_batch_size: int | None = None  # larger batches are split (TensorRT's profile max)
    choice: Choice | None = None  # how create() resolved backend/precision/device, and why
    compiled: bool = False  # torch: compiled (AOT package or torch.compile)
    aot: bool = False  # torch on CPU: an AOTInductor package (aot_package.py)
    aot_info: dict[str, object] | None = None  # that package's key and where it came from
    int8_engine: str | None = None  # int8 only: which quantized path runs
    int8_dynamic: bool = False  # int8 only: activations quantized per batch, nothing fused
    # auto by measurement (auto_measure.Decision.summary()): what it chose, each candidate's
    # img/s and agreement, measured or read from a cache; None for an explicit choice.
    auto_decision: dict[str, object] | None = None

    def __init__(self, model: MlpMixer) -> None:
        self.config: MixerConfig = model.config
        self.preprocessing: Preprocessing = model.preprocessing
        self.label_names: list[str] = list(model.label_names)
        self.model_name: str = model.name
        self.sha256: str = model.sha256 or model.weights_sha256()

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """fp32 logits (batch, classes) on the CPU for a normalized NCHW float32 batch."""
        return self.predict_with_features(batch)[0]

    def predict_with_features(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled pre-head features), both fp32 on the CPU."""
        self.check_batch(batch)
        if len(batch) == 0:
            return (
                torch.zeros(0, self.config.num_classes),
                torch.zeros(0, self.config.hidden_dim),
            )
        step = self.max_batch_size or len(batch)
        parts = [self._run(batch[i : i + step]) for i in range(0, len(batch), step)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @abstractmethod
    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and features of one batch no larger than max_batch_size (fp32, CPU)."""

    def check_batch(self, batch: torch.Tensor) -> None:
        """Raise ValueError naming what is wrong with `batch` (type, rank, shape, dtype)."""
        size = self.config.image_size
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"batch must be a torch.Tensor, not {type(batch).__name__}")
        if batch.dim() != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (size, size):
            raise ValueError(
                f"batch has shape {tuple(batch.shape)}, expected (N, 3, {size}, {size})"
            )
        if batch.dtype != torch.float32:
            raise ValueError(f"batch has dtype {batch.dtype}, expected torch.float32")

    def describe(self) -> dict[str, object]:
        """What ran: backend, precision, device, batch size, model (for logs and metadata)."""
        described: dict[str, object] = {
            "backend": self.name,
            "precision": self.precision,
            "device": self.device,
            "preferred_batch_size": self.preferred_batch_size,
            "model": self.model_name,
            "sha256": self.sha256,
        }
        if self.precision == "int8" and self.int8_engine:
            described["int8_engine"] = self.int8_engine
        if self.auto_decision is not None:
            described["auto"] = self.auto_decision
        return described

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model_name!r}, precision={self.precision!r}, "
            f"device={self.device!r})"
        )
