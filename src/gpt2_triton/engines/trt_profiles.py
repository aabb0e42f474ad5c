"""TensorRT optimization profiles, derived once from the serving limits.

Two profiles, one execution context each (switching a context's profile per call costs a
synchronisation):
- ``decode``: one new token per row on a cache of any length - the hot path of every step;
- ``prefill``: a prompt of any length on an empty cache (``StatefulEngine`` prefills every
  new sequence on its own, with no past, before merging it into the running batch).

Every corner of a profile (min, opt, max) is a shape the network can run:
``attention_mask`` is as long as past + new tokens, and that never exceeds the context
window. A single box that allowed any past *and* any number of new tokens would contain
corners like 1023 + 1024 positions, which no mask of at most 1024 can match; so a
multi-token step on a non-empty cache (which the server never sends) has no profile and is
refused by ``profile_for``. Every range comes from ``max_batch`` (the repository's
MAX_SEQUENCES) and the model's context window, so the profiles, the engine's checks and the
server agree by construction instead of by hard-coded numbers.
"""

from __future__ import annotations

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import EngineError

Dims = tuple[int, ...]
Profile = dict[str, tuple[Dims, Dims, Dims]]  # input -> (min, opt, max)

TYPICAL_PROMPT = 128  # the opt point of the prompt profile: what serving sees most
TYPICAL_PAST = 256  # the opt point of past length for decode steps
PROFILE_NAMES = ("decode", "prefill")  # order = profile index in the plan


def optimization_profiles(shape: ModelShape, max_batch: int) -> dict[str, Profile]:
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    window = shape.max_positions
    batch = (1, max(1, max_batch // 2), max_batch)
    heads, head_dim = shape.num_heads, shape.head_dim

    def profile(seq: Dims, past: Dims) -> Profile:
        total = tuple(p + s for p, s in zip(past, seq, strict=True))
        if max(total) > window:  # a corner no mask could match: a bug in the numbers below
            raise ValueError(f"profile corner {past} + {seq} exceeds the window {window}")
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
        "prefill": profile(seq=(1, opt_prompt, window), past=(0, 0, 0)),
    }


def profile_for(new_tokens: int, past_tokens: int) -> str:
    """The profile a step runs in: ``decode`` for one new token per row (any cache),
    ``prefill`` for several on an empty cache."""
    if new_tokens == 1:
        return "decode"
    if past_tokens == 0:
        return "prefill"
    raise EngineError(
        f"a step of {new_tokens} new tokens on a cache of {past_tokens} has no TensorRT "
        "profile: the plan runs prompts on an empty cache and one-token steps (what the "
        "server sends); send the tokens one per step"
    )
