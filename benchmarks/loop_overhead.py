"""How much the generation loop's own Python work adds to each engine step, in process.

    python -m benchmarks.loop_overhead --model artifacts/models/gpt2-small-random

Runs ``InflightBatcher`` on the ONNX Runtime engine with ``concurrency`` greedy streams
(no Triton, sinks that only note the end) and prints the median step time, the median
engine time inside it, and the difference: sampling, detokenizing, bookkeeping. With
``--sampling`` the streams sample (temperature 0.8, top_p 0.95, seeded) instead.
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

    def send(self, output, final: bool) -> None:
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
    args = parser.parse_args(argv)
    export_dir = checkpoint.artifacts_root() / "onnx" / checkpoint.resolve(args.model).slug
    engine = build_engine("onnx", export_dir, max_sequences=args.concurrency)
    codec = TextCodec(export_dir / "tokenizer")
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
        BatcherLimits(engine.shape.max_positions, codec.eos_token_id, args.concurrency),
    )
    sinks = [_EndSink() for _ in range(args.concurrency)]
    for seed, sink in enumerate(sinks, start=1):
        sampling = SamplingParams(temperature=0)
        if args.sampling:
            sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        batcher.submit(
            GenerationRequest(
                "The cat sat on the mat and looked at the river. " * 3,
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
    steps, inner = np.median(step_times[2:]), np.median(engine_times[2:])
    print(
        f"{'sampling' if args.sampling else 'greedy'}, "
        f"concurrency {args.concurrency}: step {1e3 * steps:.2f} ms, engine "
        f"{1e3 * inner:.2f} ms, loop's own work {1e3 * (steps - inner):.2f} ms (medians)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
