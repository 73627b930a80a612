"""Making one predictor for a resolved choice: the backend's class and the options it takes."""

from __future__ import annotations

import inspect

from models.backends.auto import Choice
from models.backends.base import Predictor
from models.mixer import MlpMixer

OPTIONS = {
    "batch_size",
    "threads",
    "compile",
    "cuda_graphs",
    "cache_dir",
    "cache_store",
    "max_batch_size",
    "workspace_gib",
}


def check_options(options: dict[str, object]) -> None:
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown predictor option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")


def predictor_class(backend: str) -> type[Predictor]:
    """The Predictor subclass of `backend` (imported only when asked for)."""
    if backend == "torch":
        from models.backends.torch_backend import TorchPredictor

        return TorchPredictor
    if backend == "onnxruntime":
        from models.backends.onnxruntime_backend import OnnxRuntimePredictor

        return OnnxRuntimePredictor
    from models.backends.tensorrt_backend import TensorRTPredictor

    return TensorRTPredictor


def make_predictor(
    model: MlpMixer, choice: Choice, options: dict[str, object], owned: bool = False
) -> Predictor:
    """`choice`'s predictor of `model`; `owned`: nobody else holds `model`'s fp32 weights.

    Options are shared across backends (a caller sets cache_dir once); each takes its own.
    """
    cls = predictor_class(choice.backend)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    if owned and "release_source" in accepted:
        kwargs["release_source"] = True  # free the fp32 weights once converted
    predictor = cls(model, choice.precision, choice.device, **kwargs)
    predictor.choice = choice
    return predictor
