"""Fast predictors behind one interface: `create(model, backend, precision, device)`.

    predictor = create("B/16")                  # the fastest this machine has (auto.py)
    logits = predictor.predict(batch)           # NCHW float32, normalized -> fp32 logits (CPU)
    logits, features = predictor.predict_with_features(batch)

Backends, one file each: torch (CPU fp32/bf16/int8, CUDA fp32/bf16/fp16), onnxruntime
(CPU fp32, CUDA fp32/fp16), tensorrt (CUDA fp32/fp16/bf16).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from models.backends.auto import Choice, choose
from models.backends.base import PRECISIONS, BackendError, Predictor
from models.backends.cache import CacheStore, LocalCacheStore
from models.mixer import MlpMixer

BACKENDS = ("torch", "onnxruntime", "tensorrt")
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
log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "BackendError",
    "CacheStore",
    "Choice",
    "LocalCacheStore",
    "Predictor",
    "available_backends",
    "choose",
    "create",
]


def available_backends(device: str = "cpu") -> tuple[str, ...]:
    """The backends that can run on `device` in this install, in order of preference."""
    from models.backends.onnxruntime_backend import providers_available

    on_gpu = device.startswith("cuda")
    found = ["torch"]
    providers = providers_available()
    if ("CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider") in providers:
        found.append("onnxruntime")
    if on_gpu:
        from models.backends.tensorrt_backend import import_tensorrt

        try:
            import_tensorrt()
            found.append("tensorrt")
        except BackendError:
            pass
    return tuple(found)


def create(
    model: MlpMixer | str | Path,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    **options: object,
) -> Predictor:
    """A predictor for `model` (an MlpMixer, a checkpoint path or a preset name).

    "auto" resolves by the rule in models/backends/auto.py. `options` go to the backend:
    batch_size (all), threads (torch, onnxruntime), compile and cuda_graphs (torch),
    cache_dir (onnxruntime, tensorrt), cache_store, max_batch_size, workspace_gib (tensorrt).
    """
    owned = not isinstance(model, MlpMixer)
    if owned:
        from models.checkpoints import resolve_model

        model = resolve_model(model)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(
            f"precision must be 'auto' or one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    choice = choose(backend, precision, device, gflop=2 * model.config.macs_per_image() / 1e9)
    log.info(
        "predictor %s: %s %s on %s (%s)",
        model.name,
        choice.backend,
        choice.precision,
        choice.device,
        choice.reason,
    )
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown predictor option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    if choice.backend == "torch":
        from models.backends.torch_backend import TorchPredictor as cls
    elif choice.backend == "onnxruntime":
        from models.backends.onnxruntime_backend import OnnxRuntimePredictor as cls
    else:
        from models.backends.tensorrt_backend import TensorRTPredictor as cls
    # Options are shared across backends (a caller sets cache_dir once); each takes its own.
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    if owned and "release_source" in accepted:
        kwargs["release_source"] = True  # nobody else holds the fp32 weights loaded here
    predictor = cls(model, choice.precision, choice.device, **kwargs)
    if precision == "auto" and _dynamic_int8(predictor) and not model.stem.weight.is_meta:
        # auto chose int8 for its static path; dynamically quantized it runs about a third of
        # bf16's speed, so take bf16 (the rule's next choice on every CPU with AMX int8).
        try:
            fallback = cls(model, "bf16", choice.device, **kwargs)
        except BackendError as err:
            log.warning("static int8 unavailable, and bf16 failed too (%s): dynamic int8", err)
        else:
            log.warning("static int8 unavailable (see above): auto falls back to bf16")
            reason = f"{choice.reason}; static int8 unavailable, bf16 instead"
            choice = Choice(choice.backend, "bf16", choice.device, reason)
            predictor = fallback
    predictor.choice = choice
    return predictor


def _dynamic_int8(predictor: Predictor) -> bool:
    return str(getattr(predictor, "int8_engine", "")).startswith("dynamic")
