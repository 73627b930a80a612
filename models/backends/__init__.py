"""Fast predictors behind one interface: `create(model, backend, precision, device)`.

    predictor = create("B/16")                  # the fastest this machine has (auto.py)
    logits = predictor.predict(batch)           # NCHW float32, normalized -> fp32 logits (CPU)
    logits, features = predictor.predict_with_features(batch)

Backends, one file each: torch (CPU fp32/bf16/int8, CUDA fp32/bf16/fp16/fp8), onnxruntime
(CPU fp32, CUDA fp32/fp16), tensorrt (CUDA fp32/fp16/bf16).
"""

from __future__ import annotations

import logging
from pathlib import Path

from models.backends.auto import Choice, backends_present, choose, resolve_device
from models.backends.base import PRECISIONS, BackendError, Predictor
from models.backends.cache import CacheStore, LocalCacheStore
from models.backends.factory import OPTIONS, check_options, make_predictor
from models.backends.hardware import cpu_info, runtimes
from models.mixer import MlpMixer

BACKENDS = ("torch", "onnxruntime", "tensorrt")
log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "OPTIONS",
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
    device = resolve_device(device)
    return backends_present(device, runtimes(device))


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
    check_options(options)
    predictor = make_predictor(model, choice, options, owned)
    static_expected = cpu_info().native_bf16  # else the rule chose dynamic int8
    weights_left = not model.stem.weight.is_meta
    if precision == "auto" and predictor.int8_dynamic and static_expected and weights_left:
        # auto chose int8 for its static path; dynamically quantized it runs slower than
        # native bf16, so take bf16 (the rule's next choice on every CPU with AMX int8).
        reason = f"{choice.reason}; static int8 unavailable, bf16 instead"
        fallback = Choice(choice.backend, "bf16", choice.device, reason)
        try:
            predictor = make_predictor(model, fallback, options, owned)
        except BackendError as err:
            log.warning("static int8 unavailable, and bf16 failed too (%s): dynamic int8", err)
        else:
            log.warning("static int8 unavailable (see above): auto falls back to bf16")
    return predictor
