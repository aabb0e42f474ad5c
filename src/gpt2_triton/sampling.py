"""Next-token choice for a whole step: repetition penalty -> temperature -> top-k -> top-p -> draw.

``sample_batch`` chooses one token for each row of a step's logits ``(B, vocab)``, in one
call per step. Greedy rows are the argmax of their row. A sampled row costs a handful of
array passes over its vocabulary (scale by 1/temperature, penalty and suppression on a few
entries, max, then ``exp`` and sums over blocks of 256 tokens unless top_k is set), with
no copy in float64, no sort and no cumulative sum over the vocabulary, then a draw with
its own generator:

- temperature alone: an inverse-CDF walk over the ~200 block sums, then inside one block.
- top_p: the same walk over the whole distribution, the token kept when it lies in the
  nucleus (the mass of the tokens ahead of it is below top_p of the total: one pass over
  the row). This rejection sampling gives the nucleus' own distribution exactly, and a try
  fails with probability at most 1 - top_p however flat the distribution, where listing
  the nucleus of a random-weight model (~90% of the vocabulary at top_p 0.95) means a
  sort of milliseconds. After a few failed tries (a small top_p) the nucleus is listed:
  the likeliest 1024 tokens, four times as many until they hold top_p.
- top_k: the k likeliest tokens, picked by their scaled logits among those above a
  threshold guessed from every 16th token (and checked), so that only those k go through
  ``exp``; top_p then cuts the top-k distribution (as Hugging Face and TensorRT-LLM do).

top-k keeps exactly the k likeliest tokens, top-p the smallest set of likeliest tokens
whose mass reaches top_p of the total. Ties at a cut go to the lower token id (what a stable
sort by falling probability gives). Masses are float32 sums: a token whose cumulative mass
lies within ~1e-6 of the total from the cut may fall on either side of it.

Each request owns its random generator, seeded from its ``seed``: the same seed gives the
same tokens whatever else shares the batch. A sampled token takes one number from it (a
top-p draw one per try), a greedy one none; a call that fails puts every generator back
as it was. The repetition penalty reads the tokens a sequence has seen (prompt and drawn)
from counts kept as tokens arrive (``TokenCounts``), not from its history.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gpt2_triton import names
from gpt2_triton.errors import Gpt2TritonError, RequestValidationError

log = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1

_BLOCK = 256  # tokens per block of an inverse-CDF walk: ~200 blocks for GPT-2's 50,257
_SUBSAMPLE = 16  # every 16th token guesses a top-k threshold
_NUCLEUS_TRIES = 4  # rejection tries before listing the nucleus (top_p 0.95: 6e-6 get there)
_NUCLEUS_CANDIDATES = 1024  # the first candidate set when the nucleus is listed


# A temperature this low is greedy in all but name; as vLLM does, it is taken as 0 (below
# ~1e-38, 1 / t overflows float32 and the row could not be sampled at all).
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingError(Gpt2TritonError):
    """A row cannot be sampled (logits that are NaN, +inf or all -inf)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = names.DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int = names.DEFAULT_TOP_K  # 0 = off
    top_p: float = names.DEFAULT_TOP_P  # 1.0 = off
    repetition_penalty: float = names.DEFAULT_REPETITION_PENALTY  # 1.0 = off
    seed: int = names.DEFAULT_SEED  # 0 = a fresh random seed

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise RequestValidationError(
                f"{names.TEMPERATURE} must be in [0, 100] (0 = greedy), got {self.temperature}"
            )
        if self.temperature < GREEDY_BELOW_TEMPERATURE:  # 1 / t would overflow float32
            object.__setattr__(self, "temperature", 0.0)
        if self.top_k < 0:
            raise RequestValidationError(f"{names.TOP_K} must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestValidationError(f"{names.TOP_P} must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10):
            raise RequestValidationError(
                f"{names.REPETITION_PENALTY} must be in (0, 10] (1 = off), got "
                f"{self.repetition_penalty}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise RequestValidationError(f"{names.SEED} must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenCounts:
    """How often each token occurred in one sequence, updated as each token arrives.

    The repetition penalty needs the distinct tokens seen so far every step; recounting the
    history (``np.unique``) each step would cost O(length log length) per row per step.
    """

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.counts: dict[int, int] = {}
        self._distinct = np.empty(64, np.int64)  # first-seen order; grows by doubling
        self._size = 0
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        token = int(token)
        seen = self.counts.get(token, 0)
        self.counts[token] = seen + 1
        if seen:
            return
        if self._size == self._distinct.size:
            self._distinct = np.concatenate([self._distinct, np.empty_like(self._distinct)])
        self._distinct[self._size] = token
        self._size += 1

    @property
    def distinct(self) -> np.ndarray:
        """The distinct tokens seen, in first-seen order (a view: do not keep it)."""
        return self._distinct[: self._size]


class TokenSampler:
    """One sequence's sampling state: its parameters, random generator and token counts.

    ``prompt_ids`` start the counts the repetition penalty reads (kept only when it is on);
    every token this sampler draws is added to them. ``rng`` lets several rows share one
    generator (the stateless ``sampler`` model); by default each sampler has its own.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Iterable[int] = (),
        rng: np.random.Generator | None = None,
    ) -> None:
        self.params = params
        self.rng = (
            rng if rng is not None else np.random.default_rng(params.seed or secrets.randbits(63))
        )
        self.counts = TokenCounts(prompt_ids) if params.repetition_penalty != 1.0 else None

    def __call__(self, logits: np.ndarray, suppressed: int | None = None) -> int:
        """Choose the next token from one row of logits ``(vocab,)``."""
        return int(sample_batch(logits[np.newaxis], [self], [suppressed])[0])

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts.add(token)


def sample_batch(
    logits: np.ndarray,
    samplers: Sequence[TokenSampler],
    suppressed: Sequence[int | None] | None = None,
) -> np.ndarray:
    """One token per row of ``logits`` (B, vocab), row i chosen by ``samplers[i]``.

    ``suppressed[i]``, when not None, is a token row i must not produce (end-of-text before
    ``min_length``). Each sampler observes the token it produced. Raises SamplingError for
    a row, greedy or sampled, whose logits have no finite maximum; a call that raises leaves every
    sampler as it was (no draw taken, nothing observed). Logits that are a torch tensor
    on a GPU (the torch engine's) are sampled there (``device_sampling.py``); on the CPU
    they are read here as they are (a numpy view, no copy).
    """
    if not isinstance(logits, np.ndarray):
        if logits.device.type != "cpu":
            from gpt2_triton import device_sampling

            return device_sampling.sample_batch(logits, samplers, suppressed)
        logits = logits.numpy()
    batch = logits.shape[0]
    if len(samplers) != batch:
        raise ValueError(f"{len(samplers)} samplers for {batch} rows of logits")
    suppressed = suppressed if suppressed is not None else [None] * batch
    tokens = np.empty(batch, np.int64)
    sampled = []
    for row, sampler in enumerate(samplers):
        if sampler.params.greedy:
            tokens[row] = _argmax(logits[row], sampler, suppressed[row])
            if tokens[row] < 0:  # before any draw: nothing taken, nothing observed
                raise SamplingError(f"row {row} of the logits has no finite maximum")
        else:
            sampled.append(row)
    if sampled:
        tokens[sampled] = _sample_rows(logits, sampled, samplers, suppressed)
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler.observe(int(token))
    return tokens


def sample_batch_ahead(
    logits, samplers: Sequence[TokenSampler], suppressed, launch: Callable
) -> tuple[list[int | None], bool]:
    """``sample_batch`` for a torch tensor of logits, whose tokens go, as a tensor on the
    logits' device, to ``launch`` (the engine's ``step_ahead``) before they are read;
    returns them (None for a row that could not be sampled) and whether ``launch`` ran.
    GPU logits: ``device_sampling.sample_batch_ahead``. CPU logits are sampled here as
    ``sample_batch`` samples them, so that a seeded stream does not depend on whether its
    steps ran ahead (the two samplers reach top-p differently: one seed, other tokens).
    Raises only before anything was launched, with every sampler as it was."""
    import torch

    if logits.device.type != "cpu":
        from gpt2_triton import device_sampling

        return device_sampling.sample_batch_ahead(logits, samplers, suppressed, launch)
    tokens = sample_batch(logits, samplers, suppressed)
    read, launched = launch_or_read(launch, torch.from_numpy(tokens))
    return read.tolist(), launched


def launch_or_read(launch: Callable, tokens) -> tuple[np.ndarray, bool]:
    """``launch(tokens)`` (the tokens as the engine read them, having queued the next step
    behind them) and True; if it raises, the engine committed nothing: the tokens read here
    and False, and the next step runs as usual."""
    try:
        return launch(tokens), True
    except Exception as exc:
        log.warning("decoding ahead failed (%s); the next step runs as usual", exc)
        return tokens.cpu().numpy(), False


def sample_rows(
    logits: np.ndarray, params: SamplingParams, histories: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """One token per row of ``logits`` (B, vocab) with shared parameters (one generator)."""
    histories = histories if histories is not None else [()] * logits.shape[0]
    rng = np.random.default_rng(params.seed or secrets.randbits(63))
    samplers = [TokenSampler(params, seen, rng) for seen in histories]
    return sample_batch(logits, samplers)


def penalize_repeats(row: np.ndarray, seen: np.ndarray | Sequence[int], penalty: float) -> None:
    """CTRL's repetition penalty on the tokens in ``seen``, in place: a positive logit is
    divided by ``penalty``, a negative one multiplied (both go down for a penalty > 1)."""
    seen = np.asarray(seen, dtype=np.int64)
    values = row[seen]
    row[seen] = np.where(values > 0, values / penalty, values * penalty)


def _argmax(row: np.ndarray, sampler: TokenSampler, suppressed: int | None) -> int:
    """The likeliest token; -1 where the row has no finite maximum (NaN, +inf, all -inf),
    which fails a greedy row as it fails a sampled one, never passing for token 0."""
    if sampler.counts is not None or suppressed is not None:
        row = row.copy()  # one row (200 KB for GPT-2): the engine's logits stay as they came
        _adjust(row, sampler, suppressed)
    token = int(np.argmax(row))  # a NaN's own place, if there is one
    return token if np.isfinite(row[token]) else -1


def _adjust(row: np.ndarray, sampler: TokenSampler, suppressed: int | None) -> None:
    if sampler.counts is not None and sampler.counts.distinct.size:
        penalize_repeats(row, sampler.counts.distinct, sampler.params.repetition_penalty)
    if suppressed is not None:
        row[suppressed] = -np.inf


def _sample_rows(
    logits: np.ndarray,
    rows: Sequence[int],
    samplers: Sequence[TokenSampler],
    suppressed: Sequence[int | None],
) -> list[int]:
    """One token for each of ``logits[rows]`` (rows whose temperature is above 0).

    If any row fails, every generator is put back as it was: the call has taken no draw.
    """
    # One row's work at a time in one buffer, which stays in the L2 cache (200 KB for
    # GPT-2): the same passes over a (16, 50257) array at once stream 3.2 MB through
    # memory each, 2.1 ms a step against 1.45 ms row by row (benchmarks/sampling_cost.py).
    # The buffer runs on to whole blocks with a tail of zeros (no mass), so the block sums
    # are one reduction over a (blocks, _BLOCK) view: 5 us against np.add.reduceat's 11.
    vocab = logits.shape[1]
    padded = np.zeros(-(-vocab // _BLOCK) * _BLOCK, np.float32)
    work, blocks = padded[:vocab], padded.reshape(-1, _BLOCK)
    states = []  # (generator, its state before this call's draws)
    tokens = []
    try:
        for row in rows:
            sampler = samplers[row]
            # temperature before the penalty gives what after would: both multiply a
            # logit by a positive factor
            np.multiply(logits[row], np.float32(1.0 / sampler.params.temperature), out=work)
            _adjust(work, sampler, suppressed[row])
            peak = work.max()
            if not np.isfinite(peak):
                raise SamplingError(f"row {row} of the logits has no finite maximum ({peak})")
            states.append((sampler.rng.bit_generator, sampler.rng.bit_generator.state))
            if 0 < sampler.params.top_k < work.size:
                tokens.append(_draw_top_k(work, sampler))
                continue
            np.subtract(work, peak, out=work)
            probs = np.exp(work, out=work)  # unnormalised: the likeliest token has 1.0
            tokens.append(_draw(probs, np.einsum("ij->i", blocks), sampler))
    except BaseException:
        for generator, state in reversed(states):  # reversed: a shared one ends as it began
            generator.state = state
        raise
    return tokens


def _draw_top_k(scaled: np.ndarray, sampler: TokenSampler) -> int:
    """One token among the top_k likeliest of a row of scaled logits ``(vocab,)``: the
    logits pick them (exp keeps the order), and only those k go through exp."""
    params = sampler.params
    kept = _likeliest(scaled, params.top_k)
    weights = np.exp(scaled[kept] - scaled[kept[0]])  # kept[0] is the likeliest
    if params.top_p < 1.0:  # top_p of the top-k mass: its smallest prefix reaching it
        cumulative = np.cumsum(weights, dtype=np.float64)
        size = int(np.searchsorted(cumulative, params.top_p * cumulative[-1])) + 1
        kept, weights = kept[:size], weights[:size]
    return _draw_among(kept, weights, sampler.rng.random())


def _draw(probs: np.ndarray, blocks: np.ndarray, sampler: TokenSampler) -> int:
    """One token from a row's unnormalised probabilities ``probs`` (vocab,), float32, and
    their sums over blocks of _BLOCK tokens, without top_k."""
    params, rng = sampler.params, sampler.rng
    walk = _BlockWalk(probs, blocks)
    if params.top_p == 1.0:
        return walk.token(rng.random())
    # Rejection (see the module's docstring): a try costs one pass over the row and fails
    # with probability at most 1 - top_p.
    target = params.top_p * walk.total
    for _ in range(_NUCLEUS_TRIES):
        token = walk.token(rng.random())
        if _mass_before(probs, token) < target:
            return token
    # a small top_p: list the nucleus (small then, unless the distribution is flat)
    nucleus = _nucleus(probs, target)
    return _draw_among(nucleus, probs[nucleus], rng.random())


class _BlockWalk:
    """Inverse-CDF draws over the whole vocabulary in two short walks: the cumulative
    mass of blocks of _BLOCK tokens, then within the chosen block; no cumsum over the
    whole vocabulary."""

    def __init__(self, probs: np.ndarray, blocks: np.ndarray) -> None:
        self.probs = probs
        self.cumulative = np.cumsum(blocks, dtype=np.float64)
        self.total = float(self.cumulative[-1])
        self.last_block = _last_with_mass(self.cumulative)

    def token(self, uniform: float) -> int:
        target = uniform * self.total
        block = min(int(np.searchsorted(self.cumulative, target, "right")), self.last_block)
        start = block * _BLOCK
        inside = np.cumsum(self.probs[start : start + _BLOCK], dtype=np.float64)
        # the target past the blocks before this one (not below 0: they hold at most it)
        target -= float(self.cumulative[block - 1]) if block else 0.0
        return start + _index_at(inside, target)


def _mass_before(probs: np.ndarray, token: int) -> float:
    """The mass of the tokens ahead of ``token`` in the order "likeliest first, equal
    ones by id": ``token`` is in the nucleus when it is below top_p of the total."""
    value = probs[token]
    likelier = float(probs @ (probs > value))  # a dot: 2-3x faster than a masked sum
    return likelier + float(value) * np.count_nonzero(probs[:token] == value)


def _likeliest(values: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` tokens of largest ``values`` (probabilities or logits), largest
    first, equal ones by id."""
    if count >= values.size:
        candidates = np.arange(values.size)
    else:
        candidates = _at_least(values, count)
    return candidates[np.argsort(-values[candidates], kind="stable")[:count]]


def _at_least(values: np.ndarray, count: int) -> np.ndarray:
    """Tokens, in id order, holding the ``count`` of largest ``values`` (ties included),
    and not many more: a threshold guessed from every _SUBSAMPLE-th token (the partition
    of a full row costs ~25 argmaxes), checked, and exact when the guess falls short."""
    sample = values[::_SUBSAMPLE]
    rank = min(sample.size - 1, count * 3 // (2 * _SUBSAMPLE) + 4)  # ~1.5x count expected
    guess = np.partition(sample, sample.size - 1 - rank)[sample.size - 1 - rank]
    candidates = np.flatnonzero(values >= guess)
    if candidates.size >= count:
        return candidates
    threshold = np.partition(values, values.size - count)[values.size - count]
    return np.flatnonzero(values >= threshold)


def _nucleus(probs: np.ndarray, target: float) -> np.ndarray:
    """The smallest set of likeliest tokens holding ``target`` mass, likeliest first:
    candidates from the top, four times as many each time they hold too little."""
    count = _NUCLEUS_CANDIDATES
    while True:
        candidates = _likeliest(probs, count)
        cumulative = np.cumsum(probs[candidates], dtype=np.float64)
        if cumulative[-1] >= target or candidates.size == probs.size:
            return candidates[: int(np.searchsorted(cumulative, target)) + 1]
        count *= 4


def _draw_among(kept: np.ndarray, weights: np.ndarray, uniform: float) -> int:
    """The token of ``kept`` at ``uniform`` of their cumulative ``weights``."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    return int(kept[_index_at(cumulative, uniform * cumulative[-1])])


def _index_at(cumulative: np.ndarray, target: float) -> int:
    """The first entry whose cumulative mass passes ``target``: never one of zero mass
    (a suppressed token). Rounding can leave ``target`` at the very end (masses summed in
    another order, a uniform just below 1): then the last entry with mass."""
    return min(int(np.searchsorted(cumulative, target, "right")), _last_with_mass(cumulative))


def _last_with_mass(cumulative: np.ndarray) -> int:
    """The last entry of ``cumulative`` that adds mass (where it stops growing)."""
    return int(np.searchsorted(cumulative, cumulative[-1]))
