"""Measurement kernels of `mixer-label bench`: timing, GEMM peaks, agreement, memory.

Small functions with no policy, each tested on the tiny preset; bench/model_bench.py decides what
to run and prints it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.backends import auto_measure
from models.backends.calibration import synthetic_images
from models.presets import timm_name


@dataclass
class Timing:
    """Latencies of repeated runs of one batch."""

    batch_size: int
    latencies_s: list[float]

    @property
    def images_per_s(self) -> float:
        """Throughput at the median latency (robust to a few slow runs)."""
        return self.batch_size / statistics.median(self.latencies_s)

    @property
    def best_images_per_s(self) -> float:
        return self.batch_size / min(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1e3 * ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def to_dict(self) -> dict[str, float]:
        return {
            "batch_size": self.batch_size,
            "runs": len(self.latencies_s),
            "images_per_s": self.images_per_s,
            "best_images_per_s": self.best_images_per_s,
            "p50_ms": self.percentile_ms(0.5),
            "p90_ms": self.percentile_ms(0.9),
        }


def time_batches(
    run: Callable[[], object],
    batch_size: int,
    seconds: float,
    min_runs: int = 3,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Call `run` (one batch) `warmup` times, then for `seconds` (at least `min_runs` times)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        run()
    sync()
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        sync()
        latencies.append(time.perf_counter() - t)
    return Timing(batch_size, latencies)


def gemm_rate(
    kind: str, m: int, k: int, n: int, seconds: float = 1.0, device: str = "cpu"
) -> float:
    """GFLOP/s of an (m x k) @ (k x n) GEMM with bias, as the model runs it, best of short runs.

    fp32/bf16/fp16: a Linear at that dtype (oneDNN / cuBLAS). int8 on CPU: the faster of
    oneDNN's static int8 GEMM (uint8 activations, prepacked per-channel int8 weights, uint8
    out: what the static int8 predictor runs, 1.5x to 5x the dynamic one on an AMX Xeon) and
    a dynamically quantized Linear (activation quantization included). int8 on CUDA:
    torch._int_mm.
    """
    from models.backends.torch_helpers import quantize_linears

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator)
    linear = torch.nn.Linear(k, n)
    if kind == "int8" and device == "cpu":
        dynamic = quantize_linears(torch.nn.Sequential(linear)).eval()
        rates = [_rate(lambda: dynamic(x), m * k * n, seconds, None)]
        static = static_int8_gemm(m, k, n)
        if static is not None:
            rates.append(_rate(static, m * k * n, seconds, None))
        return max(rates)
    if kind == "fp8":  # e4m3 as Fp8Linear calls it (CUDA >= 8.9), padded to its alignment
        return _fp8_rate(m, k, n, seconds, device)
    if kind == "int8":
        x = torch.randint(-127, 127, (m, k), dtype=torch.int8, device=device)
        w = torch.randint(-127, 127, (k, n), dtype=torch.int8, device=device)
        fn = lambda _: torch._int_mm(x, w)  # noqa: E731
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
        x = x.to(device, dtype)
        fn = linear.to(device, dtype).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return _rate(lambda: fn(x), m * k * n, seconds, sync)


def _fp8_rate(m: int, k: int, n: int, seconds: float, device: str) -> float:
    """GFLOP/s of `torch._scaled_mm` on e4m3 operands: rowwise scales, bf16 bias and output."""
    from models.backends.torch_fp8 import E4M3, padded

    kp, np_ = padded(k), padded(n)  # the zero padding Fp8Linear adds; counted as no work
    a = torch.randn(m, kp, device=device).to(E4M3)
    b = torch.randn(np_, kp, device=device).to(E4M3).t()  # column-major, as the op wants
    scale_a, scale_b = torch.ones(m, 1, device=device), torch.ones(1, np_, device=device)
    bias = torch.zeros(np_, device=device, dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a, scale_b, bias=bias, out_dtype=torch.bfloat16)

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return _rate(run, m * k * n, seconds, sync)


def _rate(run: Callable[[], object], macs: int, seconds: float, sync) -> float:
    """GFLOP/s of `run` (`macs` multiply-adds), best of five short rounds."""
    with torch.inference_mode():
        rounds = [time_batches(run, 1, seconds / 5, 2, 1, sync) for _ in range(5)]
    best = min(min(r.latencies_s) for r in rounds)
    return 2 * macs / best / 1e9


def static_int8_gemm(m: int, k: int, n: int) -> Callable[[], torch.Tensor] | None:
    """oneDNN's static int8 GEMM with bias on random data, or None where torch lacks it."""
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is None or not hasattr(onednn, "qlinear_pointwise"):
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=generator)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    w_scale, w_zero = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.int64)
    bias = torch.randn(n, generator=generator)
    try:
        packed = onednn.qlinear_prepack(w, [m, k])
    except (RuntimeError, NotImplementedError):  # a torch built without oneDNN's int8
        return None

    def run() -> torch.Tensor:
        # (x - 128) * 0.02 @ (w * 0.01).T + bias, requantized to uint8 (scale 0.05, zero 128)
        return onednn.qlinear_pointwise(
            x, 0.02, 128, packed, w_scale, w_zero, bias, 0.05, 128, None, "none", [], ""
        )

    return run


def gemm_peaks(
    config, batch_sizes: Sequence[int], kinds: Sequence[str], seconds: float, device: str
) -> dict[str, dict[str, float]]:
    """{kind: {"M x K x N": GFLOP/s}} on the channel MLP's GEMM for each batch size."""
    peaks: dict[str, dict[str, float]] = {}
    for kind in kinds:
        for batch in batch_sizes:
            m, k, n = batch * config.num_tokens, config.hidden_dim, config.channels_mlp_dim
            try:
                rate = gemm_rate(kind, m, k, n, seconds, device)
            except (RuntimeError, NotImplementedError) as err:
                print(f"  GEMM {kind}: not measured ({str(err).splitlines()[0][:80]})")
                continue
            peaks.setdefault(kind, {})[f"{m}x{k}x{n}"] = rate
    return peaks


