"""Turn the harness's results into docs/BENCHMARKS.md tables, ratios and PNG plots."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from gpt2_triton.export import INT8_ACCURACY_LEVEL, INT8_BLOCK


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def _index(rows):
    return {(r["system"], r["concurrency"], r["prompt_tokens"]): r for r in rows}


def ratio_rows(results: dict) -> list[str]:
    """(c) over (a) and (b), per engine, concurrency and prompt length; the column against
    (a) only when the run measured it (not with --skip-hf)."""
    rows = results["rows"]
    by = _index(rows)
    with_hf = any(r["system"] == "hf-generate" for r in rows)
    header = "| service | concurrency | prompt | ITL vs ONNX loop | TTFT vs ONNX loop | "
    header += "tokens/s vs ONNX loop |" + (" tokens/s vs HF generate |" if with_hf else "")
    lines = [header, "|---" * (7 if with_hf else 6) + "|"]
    for r in rows:
        if r["system"].partition(":")[0] not in SERVICE_PATHS:
            continue
        key = (r["concurrency"], r["prompt_tokens"])
        # the raw loop on the same file: int8 for the int8 engine, fp32 otherwise
        int8 = r["system"].endswith(":onnx-int8") and ("onnxruntime-loop:int8", *key) in by
        loop = by.get(("onnxruntime-loop:int8" if int8 else "onnxruntime-loop", *key))
        hf = by.get(("hf-generate", *key))
        cells = [
            _times(_ratio(r["itl_ms_p50"], loop and loop["itl_ms_p50"])),
            _times(_ratio(r["ttft_ms_p50"], loop and loop["ttft_ms_p50"])),
            _times(_ratio(r["tokens_per_s"], loop and loop["tokens_per_s"])),
        ]
        if with_hf:
            cells.append(_times(_ratio(r["tokens_per_s"], hf and hf["tokens_per_s"])))
        lines.append(f"| {r['system']} | {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def _times(ratio) -> str:
    """A ratio as "1.23x", or "-" when one side is missing."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def _against_direct(results: dict, paths: tuple[str, ...]):
    """(path, engine, (concurrency, prompt), row, the same point's ``triton:<engine>`` row)
    for each row of ``paths`` that has its direct counterpart in the run."""
    by = _index(results["rows"])
    for r in results["rows"]:
        path, _, engine = r["system"].partition(":")
        if path not in paths:
            continue
        key = (r["concurrency"], r["prompt_tokens"])
        direct = by.get((f"triton:{engine}", *key))
        if direct is not None:
            yield path, engine, key, r, direct


