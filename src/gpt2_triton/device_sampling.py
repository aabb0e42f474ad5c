"""Next-token choice on the engine's device, for logits that are a torch tensor there.

The torch engine (``engines/torch_slots.py``) leaves each step's logits on its device.
Copying them to the host to sample there would move 200 KB a row each step (13 MB at
batch 64) and run the vocabulary passes on the CPU; here a step is a few batched tensor
operations over all rows on the device, and what crosses is small: each row's parameters
and one uniform number in (8 bytes a row per value), the chosen token ids out (8 bytes a
row). The order is ``sampling.py``'s: repetition penalty -> end-of-text suppression ->
temperature -> top-k -> top-p -> draw; greedy rows are the argmax of the adjusted row,
token-identical to the host sampler's.

Seeded streams stay the host sampler's: each sampled row takes one number from its own
generator (``TokenSampler.rng``) per token, drawn on the host (a handful of nanoseconds)
and sent with the step, so a seed gives the same stream whatever shares the batch, and a
call that fails puts every generator back. The draw itself is an inverse-CDF search on the
device, each row in its own order whatever shares the batch, the host sampler's: over the
whole distribution in token-id order (temperature alone), or sorted likeliest first with
top-k or top-p (a stable sort, so ties go to the lower token id as on the host). Both keep
exactly the k likeliest tokens (ties at the cut to the lower id) and the same nucleus, so
a seed draws the host's tokens (up to rounding at a boundary), except with top-p and no
top-k: the host reaches that nucleus by rejection, so the two draw different tokens from
the same distribution.

``sampling.sample_batch`` sends logits here when they are a tensor on a GPU; the tests run
this module on CPU tensors (the same operations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np

from gpt2_triton.device_copies import to_device_without_wait
from gpt2_triton.sampling import SamplingError, TokenSampler, launch_or_read

log = logging.getLogger(__name__)

_NO_TOP_P = 2.0  # a top_p no mass reaches: the row's nucleus is its whole distribution


def sample_batch(
    logits,
    samplers: Sequence[TokenSampler],
    suppressed: Sequence[int | None] | None = None,
) -> np.ndarray:
    """``sampling.sample_batch`` for a torch tensor of logits (B, vocab) on any device:
    the same contract (one token a row, observed by its sampler; SamplingError for a
    row with no finite maximum, with no draw taken and nothing observed)."""
    suppressed, sampled = _rows(logits, samplers, suppressed)
    with _draws(samplers, sampled) as uniforms:
        tokens = _choose(logits, samplers, suppressed, sampled, uniforms).cpu().numpy()
        failed = np.flatnonzero(tokens < 0)
        if failed.size:
            raise SamplingError(f"row {failed[0]} of the logits has no finite maximum")
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler.observe(int(token))
    return tokens


def sample_batch_ahead(
    logits,
    samplers: Sequence[TokenSampler],
    suppressed: Sequence[int | None] | None,
    launch: Callable,
) -> tuple[list[int | None], bool]:
    """``sample_batch``, but the tokens, still on the device, go to ``launch`` before the
    host waits for them: the engine's ``step_ahead``, which queues the next step behind
    them and returns them read (numpy). A row with no finite maximum is None (it fails
    alone) instead of failing the call. Returns the tokens and whether ``launch`` ran.
    Raises only before anything is launched, with every generator as it was; if
    ``launch`` raises, the tokens are read here (the engine then committed nothing) and
    the next step runs as usual. ``sampling.sample_batch_ahead`` sends GPU logits here."""
    suppressed, sampled = _rows(logits, samplers, suppressed)
    with _draws(samplers, sampled) as uniforms:
        tokens = _choose(logits, samplers, suppressed, sampled, uniforms)
    read, launched = launch_or_read(launch, tokens)
    chosen: list[int | None] = []
    for sampler, token in zip(samplers, read.tolist(), strict=True):
        try:
            if token < 0:  # no finite maximum: this row fails, the others go on
                raise SamplingError("its logits have no finite maximum")
            sampler.observe(token)
            chosen.append(token)
        except Exception:  # past the launch nothing may raise: this row fails alone
            log.exception("a row sampled ahead cannot go on")
            chosen.append(None)
    return chosen, launched


def _rows(logits, samplers, suppressed) -> tuple[list, list[int]]:
    """Each row's suppressed token (None: none) and the rows that draw (not greedy)."""
    batch = logits.shape[0]
    if len(samplers) != batch:
        raise ValueError(f"{len(samplers)} samplers for {batch} rows of logits")
    suppressed = suppressed if suppressed is not None else [None] * batch
    return suppressed, [row for row, s in enumerate(samplers) if not s.params.greedy]


@contextmanager
def _draws(samplers, sampled: list[int]):
    """One uniform for each drawing row from its own generator; if the block raises, every
    generator is put back as it was (no draw taken)."""
    states = [(samplers[r].rng.bit_generator, samplers[r].rng.bit_generator.state) for r in sampled]
    try:
        yield np.array([samplers[r].rng.random() for r in sampled], np.float64)
    except BaseException:
        for generator, state in reversed(states):  # reversed: a shared one ends as it began
            generator.state = state
        raise


