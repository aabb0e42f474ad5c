"""The GPU check's client half (run by gpu_check.sh against a running server).

Talks to the torch engine on CUDA through Triton: greedy agreement with Hugging Face on
the CPU (fp32 reference vs fp16 engine) and of concurrent streams with their solo output,
each held to verify's floor (half the prompts: fp16 near-ties flip some, a wrong engine
all), and time to first token / tokens/s at concurrency 1 and 8 (exit 1 on any error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from client import GenerationParams, Gpt2Client
from gpt2_triton.prompts import varied_prompts
from gpt2_triton.reference import greedy_text


def hf_greedy(model_dir: str, prompts: list[str], new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return [greedy_text(model, tokenizer, p, new_tokens) for p in prompts]


def load(url: str, concurrency: int, new_tokens: int) -> dict:
    """``concurrency`` streams of ``new_tokens`` tokens each, started together."""
    params = GenerationParams(max_tokens=new_tokens, min_length=new_tokens, temperature=0)
    ttft, totals, errors = [], [], []
    barrier = threading.Barrier(concurrency)

    def run(i: int) -> None:
        try:
            with Gpt2Client(url) as client:
                barrier.wait()
                stream = client.stream(varied_prompts(concurrency)[i], params)
                for _ in stream:
                    pass
                ttft.append(stream.result.time_to_first_token_s)
                totals.append(stream.result.total_s)
        except threading.BrokenBarrierError:
            pass  # another client failed first: its error is the one reported
        except Exception as exc:  # reported in the table
            errors.append(str(exc))
            barrier.abort()  # the others may wait at the barrier for this one

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "errors": errors,
        "ttft_ms_p50": 1e3 * statistics.median(ttft) if ttft else None,
        "inter_token_ms": 1e3
        * statistics.median((t - f) / (new_tokens - 1) for t, f in zip(totals, ttft, strict=True))
        if totals
        else None,
        "tokens_per_s": concurrency * new_tokens / wall if not errors else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--checkpoint", required=True, help="HF folder of the served model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    prompts = varied_prompts(8)
    with Gpt2Client(args.url) as client:
        client.wait_until_ready(120)
        info = client.model_info()
        served = [
            client.generate(p, GenerationParams(max_tokens=32, temperature=0)).text for p in prompts
        ]
    reference = hf_greedy(args.checkpoint, prompts, 32)
    concurrent: dict[int, str] = {}

    def solo(i: int) -> None:
        with Gpt2Client(args.url) as c:
            concurrent[i] = "".join(
                c.stream(prompts[i], GenerationParams(max_tokens=32, temperature=0))
            )

    threads = [threading.Thread(target=solo, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {
        "served": info,
        "greedy_equal_to_hf_cpu_fp32": sum(a == b for a, b in zip(served, reference, strict=True)),
        "concurrent_equal_to_solo": sum(concurrent[i] == served[i] for i in range(len(prompts))),
        "prompts": len(prompts),
        "load": [load(args.url, c, args.new_tokens) for c in (1, 8)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    n = len(prompts)
    lines = [
        f"engine: {info['engine']} (model {info['model']})",
        f"greedy equal to HF fp32 on CPU: {result['greedy_equal_to_hf_cpu_fp32']}/{n}",
        f"8 concurrent greedy streams equal to their solo text: "
        f"{result['concurrent_equal_to_solo']}/{n}",
        "",
        "| concurrency | TTFT p50 | inter-token | tokens/s | errors |",
        "|---|---|---|---|---|",
    ]
    for row in result["load"]:

        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        lines.append(
            f"| {row['concurrency']} | {fmt(row['ttft_ms_p50'], '.1f')} ms | "
            f"{fmt(row['inter_token_ms'], '.2f')} ms | "
            f"{fmt(row['tokens_per_s'], '.0f')} | {len(row['errors'])} |"
        )
    failures = check_failures(result)
    lines += ["", "FAIL: " + "; ".join(failures) if failures else "PASS"]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


def check_failures(result: dict) -> list[str]:
    """What fails the check: a load point with errors, or greedy text that parts from the
    reference (or from itself, batched) more often than fp16's rounding does: the floor
    verify holds a TensorRT plan to (half the sequences; an engine bound wrong misses
    all of them)."""
    from build_scripts.verify import FLOOR_GREEDY

    n, failures = result["prompts"], []
    for key, what in (
        ("greedy_equal_to_hf_cpu_fp32", "greedy text equal to HF fp32"),
        ("concurrent_equal_to_solo", "concurrent streams equal to their solo text"),
    ):
        if result[key] < FLOOR_GREEDY * n:
            failures.append(f"{what}: {result[key]}/{n} (the floor: {FLOOR_GREEDY:.0%})")
    for row in result["load"]:
        if row["errors"]:
            failures.append(f"c{row['concurrency']}: {row['errors'][0]}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
