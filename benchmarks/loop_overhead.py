"""How much the generation loop's own Python work adds to each engine step, in process.

    python -m benchmarks.loop_overhead --model artifacts/models/gpt2-small-random

Runs ``InflightBatcher`` on the ONNX Runtime engine with ``concurrency`` greedy streams
(no Triton, sinks that only note when each piece comes) and prints the median step time,
the median engine time inside it, and the difference: sampling, detokenizing,
bookkeeping; then the wave's tokens/s and the gaps between a stream's pieces (the
scheduler's effect without Triton's). With ``--sampling`` the streams sample (temperature
0.8, top_p 0.95, seeded) instead; ``--prompt-tokens`` and ``--max-prefill-tokens`` set the
prompts and the prefill budget, ``--padded-cache`` runs ``StatefulEngine`` instead of the
in-place ``SlotEngine``.

    python -m benchmarks.loop_overhead --prompt-tokens 128 --max-prefill-tokens 128
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gpt2_triton import checkpoint
from gpt2_triton.batcher import BatcherLimits, InflightBatcher
from gpt2_triton.engines.factory import build_engine
from gpt2_triton.request import GenerationRequest
from gpt2_triton.sampling import SamplingParams
from gpt2_triton.text import TextCodec


class _EndSink:
    def __init__(self) -> None:
        self.done = False
        self.stamps: list[float] = []

    def send(self, output, final: bool) -> None:
        self.stamps.append(time.perf_counter())
        self.done = self.done or final

    def send_error(self, message: str) -> None:
        self.done = True

    def is_cancelled(self) -> bool:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/models/gpt2-small-random")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sampling", action="store_true", help="temperature 0.8, top_p 0.95")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="0: a 36-token prompt")
    parser.add_argument("--max-prefill-tokens", type=int, default=BatcherLimits.max_prefill_tokens)
    parser.add_argument("--padded-cache", action="store_true", help="StatefulEngine")
    args = parser.parse_args(argv)
    export_dir = checkpoint.artifacts_root() / "onnx" / checkpoint.resolve(args.model).slug
    engine = build_engine(
        "onnx", export_dir, max_sequences=args.concurrency, in_place=not args.padded_cache
    )
    codec = TextCodec(export_dir / "tokenizer")
    prompts = ["The cat sat on the mat and looked at the river. " * 3] * args.concurrency
    if args.prompt_tokens:
        from benchmarks.harness import prompt_ids

        tokenizer = checkpoint.load_tokenizer(checkpoint.resolve(args.model))
        prompts = [
            tokenizer.decode(prompt_ids(tokenizer, args.prompt_tokens, seed))
            for seed in range(args.concurrency)
        ]
    engine_times: list[float] = []
    step = engine.step

    def timed_step(*a, **k):
        started = time.perf_counter()
        out = step(*a, **k)
        engine_times.append(time.perf_counter() - started)
        return out

    engine.step = timed_step
    batcher = InflightBatcher(
        engine,
        codec,
        BatcherLimits(
            engine.shape.max_positions,
            codec.eos_token_id,
            args.concurrency,
            max_prefill_tokens=args.max_prefill_tokens,
        ),
    )
    _wave(batcher, prompts, args)  # warm-up: ONNX Runtime's first runs, the cache's pages
    engine_times.clear()
    sinks, step_times, wall = _wave(batcher, prompts, args)
    steps, inner = np.median(step_times[2:]), np.median(engine_times[2:])
    gaps = 1e3 * np.concatenate([np.diff(s.stamps) for s in sinks])
    print(
        f"{'sampling' if args.sampling else 'greedy'}, "
        f"concurrency {args.concurrency}: step {1e3 * steps:.2f} ms, engine "
        f"{1e3 * inner:.2f} ms, loop's own work {1e3 * (steps - inner):.2f} ms (medians)"
    )
    print(
        f"{len(step_times)} steps, {args.concurrency * args.new_tokens / wall:.0f} tokens/s; "
        f"gap between pieces p50 {np.median(gaps):.1f} ms, p99 {np.percentile(gaps, 99):.1f} "
        f"ms ({'padded' if args.padded_cache else 'in-place'} cache, prefill budget "
        f"{args.max_prefill_tokens})"
    )
    return 0


def _wave(batcher, prompts, args):
    """All prompts submitted at once, stepped until every stream has its final: the
    sinks, each step's time and the wave's wall time."""
    sinks = [_EndSink() for _ in prompts]
    wave_started = time.perf_counter()
    for seed, (sink, prompt) in enumerate(zip(sinks, prompts, strict=True), start=1):
        sampling = SamplingParams(temperature=0)
        if args.sampling:
            sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        batcher.submit(
            GenerationRequest(
                prompt,
                max_tokens=args.new_tokens,
                min_length=args.new_tokens,
                stream=True,
                sampling=sampling,
            ),
            sink,
        )
    step_times = []
    while not all(s.done for s in sinks):
        started = time.perf_counter()
        batcher.step()
        step_times.append(time.perf_counter() - started)
    return sinks, step_times, time.perf_counter() - wave_started


if __name__ == "__main__":
    raise SystemExit(main())
