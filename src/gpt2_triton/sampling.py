"""Next-token choice from logits: repetition penalty -> temperature -> top-k -> top-p -> draw.

Each request owns its random generator, seeded from its ``seed``: the same seed gives the
same tokens whatever else shares the batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpt2_triton import names
from gpt2_triton.errors import RequestValidationError

# The nucleus (top-p) cut sorts a candidate set; sorting the whole 50k vocabulary per row
# per step costs milliseconds, so look at the largest logits first and widen only when
# they do not hold top_p of the mass.
_NUCLEUS_CANDIDATES = 1024
MAX_SEED = 2**64 - 1


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


class TokenSampler:
    """One request's sampling state: its parameters and its random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed or secrets.randbits(63)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Choose the next token from one row of logits ``(vocab,)``."""
        p = self.params
        if p.repetition_penalty != 1.0 and len(history):
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        return self._draw(logits.astype(np.float64) / p.temperature)

    def _draw(self, scaled: np.ndarray, whole_vocab: bool = False) -> int:
        p = self.params
        vocab = scaled.shape[0]
        sliced = False  # True when the candidates may miss part of the nucleus
        if 0 < p.top_k < vocab:
            candidates = np.argpartition(scaled, -p.top_k)[-p.top_k :]
            total = _logsumexp(scaled[candidates])  # top-p then cuts the top-k distribution
        elif p.top_p < 1.0 and vocab > _NUCLEUS_CANDIDATES and not whole_vocab:
            candidates = np.argpartition(scaled, -_NUCLEUS_CANDIDATES)[-_NUCLEUS_CANDIDATES:]
            total, sliced = _logsumexp(scaled), True
        else:
            candidates = np.arange(vocab)
            total = _logsumexp(scaled)
        top = scaled[candidates]
        if p.top_p < 1.0:
            order = np.argsort(-top, kind="stable")
            candidates, top = candidates[order], top[order]
            mass = np.cumsum(np.exp(top - total))
            if sliced and mass[-1] < p.top_p:  # flat distribution: the nucleus is wider
                return self._draw(scaled, whole_vocab=True)
            keep = min(int(np.searchsorted(mass, p.top_p)) + 1, candidates.size)
            candidates, top = candidates[:keep], top[:keep]
        probs = np.cumsum(np.exp(top - top.max()))
        index = int(np.searchsorted(probs, self.rng.random() * probs[-1], side="right"))
        return int(candidates[min(index, candidates.size - 1)])


def sample_rows(
    logits: np.ndarray, params: SamplingParams, histories: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """One token per row of ``logits`` (B, vocab) with shared parameters (one generator)."""
    sampler = TokenSampler(params)
    histories = histories if histories is not None else [()] * logits.shape[0]
    return np.array(
        [sampler(row, seen) for row, seen in zip(logits, histories, strict=True)], np.int64
    )


def apply_repetition_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float
) -> np.ndarray:
    """CTRL-style penalty on every token already seen: positive logits shrink, negative grow."""
    seen = np.unique(np.asarray(history, dtype=np.int64))
    out = logits.copy()
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))
