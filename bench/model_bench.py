"""`mixer-label bench`: model-only speed of every backend and precision, against the hardware.

One run measures, on the same inputs and the same threads:
- the GEMM peak of this machine (fp32, bf16, int8: the faster of oneDNN's static int8 GEMM
  and a dynamically quantized Linear; on a GPU fp32, bf16, fp16) on the model's own largest
  GEMM, the channel MLP's (batch * tokens) x C x D_C;
  the hardware limit in images/s is the best of those rates / FLOPs per image;
- the GEMM-only ceiling: every GEMM of the model (stem, token and channel MLPs, head) timed
  alone at the limit's precision and batch, summed: what the GEMM library leaves reachable
  if everything else were free (the token MLP's small K runs well below the largest GEMM);
- each predictor's throughput (images/s from the median batch latency) and latency, also as
  % of that limit, and the time to create it (export, compile, engine build);
- timm's eager fp32 model of the same geometry (mixer_b16_224 for B/16) as the reference
  (on a GPU also its eager bf16 autocast, AMP);
- top-1 agreement, max softmax probability difference and logits cosine of every predictor
  against the paper-exact fp32 model on a fixed set of inputs;
- peak resident memory of a fresh process that loads the weights, creates the `auto`
  predictor and runs one batch, against the weights' size.
Output: a markdown table on stdout, and everything as JSON with --json.
"""

from __future__ import annotations

import datetime as dt
import gc
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

# --- the run -----------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    model: str = "B/16"
    backends: tuple[str, ...] = ("auto", "torch", "onnxruntime")
    precisions: tuple[str, ...] = ("fp32", "bf16", "int8", "fp16")
    batch_sizes: tuple[int, ...] = ()  # () -> each predictor's preferred batch size
    seconds: float = 5.0
    device: str = "auto"
    threads: int | None = None
    agreement_images: int = 64
    inputs: str | None = None  # .npy of real, normalized images for the agreement check
    gemm: bool = True
    timm: bool = True
    memory: bool = True
    cache_dir: str | None = None
    compile: bool | str | None = None  # torch: None = its rule; True, False, "aot", "jit"
    command: str = ""
    notes: list[str] = field(default_factory=list)