def model_gemms(config, batch: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, calls per batch) of every GEMM the model runs on `batch` images.

    Their multiply-adds sum to `config.macs_per_image()` per image (the stem as the GEMM over
    flattened patches it is).
    """
    s, c, blocks = config.num_tokens, config.hidden_dim, config.num_blocks
    d_s, d_c = config.tokens_mlp_dim, config.channels_mlp_dim
    return [
        ("stem", batch * s, 3 * config.patch_size**2, c, 1),
        ("token fc1", batch * c, s, d_s, blocks),
        ("token fc2", batch * c, d_s, s, blocks),
        ("channel fc1", batch * s, c, d_c, blocks),
        ("channel fc2", batch * s, d_c, c, blocks),
        ("head", batch, c, config.num_classes, 1),
    ]


def gemm_ceiling(config, batch: int, kind: str, seconds: float, device: str) -> dict:
    """Images/s of the model's GEMMs alone, each shape timed with `kind`'s kernel.

    The hardware limit prices every FLOP at the rate of the largest GEMM; the model's other
    GEMMs (the token MLP's K = tokens, the stem, the head) run slower than that. This is
    what a predictor would reach if norms, GELUs, residuals and quantization were free: the
    part of the limit that the GEMM library leaves reachable at all.
    """
    seconds_per_batch = 0.0
    gemms = []
    for name, m, k, n, calls in model_gemms(config, batch):
        rate = gemm_rate(kind, m, k, n, seconds, device)
        seconds_per_batch += calls * 2 * m * k * n / (rate * 1e9)
        gemms.append({"name": name, "shape": f"{m}x{k}x{n}", "calls": calls, "gflops": rate})
    return {
        "kind": kind,
        "batch_size": batch,
        "images_per_s": batch / seconds_per_batch,
        "gemms": gemms,
    }


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, max softmax probability difference and logits cosine vs `reference`.

    `top1_agreement` is auto's (models.backends.auto_measure: a class fp32 has not decided
    against counts), so the table's faithful rows are the ones auto could pick;
    `top1_exact` is the plain argmax match, `decided_images` how many images fp32 decided.
    """
    reference, logits = reference.float(), logits.float()
    cosine = F.cosine_similarity(logits, reference, dim=1)
    prob_diff = (torch.softmax(logits, 1) - torch.softmax(reference, 1)).abs().max()
    return {
        "top1_agreement": auto_measure.agreement(reference, logits)[0],
        "top1_exact": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
        "decided_images": auto_measure.decided_images(reference),
        "max_prob_diff": float(prob_diff),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


def load_inputs(path: str | Path, size: int) -> torch.Tensor:
    """Normalized (N, 3, size, size) float32 images from a .npy file (no pickles)."""
    import numpy as np

    array = np.load(path, allow_pickle=False)
    if array.ndim != 4 or array.shape[1:] != (3, size, size):
        raise ValueError(f"{path}: shape {array.shape}, expected (N, 3, {size}, {size})")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def predict_all(predict: Callable[[torch.Tensor], torch.Tensor], images, batch: int):
    """`predict` over `images` in batches, concatenated."""
    with torch.inference_mode():
        return torch.cat([predict(images[i : i + batch]) for i in range(0, len(images), batch)])


def repeat_to(images: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` of `images`, repeated as often as needed (a timing batch)."""
    times = -(-count // len(images))
    return images.repeat(times, 1, 1, 1)[:count].contiguous()


def timm_reference_name(config) -> str | None:
    """timm's model with `config`'s geometry at 224 px, if there is one (models.presets)."""
    return timm_name(config)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unknown)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM, which starts afresh at exec.

    getrusage's ru_maxrss would not do: Linux carries it across fork + exec, so a child
    spawned by a big parent reports the parent's size as its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_probe(model_spec: str, backend: str, precision: str, batch_size: int, device: str):
    """Run in a fresh process: peak RSS of loading, creating the predictor and one batch.

    The predictor is created from the spec, as a worker should: create() then owns the fp32
    weights it loaded and frees them once converted.
    """
    from models.backends import create
    from models.mixer import MlpMixer

    torch.zeros(1)  # torch's own allocations belong to the baseline
    baseline = current_rss_bytes()
    predictor = create(model_spec, backend, precision, device, batch_size=batch_size)
    config = predictor.config
    with torch.device("meta"):
        weights = 4 * MlpMixer(config).num_parameters()  # fp32, as loaded
    gc.collect()
    predictor.predict(synthetic_images(batch_size, config.image_size))
    # One batch's largest live activations: the channel MLP's hidden layer and its input.
    act_bytes = (
        4 * batch_size * config.num_tokens * (config.channels_mlp_dim + 2 * config.hidden_dim)
    )
    described = predictor.describe()
    return {
        "backend": described["backend"],
        "precision": described["precision"],
        "batch_size": batch_size,
        "weights_mb": weights / 2**20,
        "activations_mb": act_bytes / 2**20,
        "peak_mb": (peak_rss_bytes() - baseline) / 2**20,
        "after_mb": (current_rss_bytes() - baseline) / 2**20,
        "baseline_mb": baseline / 2**20,
        # AOT packages: "built" (compiled in a child process), "local" or "store" (cached)
        "package": (getattr(predictor, "aot_info", None) or {}).get("source"),
    }


def memory_in_fresh_process(*args) -> dict[str, float]:
    """`memory_probe(*args)` in a spawned process, so nothing measured before counts."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(memory_probe, args)