def _choose(logits, samplers, suppressed, sampled: list[int], uniforms: np.ndarray):
    """Each row's token (an int64 tensor on the logits' device), -1 for a row with no
    finite maximum."""
    import torch

    device = logits.device
    work = _adjusted(logits, samplers, suppressed)
    if not sampled:
        return _likeliest(work)
    greedy = sorted(set(range(len(samplers))) - set(sampled))
    params = [samplers[row].params for row in sampled]
    vocab = work.shape[1]
    # one copy in: per sampled row 1/temperature, top_k, top_p, its uniform
    table = np.empty((4, len(sampled)), np.float64)
    table[0] = [1.0 / p.temperature for p in params]
    table[1] = [min(p.top_k, vocab) for p in params]
    table[2] = [p.top_p if p.top_p < 1.0 else _NO_TOP_P for p in params]
    table[3] = uniforms
    table = to_device_without_wait(table, device)
    inverse_temperature, top_k, top_p, uniform = table
    rows = to_device_without_wait(sampled, device)
    scaled = work[rows] * inverse_temperature.to(work.dtype)[:, None]  # (R, V)
    peak = scaled.max(dim=1).values
    finite = torch.isfinite(peak)
    scaled = torch.where(finite[:, None], scaled, torch.zeros_like(scaled))  # no NaN spreads
    if any(0 < p.top_k < vocab for p in params):  # top_k >= vocab keeps every token
        scaled = _keep_top_k(scaled, top_k.long(), min(max(p.top_k for p in params), vocab))
    probs = torch.softmax(scaled, dim=1).double()
    # Each row walks its distribution in the host sampler's order, whatever else is in
    # the batch: likeliest first with top-k or top-p (the host's top-k draw; top-p needs
    # the sorted nucleus), in token-id order otherwise (the host's draw over the whole
    # vocabulary). A row's token must not depend on its neighbours' parameters.
    # Only the ranked rows are sorted (the sort is the step's costliest pass).
    ranked = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    if len(ranked) < len(params):
        chosen = _inverse_cdf(probs, uniform)
    if ranked:
        at = to_device_without_wait(ranked, device) if len(ranked) < len(params) else slice(None)
        sorted_probs, order = probs[at].sort(dim=1, descending=True, stable=True)
        ahead = sorted_probs.cumsum(dim=1) - sorted_probs  # the mass of the tokens before each
        sorted_probs = sorted_probs * (ahead < top_p[at][:, None])
        by_rank = order.gather(1, _inverse_cdf(sorted_probs, uniform[at])[:, None])[:, 0]
        if len(ranked) < len(params):
            chosen[at] = by_rank
        else:
            chosen = by_rank
    tokens = torch.empty(len(samplers), dtype=torch.int64, device=device)
    tokens[rows] = torch.where(finite, chosen, torch.full_like(chosen, -1))
    if greedy:
        at = to_device_without_wait(greedy, device)
        tokens[at] = _likeliest(work[at])
    return tokens


def _likeliest(work):
    """Each row's likeliest token (the lowest id of a tie), -1 where the row has no finite
    maximum (max propagates a NaN, as the sampled rows' check sees it)."""
    import torch

    peak, token = work.max(dim=1)
    return torch.where(torch.isfinite(peak), token, torch.full_like(token, -1))


def _adjusted(logits, samplers, suppressed):
    """The logits with each row's repetition penalty and suppressed token applied (a copy
    when there is any; the engine's tensor is never written)."""
    import torch

    penalized = [
        r for r, s in enumerate(samplers) if s.counts is not None and s.counts.distinct.size
    ]
    silenced = [r for r, token in enumerate(suppressed) if token is not None]
    if not penalized and not silenced:
        return logits
    work = logits.clone()
    device = logits.device
    if penalized:  # CTRL's penalty on each row's distinct seen tokens, padded with a repeat
        widest = max(samplers[r].counts.distinct.size for r in penalized)
        seen = np.empty((len(penalized), widest), np.int64)
        for i, r in enumerate(penalized):
            distinct = samplers[r].counts.distinct
            seen[i, : distinct.size] = distinct
            seen[i, distinct.size :] = distinct[0]  # the same entry again: the same result
        factors = [samplers[r].params.repetition_penalty for r in penalized]
        rows = to_device_without_wait(penalized, device)[:, None]
        seen = to_device_without_wait(seen, device)
        penalty = to_device_without_wait(np.asarray(factors, np.float64), device).to(work.dtype)[
            :, None
        ]
        values = work[rows, seen]
        work[rows, seen] = torch.where(values > 0, values / penalty, values * penalty)
    if silenced:
        tokens = to_device_without_wait([suppressed[r] for r in silenced], device)
        work[to_device_without_wait(silenced, device), tokens] = float("-inf")
    return work


def _keep_top_k(scaled, top_k, largest: int):
    """Each row's k likeliest tokens (k = 0: all of them), exactly k: of the tokens tied
    with the k-th value, the lowest ids (the host sampler's rule)."""
    import torch

    values = torch.topk(scaled, largest, dim=1).values  # (R, largest), falling
    kth = values.gather(1, (top_k - 1).clamp(min=0)[:, None])  # (R, 1)
    above = scaled > kth
    tied = scaled == kth
    room = top_k[:, None] - above.sum(dim=1, keepdim=True)  # places left for the ties
    keep = above | (tied & (tied.cumsum(dim=1) <= room))
    keep |= top_k[:, None] == 0
    return scaled.masked_fill(~keep, float("-inf"))


def _inverse_cdf(probs, uniform):
    """Per row, the first entry whose cumulative mass passes ``uniform`` of the row's total,
    never one of zero mass (rounding at the very end falls back to the last one with mass)."""
    import torch

    cumulative = probs.cumsum(dim=1)
    total = cumulative[:, -1:].contiguous()
    index = torch.searchsorted(cumulative, uniform[:, None] * total, right=True)
    last = torch.searchsorted(cumulative, total)  # where the mass stops growing
    return torch.minimum(index, last)[:, 0]