def front_door_rows(results: dict) -> list[str]:
    """The cost of each path (the front door; the OpenAI API behind it) against straight
    to Triton, same run."""
    lines = [
        "| path | engine | concurrency | prompt | ITL p50 direct | ITL p50 this path | "
        "difference | TTFT p50 difference | tokens/s this path / direct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path, engine, key, r, direct in _against_direct(results, ("front-door", "openai")):
        # a path whose every stream came in one piece has no ITL (harness.stream_itl_ms)
        lines.append(
            f"| {path} | {engine} | {key[0]} | {key[1]} | {_fmt(direct['itl_ms_p50'], '.2f')} ms | "
            f"{_fmt(r['itl_ms_p50'], '.2f')} ms | "
            f"{_fmt(_difference(r['itl_ms_p50'], direct['itl_ms_p50']), '+.2f')} ms | "
            f"{_fmt(_difference(r['ttft_ms_p50'], direct['ttft_ms_p50']), '+.1f')} ms | "
            f"{_fmt(_ratio(r['tokens_per_s'], direct['tokens_per_s']), '.3f')} |"
        )
    return lines if len(lines) > 2 else []


def sampling_rows(results: dict) -> list[str]:
    """The service sampling (temperature 0.8, top_p 0.95) against greedy, same run; with
    the lowest and highest ratio of a sampled wave to the same round's greedy wave (every
    wave carries the same tokens), which says how much one run's ratio can move."""
    lines = [
        "| engine | concurrency | prompt | tokens/s greedy | tokens/s sampled | "
        "sampled / greedy | per round, min-max | ITL p50 greedy | ITL p50 sampled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, engine, key, r, greedy in _against_direct(results, ("triton-sampled",)):
        lines.append(
            f"| {engine} | {key[0]} | {key[1]} | {_fmt(greedy['tokens_per_s'], '.0f')} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | "
            f"{_fmt(_ratio(r['tokens_per_s'], greedy['tokens_per_s']), '.3f')} | "
            f"{_round_range(greedy.get('wave_s'), r.get('wave_s'))} | "
            f"{_fmt(greedy['itl_ms_p50'], '.2f')} ms | {_fmt(r['itl_ms_p50'], '.2f')} ms |"
        )
    return lines if len(lines) > 2 else []


def _round_range(base_waves, waves) -> str:
    """min-max over rounds of ``base`` wave time / ``waves``' wave time (a tokens/s
    ratio: both carry the same tokens); '-' without two paired rounds."""
    if not base_waves or not waves or len(base_waves) != len(waves) or len(waves) < 2:
        return "-"
    ratios = [b / w for b, w in zip(base_waves, waves, strict=True)]
    return f"{min(ratios):.3f}-{max(ratios):.3f}"


# Each engine beside the peer of the same precision class (benchmarks/peer.py)
PEER_OF_ENGINE = {"onnx": "llama:f32", "onnx-int8": "llama:q8_0"}
# The service straight to Triton: over gRPC (tritonclient), and over HTTP with the peer's
# own kind of client (harness.HTTP_PATH); both are set against the peer
SERVICE_PATHS = ("triton", "triton-http")
PEERS = {
    f"{path}:{engine}": peer for path in SERVICE_PATHS for engine, peer in PEER_OF_ENGINE.items()
}


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _difference(a, b):
    return None if a is None or b is None else a - b


def peer_rows(results: dict) -> list[str]:
    """The service over llama.cpp's llama-server at each grid point, same run: below 1x
    is better for ITL, TTFT and memory, above 1x for tokens/s."""
    by = _index(results["rows"])
    lines = [
        "| service | peer | concurrency | prompt | ITL p50 | TTFT p50 | tokens/s | "
        "server memory (PSS) | server peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r["system"] not in PEERS:
            continue
        key = (r["concurrency"], r["prompt_tokens"])
        other = by.get((PEERS[r["system"]], *key))
        if other is None:
            continue
        cells = [
            _ratio(r[name], other[name])
            for name in ("itl_ms_p50", "ttft_ms_p50", "tokens_per_s", "server_pss_mb")
        ]
        cells.append(_ratio(r.get("server_peak_rss_mb"), other.get("server_peak_rss_mb")))
        lines.append(
            f"| {r['system']} | {other['system']} | {key[0]} | {key[1]} | "
            + " | ".join(_times(c) for c in cells)
            + " |"
        )
    return lines if len(lines) > 2 else []


def _bandwidth_engine(system: str) -> str | None:
    """The engine kind beside whose single-stream points a system was measured (where the
    harness timed the read bandwidth it is read against)."""
    if system.startswith("onnxruntime-loop"):
        return "onnx-int8" if system.endswith(":int8") else "onnx"
    path, _, engine = system.partition(":")
    if path == "llama":  # the peer runs beside the engine it is set against
        return next((e for e, p in PEER_OF_ENGINE.items() if p == system), None)
    return engine or None


def weight_read_rows(results: dict) -> list[str]:
    """Every system's ITL at concurrency 1 as a multiple of the fp32 weights' read time
    (their bytes at the read bandwidth measured beside it, same run)."""
    timings = results.get("bandwidth") or []
    weight_bytes = results.get("weight_bytes") or 0
    if not timings or not weight_bytes:
        return []
    by = {(t["engine"], t["prompt_tokens"]): t["gb_per_s"] for t in timings}
    median = sorted(t["gb_per_s"] for t in timings)[len(timings) // 2]
    lines = [
        "| system | prompt | ITL p50 | read bandwidth | fp32 read time | ITL / read time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r["concurrency"] != 1 or r["itl_ms_p50"] is None:
            continue
        # measured beside it, or (hf-generate runs before any) the run's median
        gb_per_s = by.get((_bandwidth_engine(r["system"]), r["prompt_tokens"]), median)
        read_ms = 1e3 * weight_bytes / (gb_per_s * 1e9)
        lines.append(
            f"| {r['system']} | {r['prompt_tokens']} | {r['itl_ms_p50']:.2f} ms | "
            f"{gb_per_s:.1f} GB/s | {read_ms:.2f} ms | {r['itl_ms_p50'] / read_ms:.2f}x |"
        )
    return lines if len(lines) > 2 else []


def table(results: dict) -> list[str]:
    lines = [
        "| system | conc. | prompt | TTFT p50 | ITL p50 | ITL p90 | ITL p99 | gap p50 | gap p99 | "
        "latency p50 | latency p90 | latency p99 | tokens/s | server RSS | server PSS | "
        "server peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        rss = _fmt(r["server_rss_mb"], ".0f") + " MB" if r["server_rss_mb"] else "-"
        # results from before PSS was measured have no such key
        pss = _fmt(r.get("server_pss_mb"), ".0f") + " MB" if r.get("server_pss_mb") else "-"
        peak = r.get("server_peak_rss_mb")
        peak = _fmt(peak, ".0f") + " MB" if peak else "-"
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['prompt_tokens']} | "
            f"{_fmt(r['ttft_ms_p50'])} ms | {_fmt(r['itl_ms_p50'], '.2f')} ms | "
            f"{_fmt(r['itl_ms_p90'], '.2f')} ms | {_fmt(r['itl_ms_p99'], '.2f')} ms | "
            # results from before the median gap was kept have no such key
            f"{_fmt(r.get('gap_ms_p50'), '.2f')} ms | "
            f"{_fmt(r['gap_ms_p99'], '.2f')} ms | {_fmt(r['latency_ms_p50'], '.0f')} ms | "
            f"{_fmt(r['latency_ms_p90'], '.0f')} ms | {_fmt(r['latency_ms_p99'], '.0f')} ms | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | {rss} | {pss} | {peak} |"
        )
    return lines


# Line style and marker by kind of system, so that a run's dozen lines stay apart: the
# service's paths solid, the baselines broken.
_PLOT_STYLES = {
    "llama": ("--", "s"),
    "onnxruntime-loop": (":", "^"),
    "hf-generate": ("-.", "v"),
}


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    # the service's paths first, so that they get the strong colours and head the legend
    families = ("triton", "triton-http", "triton-sampled", "front-door", "openai", "llama")
    systems = sorted(
        {r["system"] for r in results["rows"]},
        key=lambda system: (_rank(system.partition(":")[0], families), system),
    )
    # tab20's ten dark hues first, then their light twins: a colour per system for 20
    palette = plt.get_cmap("tab20").colors
    palette = palette[0::2] + palette[1::2]
    for prompt in sorted({r["prompt_tokens"] for r in results["rows"]}):
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
        for index, system in enumerate(systems):
            rows = sorted(
                (
                    r
                    for r in results["rows"]
                    if r["system"] == system and r["prompt_tokens"] == prompt
                ),
                key=lambda r: r["concurrency"],
            )
            linestyle, marker = _PLOT_STYLES.get(system.partition(":")[0], ("-", "o"))
            style = {
                "color": palette[index % len(palette)],
                "linestyle": linestyle,
                "marker": marker,
                "label": system,
            }
            xs = [r["concurrency"] for r in rows]
            left.plot(xs, [r["itl_ms_p50"] for r in rows], **style)
            right.plot(xs, [r["tokens_per_s"] for r in rows], **style)
        for axis, title in ((left, "inter-token latency p50 (ms)"), (right, "output tokens/s")):
            axis.set_xscale("log", base=2)
            axis.set_xticks([r for r in sorted({r["concurrency"] for r in results["rows"]})])
            axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_xlabel("concurrency")
            axis.set_title(title)
            axis.grid(alpha=0.3)
        # beside the plots, not over their lines
        fig.legend(*right.get_legend_handles_labels(), loc="center right", fontsize=8)
        fig.suptitle(
            f"GPT-2 small architecture, prompt {prompt} tokens, {results['new_tokens']} new tokens"
        )
        fig.tight_layout(rect=(0, 0, 0.86, 1))
        name = f"concurrency_prompt{prompt}.png"
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


# What each kind of system in a run is, by its name or the part of it before the colon
_SYSTEMS = {
    "hf-generate": "`hf-generate` = Hugging Face `generate()` in PyTorch eager, in process, one "
    "batch of `concurrency` prompts",
    "onnxruntime-loop": "`onnxruntime-loop` = the in-process ONNX Runtime KV-cache loop on "
    "the same ONNX file (the in-place `SlotEngine` the service runs, argmax)",
    "onnxruntime-loop:int8": "`onnxruntime-loop:int8` = the same loop on the int8 file",
    "triton": "`triton:<engine>` = the `gpt2` model over gRPC streaming, `concurrency` "
    "clients at once, each timing its own tokens, straight to Triton's loopback port",
    "front-door": "`front-door:<engine>` = the same through the Envoy front door (`make serve`)",
    "openai": "`openai:<engine>` = streaming `/v1/completions` through the front door and the "
    "OpenAI-compatible gateway, read with `http.client`",
    "triton-sampled": "`triton-sampled:<engine>` = `triton:<engine>` sampling (temperature "
    "0.8, top_p 0.95, seeded) instead of greedy (`--sampling`)",
    "triton-http": "`triton-http:<engine>` = the service over Triton's HTTP `generate_stream` "
    "(server-sent events, an event per piece of text), read with `http.client` like the "
    "peer (`--http`, on with `--peer`)",
}


def _systems(results: dict) -> str:
    """The report's paragraph on what was measured: the kinds of system this run has."""
    names = {r["system"] for r in results["rows"]}
    present = names | {name.partition(":")[0] for name in names}
    described = [line for kind, line in _SYSTEMS.items() if kind in present]
    text = "Systems: " + "; ".join(described) + "; " if described else ""
    text += (
        "the paths take turns wave by wave, in a fixed order, at each grid point. In the "
        "ratios, `<path>:onnx-int8` is taken against the int8 loop, the other engines "
        "against the fp32 loop. "
    )
    if results.get("peer"):
        text += (
            "`llama:f32` / `llama:q8_0` = the same checkpoint converted to GGUF by llama.cpp's "
            f"own tools, served by its `llama-server` (llama-cpp-python "
            f"{results['peer']['llama_cpp_python']}'s llama.cpp, `-np` = the service's "
            "sequences, continuous batching, the same threads), streaming `/completion` over "
            "HTTP with the service's prompt token ids, greedy (top-1), `cache_prompt: false`. "
            "The peer's waves take turns with the service's in a fixed order: peer, "
            "`triton-http`, `triton`, then the others. "
        )
        if any(r["system"] == "llama:q8_0" for r in results["rows"]):
            text += (
                f"The int8 pair: both int8 weights and int8 dot products (ONNX Runtime's "
                f"`MatMulNBits` at accuracy level {INT8_ACCURACY_LEVEL}; `q8_0` quantizes "
                f"the activations too), in blocks of {INT8_BLOCK} weights for the service "
                "and 32 for `q8_0` (finer: more scales to read, closer to fp32). "
            )
    return text


def _rank(item, order) -> int:
    """``item``'s place in ``order``; after all of them if it is not there."""
    return order.index(item) if item in order else len(order)


def _make_target(results: dict) -> str:
    """What made a run that did not record its command (before 2026-11-29)."""
    return f"make {'bench-peer' if results.get('peer') else 'bench'}"


def _door_memory(results: dict) -> str:
    """What the front door's and the OpenAI API's rows count in their memory columns."""
    if not any(r["system"].startswith(("front-door:", "openai:")) for r in results["rows"]):
        return "); "
    if results.get("door_memory_counted"):
        return "; the `front-door:` rows add Envoy, the `openai:` rows Envoy and the gateway); "
    return (
        "; the `front-door:` and `openai:` rows count the same processes: this run did not "
        "measure Envoy and the OpenAI gateway, which `make serve` runs beside them); "
    )


def write_report(results: dict, path: Path, plot_folder: Path) -> None:
    pictures = plots(results, plot_folder)
    rel = (
        plot_folder.relative_to(path.parent)
        if plot_folder.is_relative_to(path.parent)
        else plot_folder
    )
    text = [
        "# Benchmarks",
        "",
        f"Produced by `{results.get('command') or _make_target(results)}` "
        f"({results['started']}, {results['duration_s']:.0f} s) on "
        f"{results['machine']['cpus']} CPUs ({results['machine']['platform']}); model "
        f"`{results['model']}`, {results['new_tokens']} new tokens per request, greedy, "
        "exactly that many tokens (min_length = max_tokens). One sitting: compare ratios "
        "within this run, not absolute times across runs (this machine drifts by up to "
        "~30% over tens of minutes).",
        "",
        _systems(results)
        + "Server RSS and PSS: at rest, 16 s after the grid point's waves (the service "
        "gives freed heap back after 15 s idle), summed over "
        "the server's processes (tritonserver and every backend stub; llama-server is one"
        + _door_memory(results)
        + "PSS shares out pages that several processes map, so it is the one to compare. "
        "Server peak RSS: the most each process held at once since it started (VmHWM), "
        "summed: an upper bound of the server's peak (a page several processes share "
        "counts once per process), what a memory limit must allow.",
        "",
        *table(results),
        "",
        *(
            ["## The front door's cost (same run)", "", *front_door_rows(results), ""]
            if front_door_rows(results)
            else []
        ),
        *(
            [
                "## Sampling against greedy (same run)",
                "",
                "Per round: each sampled wave against the same round's greedy wave, the "
                "lowest and the highest. Above one stream a run has a quarter of `--rounds` "
                "waves per path (3 by default), and one run's ratio moves by a few percent: "
                "`--rounds 40` (10 waves) reads it to about 1%.",
                "",
                *sampling_rows(results),
                "",
            ]
            if sampling_rows(results)
            else []
        ),
        *(
            [
                "## The service against llama.cpp (same run)",
                "",
                "Service / peer at each grid point (ITL, TTFT, memory: lower is better; "
                "tokens/s: higher is better).",
                "",
                *peer_rows(results),
                "",
            ]
            if peer_rows(results)
            else []
        ),
        *(
            [
                "## The weights' read time (same run)",
                "",
                f"A decode step at batch 1 reads every weight: "
                f"{(results.get('weight_bytes') or 0) / 1e6:.0f} MB in fp32. The read "
                "bandwidth is timed beside each concurrency-1 point (all threads reading a "
                "float32 array of that size, median pass; `benchmarks/bandwidth.py`); "
                "read time = those bytes / that bandwidth. A yardstick to set the systems "
                "of one run side by side, not a bound: the engines' own reads can beat "
                "this one array's (fp32 engines came in under 1x in some runs, over it in "
                "others), and quantized engines read fewer bytes.",
                "",
                *weight_read_rows(results),
                "",
            ]
            if weight_read_rows(results)
            else []
        ),
        "## The service against the baselines (same run)",
        "",
        *ratio_rows(results),
        "",
        *[f"![{p}]({rel}/{p})" for p in pictures],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + kept_sections(path))


# Sections of the report that other runs write (`make bench-genai`): a new `make bench`
# report keeps them, from this heading to the end.
KEPT_FROM = "## genai-perf (`make bench-genai`)"


def kept_sections(path: Path) -> str:
    """What the report at ``path`` has from KEPT_FROM on ("" if none)."""
    if not path.exists():
        return ""
    old = path.read_text()
    found = re.search(rf"(?m)^{re.escape(KEPT_FROM)}$", old)
    return "\n" + old[found.start() :] if found else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the report (and its plots, in a `bench` folder beside it) again "
        "from a harness run's results.json: to publish a run made with --report elsewhere"
    )
    parser.add_argument("results", type=Path, help="the harness's results.json")
    parser.add_argument("--report", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = parser.parse_args(argv)
    write_report(json.loads(args.results.read_text()), args.report, args.report.parent / "bench")
    print(f"report in {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
