#!/usr/bin/env bash
# Build the TensorRT engine model_a100.plan for target a100 (NVIDIA A100 SXM4 80GB (Ampere, sm_80))
# from model.qdq.onnx (explicit Q/DQ, strongly typed). An engine is specific to the GPU
# architecture and the TensorRT version that builds it: run this where the engine will run.
# Needs TensorRT's trtexec (on PATH, or set TRTEXEC=/path/to/trtexec).
# The command: trtexec --onnx=model.qdq.onnx --saveEngine=model_a100.plan --stronglyTyped --minShapes=input_ids:1x1,attention_mask:1x1,token_type_ids:1x1 --optShapes=input_ids:32x128,attention_mask:32x128,token_type_ids:32x128 --maxShapes=input_ids:32x128,attention_mask:32x128,token_type_ids:32x128 --timingCacheFile=timing.cache --memPoolSize=workspace:4096M
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
if [ ! -x "$TRTEXEC" ]; then
  echo "error: trtexec not found; install TensorRT or set TRTEXEC=/path/to/trtexec" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${COMPRESSOR_SKIP_TARGET_CHECK:-}" ]; then
  have="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')"
  if [ "$have" != "8.0" ]; then
    echo "error: this GPU has compute capability $have; the a100 engine needs 8.0 (sm_80)" >&2
    exit 2
  fi
fi
exec "$TRTEXEC" --onnx=model.qdq.onnx --saveEngine=model_a100.plan --stronglyTyped --minShapes=input_ids:1x1,attention_mask:1x1,token_type_ids:1x1 --optShapes=input_ids:32x128,attention_mask:32x128,token_type_ids:32x128 --maxShapes=input_ids:32x128,attention_mask:32x128,token_type_ids:32x128 --timingCacheFile=timing.cache --memPoolSize=workspace:4096M
