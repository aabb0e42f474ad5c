#!/usr/bin/env bash
# make bench-genai: NVIDIA genai-perf against the running server's streaming `gpt2`, the
# way it profiles a TensorRT-LLM deployment (--backend tensorrtllm, kserve, --streaming):
# 32-token synthetic prompts, exactly 64 new tokens (genai-perf sends min_length), at
# concurrency 1, 4 and 16. genai-perf drives perf_analyzer (tritonclient's wheel, with
# libb64 and libcudart that `make bench-genai` installs) and tokenizes with the served
# model's own tokenizer folder (the hub is out of reach). Then the same workload through
# the OpenAI API (genai-perf's `--endpoint-type completions` and `chat`, streaming) at the
# front door's HTTP port: what any OpenAI-speaking tool sees, Envoy and the gateway
# included. OpenAI mode has no deterministic output length in genai-perf: the gateway's
# `min_tokens` (an extra input) holds each reply to 64 tokens, up to a stop word (a chat
# reply ends at the transcript's "User:"; GPT-2 small's random weights never write it).
# Output: artifacts/bench/genai/ (c<N>: kserve, <endpoint>-c<N>: OpenAI). Against
# `make serve OPEN_TRITON_STATISTICS=1`: perf_analyzer reads Triton's statistics API.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GENAI=${GENAI:-.venv-genai/bin/genai-perf}
URL=${GRPC_URL:-127.0.0.1:8001}
HTTP_URL=${HTTP_URL:-127.0.0.1:8000}  # the front door: /v1 is the OpenAI API
OPENAI_ENDPOINTS=${OPENAI_ENDPOINTS-completions chat}  # set empty: kserve only
TOKENIZER=${TOKENIZER:-model_repository/gpt2/1/tokenizer}
OUT=${GENAI_OUT:-artifacts/bench/genai}
CONCURRENCY=${CONCURRENCY:-1 4 16}
[ -f "$TOKENIZER/tokenizer.json" ] || {
  echo "error: no tokenizer in $TOKENIZER (TOKENIZER=<the served model's tokenizer folder>)" >&2
  exit 2
}
$PY -c "from client import Gpt2Client; Gpt2Client('$URL').wait_until_ready(180)"
$PY -m benchmarks.statistics_check "$URL" || exit 2
cudart=$($PY -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))")
export LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}"
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"  # genai-perf runs `perf_analyzer`
mkdir -p "$OUT"
# profile NAME GENAI_ARGS...: one point into $OUT/NAME (and NAME.log). genai-perf 0.0.16
# sometimes reads perf_analyzer's export before it is whole (seen here: 64 KiB or 0 bytes
# of it, then a JSON error, at concurrency 4): a point without its results runs again,
# at most 3 times, and is left out of the table after that (and the run exits 1).
missing=""
profile() {
  local name=$1 try
  shift
  for try in 1 2 3; do
    rm -rf "${OUT:?}/$name"
    "$GENAI" profile "$@" --artifact-dir "$OUT/$name" >"$OUT/$name.log" 2>&1 || true
    grep -v "^\[" "$OUT/$name.log" || true
    if compgen -G "$OUT/$name/*/profile_export_genai_perf.json" >/dev/null; then return; fi
    echo "genai-perf left no results for $name (try $try of 3; log: $OUT/$name.log)" >&2
  done
  missing="$missing $name"
}
for c in $CONCURRENCY; do
  echo "== genai-perf: gpt2, streaming, concurrency $c"
  profile "c$c" -m gpt2 --backend tensorrtllm --endpoint-type kserve --streaming \
    -u "$URL" --tokenizer "$TOKENIZER" \
    --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean 64 --output-tokens-mean-deterministic \
    --concurrency "$c" --request-count $((4 * c < 16 ? 16 : 4 * c)) --warmup-request-count "$c"
done
if [ -n "$OPENAI_ENDPOINTS" ]; then
  # the model's id in the OpenAI API is the checkpoint's name, not the Triton model's
  model=$(curl -sf ${API_KEY:+-H "Authorization: Bearer $API_KEY"} "http://$HTTP_URL/v1/models" |
    "$PY" -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])") || {
    echo "error: no OpenAI API at http://$HTTP_URL/v1 (started with NO_OPENAI=1?)" >&2
    exit 2
  }
  for endpoint in $OPENAI_ENDPOINTS; do
    for c in $CONCURRENCY; do
      echo "== genai-perf: OpenAI $endpoint ($model), streaming, concurrency $c"
      profile "$endpoint-c$c" -m "$model" --endpoint-type "$endpoint" --streaming \
        -u "http://$HTTP_URL" --tokenizer "$TOKENIZER" \
        ${API_KEY:+--header "Authorization: Bearer $API_KEY"} \
        --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0 \
        --output-tokens-mean 64 --extra-inputs min_tokens:64 \
        --concurrency "$c" --request-count $((4 * c < 16 ? 16 : 4 * c)) --warmup-request-count "$c"
    done
  done
fi
"$PY" -m benchmarks.genai_summary "$OUT" || exit
if [ -n "$missing" ]; then
  echo "error: no results for:$missing (left out of the table above)" >&2
  exit 1
fi
