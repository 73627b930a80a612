#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call that fits the lease (about 8 minutes):
# speed variants of the model (bench/gpu_variants.py), `mixer-label bench` on CUDA, and the
# CUDA tests. Runs with the machine's own python3 and torch; logs and JSON land in $OUT.
set -u
OUT=${OUT:-/tmp/mixer-label-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
  python3 -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' 2>&1 | tail -1
  python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
  nproc
} 2>&1 | tee "$OUT/env.txt"

# The paper layout and the separate-GELU variants were measured on 2026-11-27 (BENCHMARKS.md);
# what is still open: the token GELU in the epilogue, side by side with what the backend runs.
timeout 250 python3 bench/gpu_variants.py --batch-sizes 512 --autotune-batch 0 \
  --variants fused-eager,fused-eager-token-epilogue,fused-compiled,fused-compiled-token-epilogue \
  --json "$OUT/variants.json" >"$OUT/variants.log" 2>&1
echo "variants: exit $?"; tail -n 14 "$OUT/variants.log"

timeout 150 python3 -m console bench \
  --device cuda --backends auto,torch,onnxruntime,tensorrt --precisions bf16,fp16 \
  --batch-sizes 512 --seconds 3 --no-memory --json "$OUT/bench-cuda.json" >"$OUT/bench.log" 2>&1
echo "bench: exit $?"; grep -E '^\||GPU:|limit' "$OUT/bench.log" | tail -n 14

timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/models/test_gpu_backends.py \
  >"$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"; tail -n 8 "$OUT/gpu-tests.log"

# ---------------------------------------------------------------------------------------------
# Step (decode helper, issue 16): the actor's hot loop end to end on local tar shards made on
# the spot (4,096 JPEGs of 500x375 at q90): --decode device vs --decode cpu with 4 threads vs
# model only, in one call. Needs only this python3's torch + torchvision. Target: decode_device
# >= 0.8x model_only using <= 4 CPU cores (BENCHMARKS.md, "GPU data path").
timeout 240 python3 bench/gpu_pipeline.py --backend torch --precision bf16 --batch-size 512 \
  --images 4096 --cpu-threads 4 --json "$OUT/gpu-pipeline.json" >"$OUT/gpu-pipeline.log" 2>&1
echo "gpu pipeline: exit $?"; tail -n 6 "$OUT/gpu-pipeline.log"
