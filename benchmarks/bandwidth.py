"""The weights' read time of a decode step: how fast this machine reads the weights.

    python -m benchmarks.bandwidth --model artifacts/models/gpt2-small-random

At batch 1 a decode step reads every weight once and does little arithmetic per byte, so
its time is about (weight bytes) / (read bandwidth) per token. This times ``threads``
threads reading, together, a float32 array as large as the checkpoint's fp32 weights
(numpy releases the GIL in the reduction, so they run in parallel), and reports GB/s and
that read time. It is a yardstick, not a bound: the engines' own reads have beaten it
(0.74-0.83x of it for the fp32 engines in the run of 2026-11-29 01:58,
docs/BENCHMARKS.md). The read is a bitwise OR over the array as 64-bit words, the
lightest reduction numpy has: in one check on one thread (a shared machine), a float32
sum ran only ~2x faster in cache than memory delivers and read 13 GB/s from memory where
the OR read 16 (4x in cache), so a sum would understate the bandwidth. The harness
measures it beside its runs so that every engine's single-stream inter-token latency is
read as a multiple of it.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 1 << 21  # 64-bit words per reduction call (16 MB): long calls, little Python per byte
ONES = np.ones(2, dtype=np.float32).view(np.uint64)[0]  # a word of two float32 ones


def streamed_weight_bytes(model_dir: Path) -> int:
    """Bytes of fp32 weights a decode step reads: every tensor of the checkpoint's
    safetensors files (a tied lm_head is stored once and read once, as the token
    embedding), except the position embedding, of which a step reads one row."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__" or "wpe" in name:
                continue
            count = int(np.prod(entry["shape"]))
            total += 4 * count  # as fp32, whatever the file stores
    return total


def measure(nbytes: int, threads: int, seconds: float = 1.0) -> dict:
    """Read bandwidth in GB/s (1e9 bytes): passes of ``threads`` threads each reading its
    share of an ``nbytes`` float32 array (16 MB at least, so that a pass outlasts starting
    its threads), repeated for about ``seconds``; the median and the best pass."""
    floats = np.ones(max(nbytes // 8, CHUNK) * 2, dtype=np.float32)  # ones: pages touched
    data = floats.view(np.uint64)
    bounds = np.linspace(0, data.size, threads + 1).astype(int)  # an equal share each
    sink = np.zeros(threads, dtype=np.uint64)

    def read(i: int) -> None:
        word = np.uint64(0)
        for start in range(bounds[i], bounds[i + 1], CHUNK):
            word |= np.bitwise_or.reduce(data[start : min(start + CHUNK, bounds[i + 1])])
        sink[i] = word

    def one_pass() -> float:
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - started

    one_pass()  # warm-up: threads, caches, frequency
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        times.append(one_pass())
    if any(word != ONES for word in sink):  # the results are used: nothing skipped
        raise RuntimeError("bandwidth probe read something else than the ones it wrote")
    return {
        "gb_per_s": data.nbytes / float(np.median(times)) / 1e9,
        "gb_per_s_best": data.nbytes / min(times) / 1e9,
        "bytes": int(data.nbytes),
        "threads": threads,
        "passes": len(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/models/gpt2-small-random"))
    parser.add_argument("--threads", type=int, default=0, help="0: all CPUs")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    nbytes = streamed_weight_bytes(args.model)
    if not nbytes:
        print(f"error: no *.safetensors weights in {args.model}")
        return 2
    result = measure(nbytes, args.threads or os.cpu_count() or 1, args.seconds)
    read_ms = 1e3 * nbytes / (result["gb_per_s"] * 1e9)
    print(
        f"{nbytes / 1e6:.0f} MB of fp32 weights; read at {result['gb_per_s']:.1f} GB/s "
        f"(best pass {result['gb_per_s_best']:.1f}) with {result['threads']} threads: "
        f"fp32 read time {read_ms:.2f} ms per token"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
