"""Mixer-B/16 on one CUDA GPU: which way of running it is fastest, model only.

Run on a lent GPU (see BENCHMARKS.md for the exact command); prints one table and writes
JSON. Each variant runs the same bf16 weights on inputs already on the GPU, replayed as one
CUDA graph per batch shape and timed with CUDA events (median of rounds), and is checked
against the fp32 model on the same images (logits cosine, top-1 agreement):

- paper-eager: `models.mixer.MlpMixer` in bf16, the paper's layout (two transposes a block).
- fused-eager: `FusedMixer` (token-major, no transposes), no compiler, with the channel
  MLP's bias + tanh GELU in cuBLASLt's GEMM epilogue (`gelu_in_gemm`), as the backend runs it.
- fused-compiled: what `create(backend="torch", precision="bf16", device="cuda")` runs
  (Inductor default mode, frozen weights; norms and pointwise ops fused; cuBLAS GEMMs).
- *-separate-gelu: the same without `gelu_in_gemm` (GELU as its own kernel).
- *-token-epilogue: also the token MLP's GELU in the epilogue (`token_gelu_in_gemm`: its GEMM
  computed transposed).
- *-residual-epilogue: also the residual stream as the second GEMM's accumulator, its bias
  left to the next LayerNorm's pass (`residual_in_gemm`, issue 20 item 3).
- fused-autotune: Inductor max-autotune (Triton GEMM templates with fused epilogues).
- fp8-eager, fp8-compiled: `Fp8Mixer` (torch_fp8.py), what `precision="fp8"` runs: e4m3
  GEMMs through `torch._scaled_mm`, weights per output channel, activations per row;
  *-fast-accum: Hopper's fast fp8 accumulation; *-tensor-scaled: one activation scale per
  matrix instead of per row.

`--device cpu` is a dry run for the CPU (the session script's test): nothing is compiled or
graphed there, fp8 runs its CPU simulation, and the times mean nothing.

Also measured: the bf16 GEMM ceiling (the model's channel GEMM and 8192^3), and JPEG decode
on the GPU (nvJPEG through torchvision) against Pillow on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import agreement, synthetic_images  # noqa: E402
from models.backends.torch_fp8 import Fp8Mixer  # noqa: E402
from models.backends.torch_fused import FusedMixer  # noqa: E402
from models.backends.torch_helpers import CudaGraphed, compile_frozen  # noqa: E402
from models.mixer import build_preset  # noqa: E402


def cuda_time_ms(fn, rounds: int = 7, reps: int = 20) -> float:
    """Median over `rounds` of the mean time of `reps` calls, by CUDA events (CPU: a clock)."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def gemm_tflops(m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    return 2 * m * k * n / cuda_time_ms(lambda: a @ b) / 1e9


def fp8_gemm_tflops(m: int, k: int, n: int) -> float:
    """The e4m3 GEMM as Fp8Linear calls it: rowwise scales, bf16 bias and output."""
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()
    scale_a, scale_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)

    def run():
        return torch._scaled_mm(a, b, scale_a, scale_b, bias=bias, out_dtype=torch.bfloat16)

    return 2 * m * k * n / cuda_time_ms(run) / 1e9


def build_variant(name: str, model, example: torch.Tensor):
    """A callable taking a batch of `example`'s shape: on CUDA replayed as a CUDA graph."""
    import torch._inductor.config as inductor_config

    on_gpu = example.is_cuda

    def graphed(fn):
        return CudaGraphed(fn, example) if on_gpu else fn

    if name == "paper-eager":
        paper = copy.deepcopy(model).to(torch.bfloat16).eval()

        def paper_forward(x):
            return paper(x.to(torch.bfloat16)).float(), None

        return graphed(paper_forward)
    if name.startswith("fp8-"):
        scaling = "tensor" if "tensor-scaled" in name else "row"
        module = Fp8Mixer(model, scaling=scaling, fast_accum="fast-accum" in name)
    else:
        flags = dict(
            gelu_in_gemm="separate-gelu" not in name,
            token_gelu_in_gemm="token-epilogue" in name,
            residual_in_gemm="residual-epilogue" in name,
        )
        module = FusedMixer(model, torch.bfloat16, **flags)
    module = module.to(example.device).eval()
    if "-eager" in name or not on_gpu:  # the CPU dry run compiles nothing
        return graphed(module)
    if "-compiled" in name:
        return graphed(compile_frozen(module, example))
    if name == "fused-autotune":
        compiled = torch.compile(module, mode="max-autotune-no-cudagraphs", fullgraph=True)
        with inductor_config.patch(freezing=True), torch.inference_mode():
            compiled(example)
            compiled(example)
        return graphed(compiled)
    raise ValueError(f"unknown variant {name!r}")


