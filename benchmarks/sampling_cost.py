"""What choosing the next token costs per step, before and after batched sampling.

    python -m benchmarks.sampling_cost [--seconds 2] [--batch 1 16]

Times one step's token choice for a batch of rows of GPT-2's vocabulary (50,257 logits a
row), no engine: greedy, temperature 0.8 + top_p 0.95, top_k 50, and repetition penalty
1.2 over a 192-token history, on two kinds of logits: those of the random-weight
GPT-2-small the benchmarks serve (normal, std 0.55, as measured on its ONNX export: nearly
flat, so the nucleus of 0.95 holds most of the vocabulary, the worst case of a top-p cut)
and a peaked distribution (std 3, a few hundred tokens hold most of the mass, closer to a
trained model). "before" is the per-row sampler this project used until this script was
written (copied below as it was); "after" is ``gpt2_triton.sampling.sample_batch``.
Prints the median time per step and per row. Medians over a few seconds per case: on a
shared machine, compare the two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import math
import secrets
import time
from collections.abc import Sequence

import numpy as np

from gpt2_triton.sampling import SamplingParams, TokenSampler, sample_batch

VOCAB = 50257
HISTORY = 192  # prompt + generated tokens the repetition penalty looks at
CASES = {
    "greedy": SamplingParams(temperature=0),
    "temperature 0.8, top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k 50": SamplingParams(top_k=50),
    "repetition_penalty 1.2": SamplingParams(repetition_penalty=1.2),
}
LOGITS_STD = {"random-weight model (flat)": 0.55, "peaked": 3.0}


# -- before: the per-row sampler as it was (src/gpt2_triton/sampling.py, commit 7d8b4f7) ----
class RowSampler:
    """One row at a time: a float64 copy of the vocabulary per row, a full logsumexp, and
    ``np.unique(history)`` per row for the repetition penalty."""

    NUCLEUS_CANDIDATES = 1024

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed or secrets.randbits(63))

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            logits = logits.copy()
            values, penalty = logits[seen], p.repetition_penalty
            logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        if p.greedy:
            return int(np.argmax(logits))
        return self._draw(logits.astype(np.float64) / p.temperature)

    def _draw(self, scaled: np.ndarray, whole_vocab: bool = False) -> int:
        p = self.params
        vocab = scaled.shape[0]
        sliced = False
        if 0 < p.top_k < vocab:
            candidates = np.argpartition(scaled, -p.top_k)[-p.top_k :]
            total = _logsumexp(scaled[candidates])
        elif p.top_p < 1.0 and vocab > self.NUCLEUS_CANDIDATES and not whole_vocab:
            candidates = np.argpartition(scaled, -self.NUCLEUS_CANDIDATES)[
                -self.NUCLEUS_CANDIDATES :
            ]
            total, sliced = _logsumexp(scaled), True
        else:
            candidates = np.arange(vocab)
            total = _logsumexp(scaled)
        top = scaled[candidates]
        if p.top_p < 1.0:
            order = np.argsort(-top, kind="stable")
            candidates, top = candidates[order], top[order]
            mass = np.cumsum(np.exp(top - total))
            if sliced and mass[-1] < p.top_p:
                return self._draw(scaled, whole_vocab=True)
            keep = min(int(np.searchsorted(mass, p.top_p)) + 1, candidates.size)
            candidates, top = candidates[:keep], top[:keep]
        probs = np.cumsum(np.exp(top - top.max()))
        index = int(np.searchsorted(probs, self.rng.random() * probs[-1], side="right"))
        return int(candidates[min(index, candidates.size - 1)])


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))


# -- the measurement ------------------------------------------------------------------------
def median_step_s(step, seconds: float) -> float:
    step()  # warm-up: first-touch allocations
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(params: SamplingParams, logits: np.ndarray, seconds: float) -> tuple[float, float]:
    """(before, after) median seconds per step for the rows of ``logits``."""
    rng = np.random.default_rng(1)
    histories = [list(rng.integers(0, VOCAB, HISTORY)) for _ in logits]
    rows = [RowSampler(params) for _ in logits]

    def before() -> None:
        for sampler, row, history in zip(rows, logits, histories, strict=True):
            history.append(sampler(row, history))
            history.pop()  # 192 tokens at every step (after: its counts grow by the draws)

    samplers = [TokenSampler(params, history) for history in histories]

    def after() -> None:
        sample_batch(logits, samplers)

    return median_step_s(before, seconds), median_step_s(after, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=1.0, help="per case and side")
    args = parser.parse_args(argv)
    print(
        "| logits | case | batch | before, per step | after, per step | after, per row | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, std in LOGITS_STD.items():
        for batch in args.batch:
            logits = (np.random.default_rng(0).normal(size=(batch, VOCAB)) * std).astype(np.float32)
            for case, params in CASES.items():
                before, after = measure(params, logits, args.seconds)
                print(
                    f"| {kind} | {case} | {batch} | {1e3 * before:.3f} ms | "
                    f"{1e3 * after:.3f} ms | {1e6 * after / batch:.0f} us | "
                    f"{before / after:.1f}x |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