def configurations(options: BenchOptions, device: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs to run: ("auto", "auto") first (create() measures its
    candidates, or reads its cached decision), then each valid explicit pair once."""
    from models.backends import available_backends
    from models.backends.onnxruntime_backend import PRECISIONS as ORT
    from models.backends.tensorrt_backend import PRECISIONS as TRT
    from models.backends.torch_backend import CPU_PRECISIONS, CUDA_PRECISIONS

    on_gpu = device.startswith("cuda")
    valid = {
        "torch": CUDA_PRECISIONS if on_gpu else CPU_PRECISIONS,
        "onnxruntime": ORT["cuda" if on_gpu else "cpu"],
        "tensorrt": TRT if on_gpu else (),
    }
    present = available_backends(device)
    pairs: list[tuple[str, str]] = []
    if "auto" in options.backends:
        pairs.append(("auto", "auto"))
    for backend in options.backends:
        if backend == "auto":
            continue
        if backend not in present:
            options.notes.append(f"{backend}: not available on {device} here")
            continue
        for precision in options.precisions:
            if precision in valid[backend] and (backend, precision) not in pairs:
                pairs.append((backend, precision))
    return pairs


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Everything the module docstring lists, as one JSON-ready dict."""
    import torch

    from bench.measure import (
        gemm_ceiling,
        gemm_peaks,
        load_inputs,
        memory_in_fresh_process,
        predict_all,
        synthetic_images,
    )
    from models.backends import BackendError
    from models.backends.auto import resolve_device
    from models.backends.auto_measure import TIE_PROB, decided_images
    from models.backends.hardware import cpu_info, gpu_info
    from models.backends.torch_helpers import configure_threads
    from models.checkpoints import resolve_model

    device = resolve_device(options.device)
    on_gpu = device.startswith("cuda")
    threads = torch.get_num_threads() if on_gpu else configure_threads(options.threads)
    model = resolve_model(options.model).eval()
    config = model.config
    flops = 2 * config.macs_per_image()
    gpu = gpu_info(torch.device(device).index or 0) if on_gpu else None
    report: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": options.command,
        "machine": {
            "cpu": cpu_info().describe(),
            "gpu": gpu.describe() if gpu else None,
            "device": device,
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "spec": options.model,
            "name": model.name,
            "parameters": model.num_parameters(),
            "gflop_per_image": flops / 1e9,
            "weights_mb": model.num_parameters() * 4 / 2**20,
        },
        "notes": options.notes,
    }
    pairs = configurations(options, device)
    log(f"bench {model.name} on {device} ({threads} threads): {pairs}")
    if options.inputs:
        images = load_inputs(options.inputs, config.image_size)
        options.notes.append(f"agreement on {len(images)} images from {options.inputs}")
    else:
        images = synthetic_images(options.agreement_images, config.image_size)
        options.notes.append(f"agreement on {len(images)} synthetic smooth-noise images")
    log(f"fp32 reference on {len(images)} inputs ...")
    reference = predict_all(model, images, 16)
    options.notes.append(
        f"fp32 decided {decided_images(reference)} of {len(images)} agreement images (its top "
        f"probability {100 * TIE_PROB:.0f} points ahead of the next); top-1 agree counts a "
        "class fp32 has not decided against, as auto does (top1_exact in the JSON: plain argmax)"
    )

    results = []
    for backend, precision in pairs:
        for batch_size in options.batch_sizes or (None,):
            try:
                results.append(
                    _bench_predictor(
                        model,
                        backend,
                        precision,
                        device,
                        batch_size,
                        options,
                        images,
                        reference,
                        log,
                    )
                )
                results[-1]["auto"] = (backend, precision) == ("auto", "auto")
            except (BackendError, RuntimeError, ValueError) as err:
                message = str(err).splitlines()[0][:200]
                log(f"  {backend} {precision}: skipped ({message})")
                options.notes.append(f"{backend} {precision}: skipped: {message}")
            gc.collect()
    sizes = sorted({r["batch_size"] for r in results} or {16})
    if options.timm:
        results += _bench_timm(config, images, options, sizes, device, log)

    if options.gemm:
        kinds = ("fp32", "bf16", "fp16") if on_gpu else ("fp32", "bf16", "int8")
        if on_gpu and "fp8" in options.precisions and _fp8_runs(device):
            kinds += ("fp8",)  # the machine's fastest GEMM is the limit, as int8 on the CPU
        log("GEMM peaks ...")
        peaks = gemm_peaks(config, sizes, kinds, 2.0, device)
        report["gemm"] = peaks
        rate, kind, shape = max(
            (r, k, shape) for k, rates in peaks.items() for shape, r in rates.items()
        )
        limit = rate * 1e9 / flops
        report["limit"] = {"gflops": rate, "kind": kind, "images_per_s": limit}
        batch = int(shape.split("x")[0]) // config.num_tokens
        log(f"GEMM-only ceiling ({kind}, batch {batch}) ...")
        ceiling = gemm_ceiling(config, batch, kind, min(1.0, options.seconds), device)
        ceiling["percent_of_limit"] = 100 * ceiling["images_per_s"] / limit
        report["gemm_ceiling"] = ceiling
        for result in results:
            # Best against best: a GEMM peak is a best-of by nature, and on a shared machine
            # the best batch is the one least disturbed by other processes.
            result["percent_of_limit"] = 100 * result["best_images_per_s"] / limit
            result["percent_of_limit_median"] = 100 * result["images_per_s"] / limit
            result["percent_of_gemm_ceiling"] = (
                100 * result["best_images_per_s"] / ceiling["images_per_s"]
            )
    report["results"] = results

    auto = next((r for r in results if r.get("auto")), None)
    if auto is not None:
        report["auto"] = auto.get("auto_decision")
        report["auto_vs_fastest"] = _auto_against_fastest(auto, results)
    if options.memory and auto is not None:
        # The chosen pair explicitly: the probe measures memory, not the choosing.
        backend, precision, batch = auto["backend"], auto["precision"], auto["batch_size"]
        log(f"peak memory of a fresh {backend} {precision} predictor ...")
        report["memory"] = memory_in_fresh_process(options.model, backend, precision, batch, device)
    return report


def _bench_predictor(
    model, backend, precision, device, batch_size, options, images, reference, log
):
    """One result row: create the predictor, check its agreement, time its batches."""
    import torch

    from bench.measure import agreement, predict_all, repeat_to, time_batches
    from models.backends import create

    start = time.perf_counter()
    predictor = create(
        model,
        backend,
        precision,
        device,
        batch_size=batch_size,
        threads=options.threads,
        cache_dir=options.cache_dir,
        compile=options.compile,
    )
    setup = time.perf_counter() - start
    batch = predictor.preferred_batch_size
    quality = agreement(reference, predict_all(predictor.predict, images, batch))
    x = repeat_to(images, batch)
    sync = None
    if device.startswith("cuda"):
        # Model-only: the batch already waits on the GPU, as a GPU-side decoder leaves it.
        x, sync = x.to(device), torch.cuda.synchronize
    timing = time_batches(lambda: predictor.predict(x), batch, options.seconds, 5, sync=sync)
    row = {
        "backend": predictor.name,
        "precision": predictor.precision,
        "device": predictor.device,
        "setup_s": setup,
        "compiled": predictor.compiled,
        **timing.to_dict(),
        **quality,
    }
    if predictor.auto_decision is not None:
        row["auto_decision"] = predictor.auto_decision
    log(
        f"  {row['backend']:12s} {row['precision']:5s} batch {batch:4d}: "
        f"{row['images_per_s']:9.1f} img/s  top-1 {quality['top1_agreement']:.3f}  "
        f"(setup {setup:.0f} s)"
    )
    return row


