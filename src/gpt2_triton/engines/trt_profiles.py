"""TensorRT optimization profiles, derived once from the serving limits.

Two profiles, one execution context each (switching a context's profile per call costs a
synchronisation):
- ``decode``: one new token per row, any past length - the hot path of every step;
- ``general``: any number of new tokens (prompts, and the rare multi-token append).
Every range comes from ``max_batch`` (the repository's MAX_SEQUENCES) and the model's
context window, so the profiles, the engine's checks and the server agree by
construction instead of by hard-coded numbers.
"""

from __future__ import annotations

from gpt2_triton.engines.shape import ModelShape

Dims = tuple[int, ...]
Profile = dict[str, tuple[Dims, Dims, Dims]]  # input -> (min, opt, max)

TYPICAL_PROMPT = 128  # the opt point of the prompt profile: what serving sees most
TYPICAL_PAST = 256  # the opt point of past length for decode steps


def optimization_profiles(shape: ModelShape, max_batch: int) -> dict[str, Profile]:
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    window = shape.max_positions
    batch = (1, max(1, max_batch // 2), max_batch)
    heads, head_dim = shape.num_heads, shape.head_dim

    def profile(seq: Dims, past: Dims) -> Profile:
        total = tuple(min(p + s, window) for p, s in zip(past, seq, strict=True))
        total = (max(total[0], 1), max(total[1], 1), window)
        tokens = tuple((b, s) for b, s in zip(batch, seq, strict=True))
        caches = tuple((b, heads, p, head_dim) for b, p in zip(batch, past, strict=True))
        ranges: Profile = {
            "input_ids": tokens,
            "position_ids": tokens,
            "attention_mask": tuple((b, t) for b, t in zip(batch, total, strict=True)),
        }
        for name in shape.past_names():
            ranges[name] = caches
        return ranges

    opt_past = min(TYPICAL_PAST, window - 1)
    opt_prompt = min(TYPICAL_PROMPT, window)
    return {
        "decode": profile(seq=(1, 1, 1), past=(0, opt_past, window - 1)),
        "general": profile(seq=(1, opt_prompt, window), past=(0, 0, window - 1)),
    }


def profile_for(new_tokens: int) -> str:
    return "decode" if new_tokens == 1 else "general"
