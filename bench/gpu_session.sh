#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call that fits the lease (about 8 minutes on an
# H100/H200): the speed variants side by side (bench/gpu_variants.py: bf16 as shipped, bf16
# with the token GELU and the residual in GEMM epilogues, fp8), `mixer-label bench` on CUDA
# with its agreement columns, the CUDA tests and the actor's hot loop with device decode
# (bench/gpu_pipeline.py). Needs only the machine's own python3 with torch (+ torchvision for
# nvJPEG): no Ray, no S3, no installs. Logs and JSON land in $OUT.
#
#   OUT=/some/dir bench/gpu_session.sh            # on the GPU machine
#   GPU_SESSION_DEVICE=cpu bench/gpu_session.sh   # dry run on a CPU: tiny model, same steps
#
# One step per block: `step NAME SECONDS COMMAND...` writes $OUT/NAME.log and prints its exit
# status and tail. Add a step as one more block. The limits add up to 590 s, under one device
# command's 600 (a new step takes its seconds from the others). The device tool brings back at
# most 8 files from $OUT: today env.log, variants.log/.json, bench.log/.json, gpu-tests.log,
# gpu-pipeline.log/.json (8).
set -u
OUT=${OUT:-/tmp/mixer-label-gpu}
DEVICE=${GPU_SESSION_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cpu ]; then  # the dry run: every step, on the tiny preset, in seconds
  MODEL=tiny BATCH=8 SCALE=4 BENCH_SECONDS=0.2 IMAGES=64 STAGE_IMAGES=16
else
  MODEL=B/16 BATCH=512 SCALE=1 BENCH_SECONDS=3 IMAGES=4096 STAGE_IMAGES=512
fi

step() {  # NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $?"
  tail -n "${TAIL:-16}" "$OUT/$name.log"
}

# --- the machine ---------------------------------------------------------------------------
step env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv 2>&1 | head -2
$PYTHON -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")'
$PYTHON -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)' 2>&1 | tail -1
$PYTHON -c 'import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())' 2>&1 | tail -1
nproc"

# --- model-only speed: bf16 as shipped, the epilogue options, fp8 (issue 20) ----------------
# fp8-eager runs the GEMMs alone with nothing fused around them; -compiled is what
# precision="fp8" runs. Agreement with fp32 is in every row (top-1, min cosine).
TAIL=14 step variants $((210 * SCALE)) "$PYTHON" bench/gpu_variants.py --device "$DEVICE" \
  --model "$MODEL" --batch-sizes "$BATCH" --autotune-batch 0 --json "$OUT/variants.json" \
  --variants fused-compiled,fused-compiled-token-epilogue,fused-compiled-residual-epilogue,fp8-eager,fp8-compiled,fp8-compiled-fast-accum

# --- mixer-label bench on the device, with its agreement columns ---------------------------
# `auto` measures every candidate the GPU runs natively (fp32, fp16, bf16, fp8 on >= 8.9) and
# reports each one's img/s and agreement; explicit torch fp8 adds the bench's own timed row.
# (Each is a compile of B/16, about 25 s on an H100: more explicit rows would not fit.)
step bench $((160 * SCALE)) "$PYTHON" -m console bench --device "$DEVICE" \
  --model "$MODEL" --backends auto,torch,tensorrt --precisions fp8 \
  --batch-sizes "$BATCH" --seconds "$BENCH_SECONDS" --no-memory --no-timm \
  --json "$OUT/bench.json"

# --- the CUDA tests (they skip, saying why, where there is no GPU) --------------------------
TAIL=8 step gpu-tests $((60 * SCALE)) "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts=-ra \
  tests/models/test_gpu_backends.py

# --- the actor's hot loop end to end (decode helper, issue 16) -----------------------------
# On local tar shards made on the spot (JPEGs of 500x375 at q90): --decode device vs --decode
# cpu with 4 threads vs model only. Target: decode_device >= 0.8x model_only using <= 4 CPU
# cores (BENCHMARKS.md, "GPU data path").
TAIL=6 step gpu-pipeline $((140 * SCALE)) "$PYTHON" bench/gpu_pipeline.py --device "$DEVICE" \
  --model "$MODEL" --backend torch --precision bf16 --batch-size "$BATCH" --images "$IMAGES" \
  --cpu-threads 4 --stage-images "$STAGE_IMAGES" --json "$OUT/gpu-pipeline.json"