def _auto_against_fastest(auto: dict, results: list[dict]) -> dict[str, object]:
    """auto's median img/s against the fastest explicit predictor of the same run (and the
    fastest that kept fp32's labels by auto's own thresholds)."""
    from models.backends.auto_measure import COSINE_MIN, TOP1_MIN

    explicit = [r for r in results if not r.get("auto") and "top1_agreement" in r]
    if not explicit:
        return {}
    fastest = max(explicit, key=lambda r: r["images_per_s"])
    faithful = [
        r for r in explicit if r["top1_agreement"] >= TOP1_MIN and r["min_cosine"] >= COSINE_MIN
    ]
    out = {
        "fastest": f"{fastest['backend']} {fastest['precision']}",
        "ratio_to_fastest": auto["images_per_s"] / fastest["images_per_s"],
    }
    if faithful:
        best = max(faithful, key=lambda r: r["images_per_s"])
        out["fastest_faithful"] = f"{best['backend']} {best['precision']}"
        out["ratio_to_fastest_faithful"] = auto["images_per_s"] / best["images_per_s"]
    return out


def _bench_timm(config, images, options, sizes, device, log) -> list[dict]:
    """timm's eager model of the same geometry (random weights) on the same inputs.

    fp32 everywhere; on a GPU also timm's usual fast path, eager bf16 autocast (AMP).
    """
    import contextlib

    import torch

    from bench.measure import repeat_to, time_batches, timm_reference_name

    name = timm_reference_name(config)
    if name is None:
        options.notes.append("timm: no timm model with this geometry; reference skipped")
        return []
    try:
        import timm
    except ImportError:
        options.notes.append("timm: not installed; reference skipped")
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = timm.create_model(name, pretrained=False, num_classes=config.num_classes)
    on_gpu = device.startswith("cuda")
    reference.eval().to(device)
    sync = torch.cuda.synchronize if on_gpu else None
    modes = {"fp32": contextlib.nullcontext}
    if on_gpu:
        modes["bf16"] = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    rows = []
    for batch in sizes:
        x = repeat_to(images, batch).to(device)
        for precision, context in modes.items():

            def run(x=x, context=context):
                with torch.inference_mode(), context():
                    return reference(x)

            timing = time_batches(run, batch, options.seconds, 5, sync=sync)
            label = "eager AMP" if precision != "fp32" else "eager"
            row = {"backend": f"timm {name} ({label})", "precision": precision, "device": device}
            row.update(setup_s=0.0, **timing.to_dict())
            log(f"  timm {name} {precision} {label} batch {batch}: {row['images_per_s']:.1f} img/s")
            rows.append(row)
    options.notes.append(f"timm {name}: random weights (no download), eager, same inputs")
    return rows


# --- output --------------------------------------------------------------------------------------


