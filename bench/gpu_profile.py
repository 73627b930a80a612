"""Where the GPU time of the compiled bf16 Mixer-B/16 goes: top kernels by CUDA time."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_variants import build_variant  # noqa: E402
from models.mixer import build_preset  # noqa: E402


def main(batch: int = 256, variant: str = "fused-compiled") -> None:
    model = build_preset("B/16").eval().cuda()
    example = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        run = build_variant(variant, model, example)
        for _ in range(3):
            run(example)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            for _ in range(5):
                run(example)
            torch.cuda.synchronize()
    print(f"{variant} batch {batch}: per batch of 5")
    table = profile.key_averages().table(
        sort_by="cuda_time_total", row_limit=18, max_name_column_width=70
    )
    print(table)


if __name__ == "__main__":
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    main(batch, sys.argv[2] if len(sys.argv) > 2 else "fused-compiled")