def bench_variants(names, batch_sizes, results, model_name: str, device: str) -> None:
    model = build_preset(model_name).eval()
    size = model.config.image_size
    images = synthetic_images(64, size)
    with torch.inference_mode():
        reference = model(images)  # fp32 on the CPU: the paper-exact model
    model = model.to(device)
    for batch in batch_sizes:
        for name in names:
            row = {"variant": name, "batch": batch}
            try:
                example = images.repeat((batch + 63) // 64, 1, 1, 1)[:batch].to(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    run = build_variant(name, model, example)
                    row["setup_s"] = time.perf_counter() - start
                    logits = run(example)[0][:64].float().cpu()
                    row.update(agreement(reference[: len(logits)], logits))
                    ms = cuda_time_ms(lambda run=run, example=example: run(example))
                row.update(ms=ms, images_per_s=batch / ms * 1e3)
                row["tflops"] = row["images_per_s"] * 2 * model.config.macs_per_image() / 1e12
                run = None  # free its graph before the next variant
            except Exception as err:  # report and go on: one variant must not end the run
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            results["variants"].append(row)
            print(json.dumps(row), flush=True)


def bench_decode(count: int, results) -> None:
    """nvJPEG (torchvision.io.decode_jpeg on CUDA) vs Pillow on one core, 500x375 JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB").resize((224, 224), Image.BILINEAR)
    results["decode"]["pillow_one_core_images_per_s"] = count / (time.perf_counter() - start)
    if not torch.cuda.is_available():
        results["decode"]["nvjpeg"] = "no CUDA device"
        return
    try:
        from torchvision.io import decode_jpeg
    except ImportError as err:
        results["decode"]["nvjpeg"] = f"torchvision missing: {err}"
        return
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def gpu_batch():
        decoded = decode_jpeg(data, device="cuda")
        return [
            F.interpolate(d[None].float(), size=(224, 224), mode="bilinear", antialias=True)
            for d in decoded
        ]

    ms = cuda_time_ms(gpu_batch, rounds=5, reps=3)
    results["decode"]["nvjpeg_plus_resize_images_per_s"] = count / ms * 1e3
    ms = cuda_time_ms(lambda: decode_jpeg(data, device="cuda"), rounds=5, reps=3)
    results["decode"]["nvjpeg_decode_only_images_per_s"] = count / ms * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="256,1024")
    parser.add_argument(
        "--variants",
        default="paper-eager,fused-eager-separate-gelu,fused-eager,fused-eager-token-epilogue,"
        "fused-compiled-separate-gelu,fused-compiled,fused-compiled-token-epilogue",
    )
    parser.add_argument(
        "--autotune-batch",
        type=int,
        default=0,
        help="batch size for fused-autotune (0: skip; on an H100 its tuning ran past 150 s)",
    )
    parser.add_argument("--decode-images", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    parser.add_argument("--model", default="B/16", help="preset (the dry run uses tiny)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("gpu_variants: no CUDA device visible to torch", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {
        "gpu": torch.cuda.get_device_properties(0).name if on_gpu else "none (CPU dry run)",
        "torch": torch.__version__,
        "model": args.model,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gemm_tflops": {},
        "variants": [],
        "decode": {},
    }
    if on_gpu:
        for m, k, n in ((1024 * 196, 768, 3072), (8192, 8192, 8192)):
            results["gemm_tflops"][f"bf16 {m}x{k}x{n}"] = gemm_tflops(m, k, n)
            try:
                results["gemm_tflops"][f"fp8 {m}x{k}x{n}"] = fp8_gemm_tflops(m, k, n)
            except RuntimeError as err:  # below compute capability 8.9
                results["gemm_tflops"][f"fp8 {m}x{k}x{n}"] = str(err).splitlines()[0]
        print(json.dumps(results["gemm_tflops"]), flush=True)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    bench_variants(args.variants.split(","), sizes, results, args.model, args.device)
    if args.autotune_batch and on_gpu:
        names = ["fused-compiled", "fused-autotune"]
        bench_variants(names, [args.autotune_batch], results, args.model, args.device)
    try:
        bench_decode(args.decode_images if on_gpu else 8, results)
    except Exception as err:
        results["decode"]["error"] = f"{type(err).__name__}: {err}"
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['gpu']}, torch {results['torch']}, {results['date']}")
    gemms = results["gemm_tflops"].items()
    print("GEMM TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gemms if isinstance(v, float)))
    print("| variant | batch | img/s | TFLOP/s | top-1 | min cos | setup s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["variants"]:
        if "error" in r:
            print(f"| {r['variant']} | {r['batch']} | {r['error']} |")
            continue
        print(
            f"| {r['variant']} | {r['batch']} | {r['images_per_s']:.0f} | {r['tflops']:.0f} | "
            f"{100 * r['top1_agreement']:.1f}% | {r['min_cosine']:.4f} | {r['setup_s']:.0f} |"
        )
    print("decode:", json.dumps(results["decode"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