def format_markdown(report: dict) -> str:
    """The report as markdown: machine, the results table, GEMM peaks, memory, notes."""
    machine, model = report["machine"], report["model"]
    cpu = machine["cpu"]
    lines = [
        f"**{model['name']}** ({model['parameters']:,} parameters, "
        f"{model['gflop_per_image']:.1f} GFLOP/image) on {machine['device']}, "
        f"{machine['threads']} threads, torch {machine['torch']}, {report['date']}",
        "",
        f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {', '.join(cpu['flags']) or 'no bf16/VNNI'}; "
        f"torch dispatch {cpu['torch_capability']})",
    ]
    if machine.get("gpu"):
        gpu = machine["gpu"]
        lines.append(f"GPU: {gpu['name']} (compute capability {gpu['capability']})")
    limit = report.get("limit")
    if limit:
        lines.append(
            f"Hardware limit: {limit['images_per_s']:.1f} img/s "
            f"({limit['kind']} GEMM at {limit['gflops']:.0f} GFLOP/s, best of short runs); "
            "% of limit = best batch / limit"
        )
    ceiling = report.get("gemm_ceiling")
    if ceiling:
        rates = ", ".join(
            f"{g['name']} {g['gflops']:.0f}" for g in ceiling["gemms"] if g["calls"] > 1
        )
        lines.append(
            f"GEMM-only ceiling: {ceiling['images_per_s']:.1f} img/s = "
            f"{ceiling['percent_of_limit']:.0f}% of the limit (every GEMM of the model at batch "
            f"{ceiling['batch_size']} with the {ceiling['kind']} kernel, nothing else; "
            f"GFLOP/s: {rates})"
        )
    lines += [
        "",
        "| backend | precision | batch | img/s (median) | img/s (best) | % of limit"
        " | % of GEMM-only | p50 ms | p90 ms | top-1 agree | max Δprob | min cos | setup s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        pct = f"{r['percent_of_limit']:.0f}%" if "percent_of_limit" in r else "-"
        ceiling_pct = r.get("percent_of_gemm_ceiling")
        pct_gemms = f"{ceiling_pct:.0f}%" if ceiling_pct is not None else "-"
        quality = (
            f"{100 * r['top1_agreement']:.1f}% | {r['max_prob_diff']:.2g} | {r['min_cosine']:.4f}"
            if "top1_agreement" in r
            else "- | - | -"
        )
        backend = r["backend"] + (" (compiled)" if r.get("compiled") else "")
        precision = r["precision"] + (" (auto)" if r.get("auto") else "")
        lines.append(
            f"| {backend} | {precision} | {r['batch_size']} | {r['images_per_s']:.1f} | "
            f"{r['best_images_per_s']:.1f} | {pct} | {pct_gemms} | "
            f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
            f"{quality} | {r['setup_s']:.0f} |"
        )
    if report.get("gemm"):
        lines += ["", "| GEMM (M x K x N) | " + " | ".join(report["gemm"]) + " |"]
        lines.append("|---|" + "---:|" * len(report["gemm"]))
        shapes = sorted({s for rates in report["gemm"].values() for s in rates})
        for shape in shapes:
            cells = [
                f"{report['gemm'][k][shape]:.0f} GFLOP/s" if shape in report["gemm"][k] else "-"
                for k in report["gemm"]
            ]
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    memory = report.get("memory")
    if memory:
        budget = 1.5 * memory["weights_mb"] + memory["activations_mb"]
        lines += [
            "",
            f"Peak memory of a fresh {memory['backend']} {memory['precision']} predictor "
            f"(load weights, create, one batch of {memory['batch_size']}): "
            f"{memory['peak_mb']:.0f} MB above the interpreter's {memory['baseline_mb']:.0f} MB; "
            f"{memory['after_mb']:.0f} MB held after; weights {memory['weights_mb']:.0f} MB fp32; "
            f"budget 1.5 x weights + one batch's activations = {budget:.0f} MB"
            + (f"; compiled package: {memory['package']}." if memory.get("package") else "."),
        ]
    decision = report.get("auto")
    if decision:
        lines += [
            "",
            f"auto chose **{decision['chose']}** by measurement ({decision['source']}; "
            f"agreement on {decision['calibration']}{_decided(decision)}; "
            f"{decision['measured_at']}):",
            "",
            "| candidate | img/s | top-1 agree | min cos | build s | check s | passed |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for c in decision["candidates"]:
            name = f"{c['backend']} {c['precision']}" + (
                f" ({c['engine']})" if c.get("engine") else ""
            )
            passed = "yes" if c["passed"] else f"no{': ' + c['error'] if c.get('error') else ''}"
            lines.append(
                f"| {name} | {c['images_per_s']:.1f} | {100 * c['top1_agreement']:.1f}% | "
                f"{c['min_cosine']:.4f} | {c.get('build_s', 0):.0f} | {c.get('check_s', 0):.0f} | "
                f"{passed} |"
            )
        against = report.get("auto_vs_fastest") or {}
        if against:
            text = f"auto / fastest ({against['fastest']}): {against['ratio_to_fastest']:.2f}"
            if "fastest_faithful" in against:
                text += (
                    f"; auto / fastest faithful ({against['fastest_faithful']}): "
                    f"{against['ratio_to_fastest_faithful']:.2f}"
                )
            lines += ["", text]
    if report.get("notes"):
        lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines)


def _decided(decision: dict) -> str:
    counts = {c.get("decided_images") for c in decision["candidates"]} - {None}
    return f", fp32 decided {counts.pop()} of them" if len(counts) == 1 else ""


def _fp8_runs(device: str) -> bool:
    from models.backends import BackendError
    from models.backends.torch_fp8 import check_fp8_device

    try:
        check_fp8_device(device)
    except BackendError:
        return False
    return True
