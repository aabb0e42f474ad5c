#!/usr/bin/env bash
# make bench-pa: perf_analyzer (from tritonclient 2.51's wheel) against a running server
# (`make serve OPEN_TRITON_STATISTICS=1`: perf_analyzer reads Triton's statistics API).
#   1. next_token, the single-forward-pass ensemble: requests/s and latency;
#   2. gpt2, streaming: time to first token, inter-token latency, output tokens/s.
# Needs libb64 (Debian's libb64-0d) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12),
# which `make bench-pa` installs. Output: artifacts/bench/pa/*.csv and the log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
URL=${GRPC_URL:-127.0.0.1:8001}
OUT=${PA_OUT:-artifacts/bench/pa}
PA=$(dirname "$PY")/perf_analyzer
mkdir -p "$OUT"
$PY -c "from client import Gpt2Client; Gpt2Client('$URL').wait_until_ready(180)"
$PY -m benchmarks.statistics_check "$URL" || exit 2
cudart=$($PY -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))")
export LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}"

cat > "$OUT/next_token.json" <<'JSON'
{"data": [{"text_input": {"content": ["The quick brown fox jumps over the lazy dog. In 1998, the city council decided to build a new bridge across the river"], "shape": [1]},
           "temperature": {"content": [0.0], "shape": [1]}}]}
JSON
cat > "$OUT/gpt2.json" <<'JSON'
{"data": [{"text_input": ["The quick brown fox jumps over the lazy dog. In 1998, the city council decided to build a new bridge across the river"],
           "max_tokens": [64], "min_length": [64], "temperature": [0.0], "stream": [true]}]}
JSON

echo "== next_token (ensemble: tokenizer -> engine -> sampler), one forward pass"
"$PA" -m next_token -u "$URL" -i grpc --input-data "$OUT/next_token.json" \
  --concurrency-range 1:4:3 --measurement-interval 5000 -f "$OUT/next_token.csv" \
  | tee "$OUT/next_token.log"

echo "== gpt2, streaming, 64 tokens per request"
"$PA" -m gpt2 -u "$URL" -i grpc --streaming --input-data "$OUT/gpt2.json" \
  --concurrency-range 1:4:3 --measurement-mode count_windows \
  --measurement-request-count 8 --stability-percentage 25 --max-trials 6 -f "$OUT/gpt2.csv" \
  | tee "$OUT/gpt2.log"
