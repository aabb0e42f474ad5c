#!/usr/bin/env bash
# make bench-genai: NVIDIA genai-perf against the running server's streaming `gpt2`, the
# way it profiles a TensorRT-LLM deployment (--backend tensorrtllm, kserve, --streaming):
# 32-token synthetic prompts, exactly 64 new tokens (genai-perf sends min_length), at
# concurrency 1, 4 and 16. genai-perf drives perf_analyzer (tritonclient's wheel, with
# libb64 and libcudart that `make bench-genai` installs) and tokenizes with the served
# model's own tokenizer folder (the hub is out of reach). Output: artifacts/bench/genai/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GENAI=${GENAI:-.venv-genai/bin/genai-perf}
URL=${GRPC_URL:-127.0.0.1:8001}
TOKENIZER=${TOKENIZER:-model_repository/gpt2/1/tokenizer}
OUT=${GENAI_OUT:-artifacts/bench/genai}
CONCURRENCY=${CONCURRENCY:-1 4 16}
[ -f "$TOKENIZER/tokenizer.json" ] || {
  echo "error: no tokenizer in $TOKENIZER (TOKENIZER=<the served model's tokenizer folder>)" >&2
  exit 2
}
$PY -c "from client import Gpt2Client; Gpt2Client('$URL').wait_until_ready(180)"
cudart=$($PY -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))")
export LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}"
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"  # genai-perf runs `perf_analyzer`
mkdir -p "$OUT"
for c in $CONCURRENCY; do
  echo "== genai-perf: gpt2, streaming, concurrency $c"
  "$GENAI" profile -m gpt2 --backend tensorrtllm --endpoint-type kserve --streaming \
    -u "$URL" --tokenizer "$TOKENIZER" \
    --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean 64 --output-tokens-mean-deterministic \
    --concurrency "$c" --request-count $((4 * c < 16 ? 16 : 4 * c)) --warmup-request-count "$c" \
    --artifact-dir "$OUT/c$c" 2>&1 | tee "$OUT/c$c.log" | grep -v "^\[" || true
done
"$PY" -m benchmarks.genai_summary "$OUT"
