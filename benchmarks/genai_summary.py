"""One table from genai-perf's exports (``make bench-genai`` prints it).

    python -m benchmarks.genai_summary artifacts/bench/genai

Reads each ``profile_export_genai_perf.json`` under the folder (one per endpoint and
concurrency) and prints a Markdown table of the numbers genai-perf reports for a streaming
LLM endpoint: Triton's own (kserve, gRPC) and the OpenAI API's (completions, chat).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    found = []
    for path in sorted(Path(folder).rglob("profile_export_genai_perf.json")):
        match = re.search(r"concurrency(\d+)", str(path))
        openai = re.search(r"-openai-(\w+)-concurrency", path.parent.name)
        data = json.loads(path.read_text())
        found.append(
            {
                "endpoint": f"OpenAI {openai.group(1)}" if openai else "kserve (gRPC)",
                "concurrency": int(match.group(1)) if match else None,
                "requests": data["request_count"]["avg"],
                "ttft_p50": data["time_to_first_token"]["p50"],
                "ttft_p99": data["time_to_first_token"]["p99"],
                "itl_p50": data["inter_token_latency"]["p50"],
                "itl_p99": data["inter_token_latency"]["p99"],
                "latency_p50": data["request_latency"]["p50"],
                "latency_p99": data["request_latency"]["p99"],
                "tokens_per_s": data["output_token_throughput"]["avg"],
                "output_tokens": data["output_sequence_length"]["avg"],
            }
        )
    return sorted(
        found,
        key=lambda r: (r["endpoint"] != "kserve (gRPC)", r["endpoint"], r["concurrency"] or 0),
    )


def table(found: list[dict]) -> str:
    lines = [
        "| endpoint | concurrency | requests | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
        "latency p50 | latency p99 | output tokens/s | output tokens (re-tokenized) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        lines.append(
            f"| {r['endpoint']} | {r['concurrency']} | {r['requests']:.0f} | "
            f"{r['ttft_p50']:.1f} ms | {r['ttft_p99']:.1f} ms | "
            f"{r['itl_p50']:.2f} ms | {r['itl_p99']:.2f} ms | "
            f"{r['latency_p50']:.0f} ms | {r['latency_p99']:.0f} ms | "
            f"{r['tokens_per_s']:.0f} | {r['output_tokens']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    folder = Path(args[0] if args else "artifacts/bench/genai")
    found = rows(folder)
    if not found:
        print(f"error: no genai-perf exports under {folder}", file=sys.stderr)
        return 2
    print(table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
