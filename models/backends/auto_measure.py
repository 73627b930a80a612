"""`auto` by measurement: the fastest candidate that keeps fp32's labels, decided once per machine.

Rules about CPU flags go stale with every new CPU, so `create(backend="auto",
precision="auto")` measures instead:

1. The candidates are what this hardware runs natively (auto.candidates: nothing emulated,
   nothing that cannot import here), fp32 always among them as the reference.
2. Each is created and checked against fp32 on a calibration set (real images where the
   checkpoint ships them, `calibration.npy` beside it; else the synthetic set of
   calibration.py): top-1 agreement >= TOP1_MIN and minimum logits cosine >= COSINE_MIN. A
   class counts as fp32's label when fp32 gives it a probability within TIE_PROB of its top
   one: fp32 has not decided between such classes, so a candidate may pick either. A trained
   model on real images decides nearly every image, and its labels are checked strictly; a
   random-weight preset spreads its probability evenly over its classes (about 0.002 each of
   1000 for S/32) and decides none, so there the cosine check is what rejects a candidate.
3. Each is timed at the run's batch size, on the check pass's own full batches (more only
   where there are too few); the fastest that passes wins.

The decision is cached under a key of everything it depends on (`decision_facts`: CPU model
and flags or GPU name and compute capability, usable cores, torch / torchao / TensorRT /
onnxruntime versions, the model's sha256, batch size, compile setting) as a small JSON file,
locally beside the compiled packages and in the compile cache (`cache_store`), so a cluster
measures once per kind of machine and every other worker reads it. An explicit backend or
precision never measures.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from models.backends.auto import Choice
from models.backends.base import BackendError, Predictor
from models.backends.cache import CacheStore, LocalCacheStore, file_lock
from models.backends.calibration import calibration_files, calibration_images
from models.backends.hardware import CpuInfo, GpuInfo, Runtimes
from models.mixer import MlpMixer

log = logging.getLogger(__name__)
TOP1_MIN = 0.99
COSINE_MIN = 0.99
TIE_PROB = 0.01  # classes within this probability of fp32's top one are its label too
CHECK_IMAGES = 100  # synthetic calibration images: one disagreement leaves exactly 99%
TIMED_BATCHES = 3  # at least, after one warm-up batch; the median latency counts
DECISION_FORMAT = 2  # bump when what a decision means changes


@dataclass
class Measurement:
    """One candidate as measured: speed and agreement with fp32, or why it could not run."""

    backend: str
    precision: str
    images_per_s: float = 0.0
    top1_agreement: float = 0.0
    min_cosine: float = 0.0
    decided_images: int | None = None  # images where fp32's label is one class (see TIE_PROB)
    build_s: float = 0.0  # creating the predictor (quantizing, compiling, loading a package)
    check_s: float = 0.0  # the check pass and timing: what measuring adds to building
    error: str | None = None
    engine: str | None = None  # int8: which quantized path ran (static or dynamic)

    @property
    def passed(self) -> bool:
        return (
            self.error is None and self.top1_agreement >= TOP1_MIN and self.min_cosine >= COSINE_MIN
        )

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        for name in ("images_per_s", "top1_agreement", "min_cosine"):
            data[name] = round(float(data[name]), 4)
        for name in ("build_s", "check_s"):
            data[name] = round(float(data[name]), 1)
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Decision:
    """What auto chose, the measurements it chose by, and where the decision came from."""

    backend: str
    precision: str
    device: str
    measurements: list[Measurement]
    key: str
    calibration: str  # "synthetic (N images)" or the file the images came from
    measured_at: str
    source: str = "measured"  # "measured", or the cache it was read from: "local", "store"
    seconds: float = 0.0  # measuring, or reading the cached decision
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def choice(self) -> Choice:
        return Choice(self.backend, self.precision, self.device, self.reason)

    @property
    def reason(self) -> str:
        parts = [
            f"{m.backend} {m.precision} {m.images_per_s:.1f} img/s"
            + ("" if m.passed else " (failed agreement)" if m.error is None else " (failed)")
            for m in self.measurements
        ]
        return f"measured ({self.source}): fastest faithful of " + ", ".join(parts)

    def summary(self) -> dict[str, object]:
        """The small form carried into describe(), _SUCCESS.json and the Prefect summary."""
        return {
            "chose": f"{self.backend} {self.precision}",
            "source": self.source,
            "calibration": self.calibration,
            "measured_at": self.measured_at,
            "seconds": round(self.seconds, 1),
            "candidates": [m.to_dict() for m in self.measurements],
        }

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["measurements"] = [m.to_dict() for m in self.measurements]
        del data["source"], data["seconds"]
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> Decision:
        data = json.loads(raw)
        data["measurements"] = [Measurement.from_dict(m) for m in data["measurements"]]
        return cls(**data, source=source)


def pick(measurements: list[Measurement]) -> Measurement | None:
    """The fastest measurement that passed the agreement check; None if none did."""
    passing = [m for m in measurements if m.passed]
    return max(passing, key=lambda m: m.images_per_s) if passing else None


def decision_facts(
    device: str,
    cpu: CpuInfo,
    gpu: GpuInfo | None,
    runtimes: Runtimes,
    model_sha256: str,
    batch_size: int,
    settings: dict[str, object],
) -> dict[str, object]:
    """Everything a measured decision depends on: a different value measures again."""
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    facts: dict[str, object] = {
        "format": DECISION_FORMAT,
        "device": device.partition(":")[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torchao": runtimes.torchao,
        "tensorrt": runtimes.tensorrt,
        "onnxruntime": version("onnxruntime") if runtimes.onnxruntime_providers else None,
        "compiler": runtimes.compiler,
        "model_sha256": model_sha256,
        "batch_size": batch_size,
        "settings": settings,
        "thresholds": [TOP1_MIN, COSINE_MIN, TIE_PROB],
    }
    if gpu is not None and device.startswith("cuda"):
        facts["gpu"] = {"name": gpu.name, "capability": list(gpu.capability)}
    else:
        facts["cpu"] = {
            "model": cpu.model_name,
            "flags": sorted(cpu.flags),
            "capability": cpu.capability,
            "cpus": cpu.cpus,
            "isa_cap": cpu.isa_cap,
        }
    return facts


def decision_key(facts: dict[str, object]) -> str:
    """A plain file name for the decision under these facts."""
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return f"auto-{facts['device']}-b{facts['batch_size']}-{digest[:32]}.json"


def cached_decision(key: str, local: LocalCacheStore, store: CacheStore | None):
    """A decision cached under `key` (local folder first, then the shared store), or None."""
    for source, cache in (("local", local), ("store", store)):
        raw = cache.get(key) if cache is not None else None
        if raw is None:
            continue
        try:
            decision = Decision.from_json(raw, source)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("cached auto decision %s is unreadable (%s); measuring again", key, err)
            continue
        if source == "store":
            local.put(key, raw)  # the next process on this machine reads it locally
        return decision
    return None


# A measurer: (choice) -> (its Measurement, its predictor or None). Tests inject their own.
Measurer = Callable[[Choice], tuple[Measurement, Predictor | None]]


def decide(
    candidates: list[Choice],
    facts: dict[str, object],
    local: LocalCacheStore,
    store: CacheStore | None,
    measure: Measurer,
    calibration: str,
) -> tuple[Decision, Predictor | None]:
    """The cached decision for `facts`, else measure every candidate and cache the result.

    Returns the decision and, when it was just measured, the winner's predictor (so it is
    not created twice); a cached decision returns None there.
    """
    key = decision_key(facts)
    start = time.perf_counter()
    found = cached_decision(key, local, store)
    if found is None:
        # Actors starting together on one machine measure once: the others wait, then read
        # it (side by side they would also disturb each other's timings).
        with file_lock(local.path(key)):
            found = cached_decision(key, local, None)
            if found is None:
                return _measure_all(candidates, facts, key, local, store, measure, calibration)
    found.seconds = time.perf_counter() - start
    log.info(
        "auto: %s %s from the %s cache (%s)", found.backend, found.precision, found.source, key
    )
    return found, None


def _measure_all(candidates, facts, key, local, store, measure, calibration):
    """Measure every candidate, pick, cache the decision: (decision, the winner's predictor)."""
    start = time.perf_counter()
    measurements, predictors = [], {}
    for choice in candidates:
        measurement, predictor = measure(choice)
        measurements.append(measurement)
        best = pick(measurements)
        # Keep only the best so far: B/16 predictors are hundreds of MB each.
        if predictor is not None and best is measurement:
            predictors = {(choice.backend, choice.precision): predictor}
        del predictor
        log.info("auto: measured %s", measurement.to_dict())
    winner = pick(measurements)
    if winner is None:
        errors = "; ".join(
            f"{m.backend} {m.precision}: {m.error or 'agreement'}" for m in measurements
        )
        raise BackendError(f"auto: no candidate could run faithfully here ({errors})")
    device = candidates[0].device
    decision = Decision(
        winner.backend,
        winner.precision,
        device,
        measurements,
        key,
        calibration,
        dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        facts=facts,
    )
    decision.seconds = time.perf_counter() - start
    raw = decision.to_json()
    local.put(key, raw)
    if store is not None:
        try:
            store.put(key, raw)
        except Exception as err:  # a read-only or unreachable shared cache: still decided here
            log.warning("auto: could not share the decision in the compile cache: %s", err)
    return decision, predictors.get((winner.backend, winner.precision))


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, minimum logits cosine) of `logits` against fp32's `reference`.

    The candidate's class agrees when fp32 gives it a probability within TIE_PROB of fp32's
    top class: between such classes fp32 itself has not decided.
    """
    reference, logits = reference.float(), logits.float()
    probs = reference.softmax(dim=1)
    chosen = logits.argmax(1, keepdim=True)
    lead = probs.max(dim=1).values - probs.gather(1, chosen).squeeze(1)
    agrees = lead < TIE_PROB
    cosine = F.cosine_similarity(logits, reference, dim=1)
    return float(agrees.float().mean()), float(cosine.min())


def decided_images(reference: torch.Tensor) -> int:
    """How many images fp32 gives one label: its top probability leads the next by TIE_PROB."""
    if reference.shape[1] < 2:
        return len(reference)
    top2 = reference.float().softmax(dim=1).topk(2, dim=1).values
    return int(((top2[:, 0] - top2[:, 1]) >= TIE_PROB).sum())


def check_images(model: MlpMixer, checkpoint: Path | None) -> tuple[torch.Tensor, str]:
    """The calibration set: `calibration.npy` beside the checkpoint, else synthetic images."""
    if checkpoint is not None:
        for name in calibration_files(checkpoint.name):
            path = checkpoint.with_name(name)
            if path.is_file():
                import numpy as np

                size = model.config.image_size
                array = np.load(path, allow_pickle=False)
                if array.ndim == 4 and array.shape[1:] == (3, size, size):
                    return torch.from_numpy(np.ascontiguousarray(array, np.float32)), path.name
                log.warning(
                    "%s has shape %s, not (N, 3, %d, %d): synthetic images instead",
                    path,
                    array.shape,
                    size,
                    size,
                )
    images = calibration_images(model.config, CHECK_IMAGES, seed=7)
    return images, f"synthetic ({len(images)} images)"


def measurer(
    model: MlpMixer,
    images: torch.Tensor,
    batch_size: int,
    build: Callable[[Choice], Predictor],
) -> Measurer:
    """The real measurer: build each candidate, compare with fp32, time its batches.

    The check images go through in batches of the run's size, and the full ones after the
    first (a warm-up) are the timing, so measuring costs one pass over the check set per
    candidate; only where that gives fewer than TIMED_BATCHES are more batches run.
    """
    reference: dict[str, torch.Tensor] = {}

    def timed(predictor: Predictor, batch: torch.Tensor, latencies: list[float]) -> torch.Tensor:
        t = time.perf_counter()
        logits = predictor.predict(batch)
        if len(batch) == batch_size:
            latencies.append(time.perf_counter() - t)
        return logits

    def measure(choice: Choice) -> tuple[Measurement, Predictor | None]:
        result = Measurement(choice.backend, choice.precision)
        start = time.perf_counter()
        try:
            predictor = build(choice)
        except (BackendError, RuntimeError, ValueError) as err:
            result.error = str(err).splitlines()[0][:200]
            return result, None
        finally:
            result.build_s = time.perf_counter() - start
        start = time.perf_counter()
        result.engine = predictor.int8_engine
        latencies: list[float] = []
        with torch.inference_mode():
            logits = torch.cat(
                [
                    timed(predictor, images[i : i + batch_size], latencies)
                    for i in range(0, len(images), batch_size)
                ]
            )
            warmed = bool(latencies)
            latencies = latencies[1:]  # the first full batch warmed up (compiled, allocated)
            if len(latencies) < TIMED_BATCHES:
                repeats = -(-batch_size // len(images))
                batch = images.repeat(repeats, 1, 1, 1)[:batch_size].contiguous()
                if not warmed:
                    predictor.predict(batch)
                while len(latencies) < TIMED_BATCHES:
                    timed(predictor, batch, latencies)
            if "logits" not in reference:  # fp32 comes first; without it, the eager model
                if choice.precision == "fp32":
                    reference["logits"] = logits
                else:
                    reference["logits"] = torch.cat(
                        [model(images[i : i + 16]) for i in range(0, len(images), 16)]
                    )
        result.top1_agreement, result.min_cosine = agreement(reference["logits"], logits)
        result.decided_images = decided_images(reference["logits"])
        result.images_per_s = batch_size / statistics.median(latencies)
        result.check_s = time.perf_counter() - start
        return result, predictor

    return measure
