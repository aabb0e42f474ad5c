"""Tensor names and request defaults: the one place that defines the serving contract.

The text-generation names follow Triton's TensorRT-LLM ensemble (``text_input``,
``max_tokens``, ``text_output``...), so clients written for it, genai-perf and perf_analyzer
work unchanged. Templates, Triton adapters and the client all import from here.
"""

from __future__ import annotations

import re

# --- gpt2 (decoupled text generation) -------------------------------------------------
TEXT_INPUT = "text_input"
MAX_TOKENS = "max_tokens"
STREAM = "stream"
TEMPERATURE = "temperature"
TOP_K = "top_k"
TOP_P = "top_p"
REPETITION_PENALTY = "repetition_penalty"
SEED = "seed"
STOP_WORDS = "stop_words"
EXCLUDE_INPUT_IN_OUTPUT = "exclude_input_in_output"
MIN_LENGTH = "min_length"  # tokens before EOS may end the text (genai-perf sets it)
# Opt-in outputs on every streamed piece, the input names of Triton's vLLM backend (whose
# num_output_tokens counts each piece's tokens; here it stays the running total). The
# final response always carries all four outputs; the pieces before it carry text_output
# alone unless these ask for more: each extra output is per-token work in the stub,
# tritonserver and the client for every stream (docs/PERFORMANCE.md).
RETURN_FINISH_REASON = "return_finish_reason"
RETURN_NUM_INPUT_TOKENS = "return_num_input_tokens"
RETURN_NUM_OUTPUT_TOKENS = "return_num_output_tokens"

# every gpt2 input, in config order; the scalars with their Triton datatypes
GPT2_INPUTS = (
    TEXT_INPUT,
    MAX_TOKENS,
    STREAM,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    REPETITION_PENALTY,
    SEED,
    STOP_WORDS,
    EXCLUDE_INPUT_IN_OUTPUT,
    MIN_LENGTH,
    RETURN_FINISH_REASON,
    RETURN_NUM_INPUT_TOKENS,
    RETURN_NUM_OUTPUT_TOKENS,
)
SCALAR_DATATYPES = {
    MAX_TOKENS: "INT32",
    STREAM: "BOOL",
    TEMPERATURE: "FP32",
    TOP_K: "INT32",
    TOP_P: "FP32",
    REPETITION_PENALTY: "FP32",
    SEED: "UINT64",
    EXCLUDE_INPUT_IN_OUTPUT: "BOOL",
    MIN_LENGTH: "INT32",
    RETURN_FINISH_REASON: "BOOL",
    RETURN_NUM_INPUT_TOKENS: "BOOL",
    RETURN_NUM_OUTPUT_TOKENS: "BOOL",
}

# The gpt2 model's errors in a gRPC stream reach the client as a message alone (Triton's
# ModelStreamInferResponse has no status code), so its messages say which kind they are:
# a validation error names the input at fault first ("max_tokens must be >= 1, got 0"); a
# full queue and a stopping server say so (gpt2_triton.batcher).
QUEUE_FULL = "requests are already waiting; retry later"
SHUTTING_DOWN = "the server is shutting down"
_NAMES_AN_INPUT = re.compile(rf"^({'|'.join(GPT2_INPUTS)})[ :(]")


def error_status(message: str) -> tuple[str, str | None]:
    """The gRPC status name an error message of the gpt2 model stands for, and the input
    it names (validation errors only)."""
    named = _NAMES_AN_INPUT.match(message)
    if named:
        return "INVALID_ARGUMENT", named.group(1)
    if QUEUE_FULL in message:
        return "RESOURCE_EXHAUSTED", None
    if SHUTTING_DOWN in message:
        return "UNAVAILABLE", None
    return "INTERNAL", None


# What each integer datatype of those inputs holds: a value past it, sent as JSON or cast
# by numpy, would wrap round to another (the client, the gateway and the front door check)
INTEGER_RANGES = {"INT32": (-(2**31), 2**31 - 1), "UINT64": (0, 2**64 - 1)}


def lone_surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (JSON's "\\ud800", or a command line's
    undecodable bytes), which UTF-8 cannot carry; None when it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
# which output each opt-in flag adds to every streamed piece
OUTPUT_OF_RETURN_FLAG = {
    RETURN_FINISH_REASON: FINISH_REASON,
    RETURN_NUM_INPUT_TOKENS: NUM_INPUT_TOKENS,
    RETURN_NUM_OUTPUT_TOKENS: NUM_OUTPUT_TOKENS,
}

# --- tokenizer / engine / sampler (one step) --------------------------------------------
INPUT_IDS = "input_ids"
INPUT_LENGTHS = "input_lengths"
SEQUENCE_IDS = "sequence_ids"
SEQUENCE_START = "sequence_start"
RELEASE_IDS = "release_ids"
LOGITS = "logits"
OUTPUT_IDS = "output_ids"

# --- defaults (documented in docs/API.md) -----------------------------------------------
DEFAULT_MAX_TOKENS = 64
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 0  # 0 = no top-k cut
DEFAULT_TOP_P = 1.0  # 1.0 = no nucleus cut
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_SEED = 0  # 0 = draw a fresh seed for the request

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"

# --- gauges of the gpt2 model (Triton's metrics port; docs/API.md) -----------------------
# What a replica holds now: the autoscaler scales on their sum (gpt2_load, deploy/k8s/), the drain
# before a pod stops waits for both to reach zero (gpt2_triton.drain).
ACTIVE_SEQUENCES_METRIC = "gpt2_active_sequences"  # sequences in the running batch
WAITING_REQUESTS_METRIC = "gpt2_waiting_requests"  # admitted requests queued to join it
