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

from models.backends.auto import (
    Choice,
    backends_present,
    candidates,
    choose,
    resolve_device,
    static_int8_runs,
)
from models.backends.base import PRECISIONS, BackendError, Predictor
from models.backends.cache import CacheStore, LocalCacheStore
from models.backends.factory import OPTIONS, check_options, make_predictor
from models.backends.hardware import cpu_info, gpu_info, runtimes
from models.backends.torch_helpers import configure_threads
from models.mixer import MlpMixer
from models.names import BACKENDS

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

    backend="auto" with precision="auto" is decided by measurement, once per kind of machine
    (auto_measure.py: the fastest candidate that keeps fp32's labels; the decision is cached
    beside the compiled packages and in `cache_store`). An explicit backend or precision
    skips measuring: the rest resolves by the rule in auto.py. `options` go to the backend:
    batch_size (all), threads (torch, onnxruntime), compile and cuda_graphs (torch),
    cache_dir (onnxruntime, tensorrt), cache_store, max_batch_size, workspace_gib (tensorrt).
    """
    owned = not isinstance(model, MlpMixer)
    spec = model
    if owned:
        from models.checkpoints import resolve_model

        model = resolve_model(model)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(
            f"precision must be 'auto' or one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    check_options(options)
    if backend == "auto" and precision == "auto":
        checkpoint = Path(spec) if owned and Path(spec).is_file() else None
        return _measured(model, resolve_device(device), options, owned, checkpoint)
    choice = choose(backend, precision, device, gflop=2 * model.config.macs_per_image() / 1e9)
    log.info(
        "predictor %s: %s %s on %s (%s)",
        model.name,
        choice.backend,
        choice.precision,
        choice.device,
        choice.reason,
    )
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


def _measured(
    model: MlpMixer,
    device: str,
    options: dict[str, object],
    owned: bool,
    checkpoint: Path | None,
) -> Predictor:
    """create() for backend = precision = "auto": the measured (or cached) decision's predictor."""
    import torch

    from models.backends.auto_measure import check_images, decide, decision_facts, measurer
    from models.backends.cache import default_cache_dir
    from models.backends.tensorrt_backend import PRECISIONS as TENSORRT
    from models.backends.torch_backend import CPU_PRECISIONS, CUDA_PRECISIONS

    on_gpu = device.startswith("cuda")
    cpu = cpu_info()
    gpu = gpu_info(int(device.partition(":")[2] or 0)) if on_gpu else None
    present = runtimes(device)
    available = backends_present(device, present)
    gflop = 2 * model.config.macs_per_image() / 1e9
    static_int8 = static_int8_runs(cpu, present, gflop)
    runs = {"torch": CUDA_PRECISIONS if on_gpu else CPU_PRECISIONS, "tensorrt": TENSORRT}
    found = candidates(device, available, cpu, gpu, static_int8, runs)
    batch_size = int(options.get("batch_size") or (256 if on_gpu else 16))
    if not on_gpu:
        configure_threads(options.get("threads"))  # the threads the measurement runs with
    settings = {"compile": str(options.get("compile")), "threads": torch.get_num_threads()}
    sha256 = model.sha256 or model.weights_sha256()
    facts = decision_facts(device, cpu, gpu, present, sha256, batch_size, settings)
    folder = Path(str(options.get("cache_dir") or default_cache_dir())) / "auto"
    store = options.get("cache_store")
    images, calibration = check_images(model, checkpoint)
    # While measuring, every candidate is built from the same weights: none may free them.
    measure = measurer(
        model, images, batch_size, lambda choice: make_predictor(model, choice, options)
    )
    decision, predictor = decide(found, facts, LocalCacheStore(folder), store, measure, calibration)
    log.info("predictor %s: auto %s", model.name, decision.reason)
    if predictor is None:  # a cached decision: build only its winner
        predictor = make_predictor(model, decision.choice, options, owned)
    predictor.choice = decision.choice
    predictor.auto_decision = decision.summary()
    return predictor
