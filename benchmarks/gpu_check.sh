#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU and no network:
#   1. the tiny model, its ONNX export, and the consistency report with every engine that
#      runs there (ONNX Runtime, PyTorch on the CPU, PyTorch fp16 on CUDA, TensorRT if a
#      plan was built);
#   2. the torch engine on CUDA served by the pip tritonserver, checked and timed through
#      the client (benchmarks/gpu_check.py).
# Needs the project's packages in `python3` (make setup, or see docs/GPU.md). Results go
# to $GPU_CHECK_OUT (default artifacts/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-artifacts/gpu_check}
export GPT2_TRITON_ARTIFACTS=${GPT2_TRITON_ARTIFACTS:-artifacts}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
status=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi -L || status=1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

step "tiny model, ONNX export"
$PY -m build_scripts.build_tiny && $PY -m build_scripts.export_onnx --model tiny --skip-existing \
  || exit 1

step "consistency report (every engine present)"
$PY -m build_scripts.verify --model tiny --output "$OUT_DIR/verify" || status=1

step "torch engine on CUDA through tritonserver"
repo="$OUT_DIR/model_repository"
$PY -m build_scripts.build_repo --model tiny --engine torch --device cuda --repository "$repo" \
  || exit 1
$PY -m gpt2_triton.serve --model-repository "$repo" --log-dir "$OUT_DIR/logs" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
$PY -m benchmarks.gpu_check --checkpoint "$GPT2_TRITON_ARTIFACTS/models/tiny" --out "$OUT_DIR" \
  || status=1
exit $status
