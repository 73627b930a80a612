"""`mixer-label bench`: model-only speed per backend and precision against the hardware."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from console.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="B/16", help="preset (B/16) or checkpoint file")
    parser.add_argument(
        "--backends",
        default="auto,torch,onnxruntime",
        help="comma list of auto, torch, onnxruntime, tensorrt (default: %(default)s)",
    )
    parser.add_argument(
        "--precisions",
        default="fp32,bf16,int8,fp16",
        help="comma list; each backend runs those it supports (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-sizes", default="", help="comma list (default: each predictor's preferred)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per result")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--inputs",
        default=None,
        help=".npy of normalized images for agreement (default: synthetic images)",
    )
    parser.add_argument(
        "--agreement-images",
        type=int,
        default=64,
        help="images each predictor is compared on against the fp32 model (top-1, cosine)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="ONNX / TensorRT cache folder (default: $MIXER_LABEL_CACHE, else"
        " ~/.cache/mixer-label)",
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off", "aot", "jit"),
        default="auto",
        help="compiling for the torch backend: auto (models of >= 1 GFLOP/image), on (CPU:"
        " a cached AOTInductor package; GPU: torch.compile), aot, jit (torch.compile in"
        " process), off",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    parser.add_argument("--no-gemm", action="store_true", help="skip the GEMM peak")
    parser.add_argument("--no-timm", action="store_true", help="skip timm's reference")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probe")


def options_from_args(args: argparse.Namespace):
    """The BenchOptions the flags describe; a bad value is a UsageError naming the flag."""
    from bench.model_bench import BenchOptions
    from models.backends import BACKENDS, PRECISIONS

    def split(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    try:
        sizes = tuple(int(s) for s in split(args.batch_sizes))
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers, not {args.batch_sizes!r}") from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"--batch-sizes must be positive, not {args.batch_sizes!r}")
    if args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, not {args.seconds}")
    if args.agreement_images < 1:
        raise UsageError(f"--agreement-images must be at least 1, not {args.agreement_images}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {args.device!r}")
    for backend in split(args.backends):
        if backend not in ("auto", *BACKENDS):
            raise UsageError(f"unknown backend {backend!r} (known: auto, {', '.join(BACKENDS)})")
    for precision in split(args.precisions):
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    return BenchOptions(
        model=args.model,
        backends=split(args.backends),
        precisions=split(args.precisions),
        batch_sizes=sizes,
        seconds=args.seconds,
        device=args.device,
        threads=args.threads,
        agreement_images=args.agreement_images,
        inputs=args.inputs,
        gemm=not args.no_gemm,
        timm=not args.no_timm,
        memory=not args.no_memory,
        cache_dir=args.cache_dir,
        compile={"auto": None, "on": True, "off": False}.get(args.compile, args.compile),
        command="mixer-label bench " + " ".join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench"
        else "mixer-label bench",
    )


def main(args: argparse.Namespace) -> int:
    from bench.model_bench import format_markdown, run_bench

    options = options_from_args(args)
    # A model or --inputs file it cannot read (OSError) or a configuration it cannot build
    # (ValueError) becomes one line in console.errors.
    report = run_bench(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    return str(value)
