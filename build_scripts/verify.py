"""``make verify``: do PyTorch and the exported engines agree? Logits, tokens, latency.

    python -m build_scripts.verify --model tiny

The reference is the checkpoint in PyTorch (Hugging Face ``forward`` and ``generate``).
Every engine present is run through the engine code the server runs (``SlotEngine``, the
cache written in place, for ONNX Runtime; ``StatefulEngine`` for the others), over the
same prompts of varied length, up to the whole context window so that its last position is
checked too: last-position logits (max abs difference, top-1 agreement), 32-token greedy
generations (fewer where the window ends; alone, and all prompts batched together), and
single-forward-pass latency, timed after a warm-up with the reference and every CPU engine
on the same number of threads (``--threads``, default: the CPUs this process may use).
Writes ``report.json`` and ``report.md``; exits 1 when an engine misses its bar: fp32
ONNX the exact one (top-1 100%, every greedy sequence identical, max abs logit difference
<= 1e-3), a TensorRT plan a floor that fp16 rounding clears and a wrong plan does not
(top-1 >= 90%, at least half the greedy sequences identical, alone and batched). int8
and the fp16 export (``model.fp16.onnx``, the graph TensorRT 11 builds from, run here by
ONNX Runtime on the CPU) are reported, never gated: both move logits by design. Those
two, TensorRT's, are read from TensorRT's export (``artifacts/trt/<model>/``: ``make
engine``, or ``make verify FP16=1`` for the fp16 graph alone), the others from ONNX
Runtime's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from build_scripts.build_engine import check_plan
from build_scripts.export_onnx import check_current, onnx_dir, trt_dir
from gpt2_triton import checkpoint, logs
from gpt2_triton.atomic import atomic_dir, write_json
from gpt2_triton.engines.factory import (
    IN_PLACE_KINDS,
    SETTINGS_FILE,
    build_engine,
    build_forward,
    read_shape,
)
from gpt2_triton.engines.protocol import host_logits
from gpt2_triton.engines.slots import SlotEngine
from gpt2_triton.engines.stateful import StatefulEngine
from gpt2_triton.errors import EngineError, ExportError, Gpt2TritonError
from gpt2_triton.prompts import varied_prompts
from gpt2_triton.reference import greedy_ids

log = logging.getLogger("build_scripts.verify")

FP32_MAX_ABS_DIFF = 1e-3
# The bars an engine's row is held to: EXACT for fp32 on ONNX Runtime; FLOOR for a
# TensorRT plan, whose fp16 (or TF32) arithmetic moves logits, so near-ties flip and a
# greedy sequence can part from the reference after one flip; a plan built or bound wrong
# (a cache, a profile, a tensor) misses far more. fp16 on an H200 (torch, the tiny model):
# top-1 100%, greedy 31/32 (docs/GPU.md).
EXACT, FLOOR = "exact", "floor"
FLOOR_TOP1 = 0.9
FLOOR_GREEDY = 0.5  # of the prompts, alone and batched
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota.

    ``os.cpu_count()`` counts the host's CPUs, though a container or ``taskset`` may allow
    a few: more threads than that only contend. A fractional quota rounds down (1.5 CPUs:
    1 thread), as a second busy thread would be throttled.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]  # "max 100000" or "200000 100000"
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 file, or not readable
        pass
    return cpus


def resolve_threads(requested: int, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The one thread count every engine is timed with: ``requested``, or if 0 the CPUs
    this process may use."""
    return requested if requested > 0 else available_cpus(cpu_max)


def verify_prompts(tokenizer, count: int, window: int, new_tokens: int) -> list[list[int]]:
    """``count`` prompts as token ids: varied short ones and three long ones. Half the
    window; the window less ``new_tokens - 1``, whose greedy continuation feeds the last
    position (``window - 1``) with the KV cache unless EOS comes first; the whole window,
    whose prompt step alone is compared there (its budget is one token)."""
    long_lengths = sorted({window // 2, window - new_tokens + 1, window} - {0})
    prompts = [tokenizer(p)["input_ids"] for p in varied_prompts(count - len(long_lengths))]
    passage = tokenizer(" ".join(varied_prompts(12)))["input_ids"]  # every sentence once
    filler = passage * (window // len(passage) + 1)
    return prompts + [filler[:n] for n in long_lengths]


def token_budget(prompt_tokens: int, new_tokens: int, window: int) -> int:
    """Greedy tokens for a prompt: ``new_tokens``, fewer where the window ends first (the
    last generated token is never fed, so ``window - prompt_tokens + 1`` fit)."""
    return min(new_tokens, window - prompt_tokens + 1)


def last_position(prompt_ids: list[list[int]], greedy: list[list[int]]) -> int:
    """The last position fed to the model: the prompt's, then every generated token but
    the final one (greedy stops early at EOS)."""
    return max(len(p) + len(g) - 2 for p, g in zip(prompt_ids, greedy, strict=True))


@dataclass
class EngineReport:
    engine: str
    precision: str
    gated: bool
    bar: str = ""  # EXACT, FLOOR, or "" (reported, not gated)
    prompt_latency_ms_p50: float = 0.0
    decode_latency_ms_p50: float = 0.0
    sample_top1_token: str = ""
    top1_agreement: float = 0.0
    max_abs_logit_diff: float = 0.0
    greedy_identical: int = 0
    greedy_identical_batched: int = 0
    prompts: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Reference:
    prompt_ids: list[list[int]]
    last_logits: np.ndarray  # (prompts, vocab)
    greedy: list[list[int]]
    budgets: list[int]  # greedy tokens per prompt, see token_budget()
    prompt_latency_ms_p50: float


def reference(model, ids: list[list[int]], budgets: list[int], eos: int) -> Reference:
    import torch

    logits, greedy, times = [], [], []
    with torch.inference_mode():
        model(torch.tensor([ids[0]]), logits_to_keep=1)  # warm-up: first-call allocations
        for p, budget in zip(ids, budgets, strict=True):
            x = torch.tensor([p])
            started = time.perf_counter()
            out = model(x, logits_to_keep=1).logits[0, -1]
            times.append(time.perf_counter() - started)
            logits.append(out.float().numpy())
            greedy.append(greedy_ids(model, p, budget, eos))
    return Reference(ids, np.stack(logits), greedy, budgets, 1e3 * statistics.median(times))


def greedy_batched(
    engine: StatefulEngine | SlotEngine,
    prompt_ids: list[list[int]],
    budgets: list[int],
    eos: int,
) -> list[list[int]]:
    """Greedy decoding of all prompts in batches as large as the engine takes (all of them
    at once unless it was built for fewer rows); a row drops out at EOS or its budget."""
    size = engine.max_sequences
    outputs = []
    for start in range(0, len(prompt_ids), size):
        chunk = slice(start, start + size)
        outputs += _greedy_batch(engine, prompt_ids[chunk], budgets[chunk], eos)
    return outputs


def _greedy_batch(
    engine: StatefulEngine | SlotEngine,
    prompt_ids: list[list[int]],
    budgets: list[int],
    eos: int,
) -> list[list[int]]:
    ids = list(range(1, len(prompt_ids) + 1))
    budget = dict(zip(ids, budgets, strict=True))
    logits = host_logits(engine.step(prompt_ids, ids, [True] * len(ids)))
    outputs = {s: [int(row.argmax())] for s, row in zip(ids, logits, strict=True)}
    live = ids
    while True:
        done = [s for s in live if outputs[s][-1] == eos or len(outputs[s]) == budget[s]]
        engine.release(done)
        live = [s for s in live if s not in done]
        if not live:
            return [outputs[s] for s in ids]
        logits = host_logits(engine.step([[outputs[s][-1]] for s in live], live))
        for s, row in zip(live, logits, strict=True):
            outputs[s].append(int(row.argmax()))


def bar_failures(report: EngineReport) -> list[str]:
    """What keeps ``report`` under its bar (nothing for a row that is not gated)."""
    n, failures = report.prompts, []
    alone, batched = report.greedy_identical, report.greedy_identical_batched
    greedy = f"greedy sequences identical: {alone}/{n} alone, {batched}/{n} batched"
    if report.bar == EXACT:
        if report.top1_agreement < 1.0:
            failures.append(f"top-1 agreement {report.top1_agreement:.1%} < 100%")
        if alone < n or batched < n:
            failures.append(greedy)
        if report.max_abs_logit_diff > FP32_MAX_ABS_DIFF:
            failures.append(
                f"max abs logit diff {report.max_abs_logit_diff:.2e} > {FP32_MAX_ABS_DIFF:.0e}"
            )
    elif report.bar == FLOOR:
        if report.top1_agreement < FLOOR_TOP1:
            failures.append(f"top-1 agreement {report.top1_agreement:.1%} < {FLOOR_TOP1:.0%}")
        if min(alone, batched) < FLOOR_GREEDY * n:
            failures.append(f"{greedy} (the floor: {FLOOR_GREEDY:.0%})")
    return failures


def check_engine(
    name: str,
    precision: str,
    bar: str,
    engine: StatefulEngine | SlotEngine,
    ref: Reference,
    tokenizer,
    eos: int,
) -> EngineReport:
    report = EngineReport(name, precision, bool(bar), bar, prompts=len(ref.prompt_ids))
    # Warm-up, not timed: session set-up, first-call allocations, CUDA kernels loading.
    warm = len(ref.prompt_ids) + 1
    row = host_logits(engine.step([ref.prompt_ids[0]], [warm], [True]))[0]
    engine.step([[int(row.argmax())]], [warm])
    engine.release([warm])
    logits, prompt_times, decode_times, identical = [], [], [], 0
    for i, p in enumerate(ref.prompt_ids):
        started = time.perf_counter()
        row = host_logits(engine.step([p], [i + 1], [True]))[0]
        prompt_times.append(time.perf_counter() - started)
        logits.append(row)
        tokens = [int(row.argmax())]
        while len(tokens) < ref.budgets[i] and tokens[-1] != eos:
            started = time.perf_counter()
            row = host_logits(engine.step([[tokens[-1]]], [i + 1]))[0]
            decode_times.append(time.perf_counter() - started)
            tokens.append(int(row.argmax()))
        engine.release([i + 1])
        identical += tokens == ref.greedy[i]
    got = np.stack(logits)
    report.max_abs_logit_diff = float(np.abs(got - ref.last_logits).max())
    report.top1_agreement = float((got.argmax(-1) == ref.last_logits.argmax(-1)).mean())
    report.greedy_identical = identical
    batched = greedy_batched(engine, ref.prompt_ids, ref.budgets, eos)
    report.greedy_identical_batched = sum(a == b for a, b in zip(batched, ref.greedy, strict=True))
    report.prompt_latency_ms_p50 = 1e3 * statistics.median(prompt_times)
    report.decode_latency_ms_p50 = 1e3 * statistics.median(decode_times) if decode_times else 0
    report.sample_top1_token = tokenizer.decode([int(got[0].argmax())])
    report.failures = bar_failures(report)
    return report


def markdown(
    model: str, ref: Reference, reports: list[EngineReport], tokenizer, window: int, threads: int
) -> str:
    n = len(ref.prompt_ids)
    lines = [
        f"# Consistency report: {model}",
        "",
        f"{n} prompts ({min(map(len, ref.prompt_ids))}-{max(map(len, ref.prompt_ids))} "
        f"tokens; positions up to {last_position(ref.prompt_ids, ref.greedy)} of the "
        f"{window}-token window checked); reference: PyTorch fp32 (Hugging Face forward / "
        "generate). Latency: one forward pass at batch 1, median after a warm-up (prompt "
        "step; decode step with the KV cache); threads: "
        f"{threads}, the same for PyTorch and ONNX Runtime.",
        "",
        "| engine | precision | prompt latency p50 | decode latency p50 | top-1 token | "
        "top-1 agreement | max abs logit diff | greedy identical (alone / batched) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| pytorch (reference) | fp32 | {ref.prompt_latency_ms_p50:.2f} ms | - | "
        f"{tokenizer.decode([int(ref.last_logits[0].argmax())])!r} | - | - | - | - |",
    ]
    for r in reports:
        if not r.gated:
            verdict = "reported, not gated"
        else:
            verdict = "pass" if r.passed else "FAIL: " + "; ".join(r.failures)
            if r.bar == FLOOR:
                verdict += f" (floor: top-1 >= {FLOOR_TOP1:.0%}, greedy >= {FLOOR_GREEDY:.0%})"
        lines.append(
            f"| {r.engine} | {r.precision} | {r.prompt_latency_ms_p50:.2f} ms | "
            f"{r.decode_latency_ms_p50:.2f} ms | {r.sample_top1_token!r} | "
            f"{r.top1_agreement:.1%} | {r.max_abs_logit_diff:.2e} | "
            f"{r.greedy_identical}/{n} / {r.greedy_identical_batched}/{n} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


ENGINES = [  # name, kind, precision, device, bar ("": reported, not gated)
    ("onnxruntime", "onnx", "fp32", "cpu", EXACT),
    ("onnxruntime", "onnx-int8", "int8 weights, int8 compute", "cpu", ""),
    ("torch engine", "torch", "fp32", "cpu", ""),
    ("torch engine", "torch", "fp16 (cuda), CUDA graphs", "cuda", ""),
    ("onnxruntime", "onnx-fp16", "fp16 export, LayerNorm/softmax fp32 (CPU)", "cpu", ""),
    ("tensorrt", "trt", "see engine_settings.json", "cuda", FLOOR),
]
# the kinds read from TensorRT's export (the graph a plan is built from, and the plan)
TENSORRT_KINDS = ("onnx-fp16", "trt")


def plan_cannot_run_here(folder: Path) -> str:
    """Why the TensorRT plan in ``folder`` cannot be checked on this machine ("" if it
    can): then its row is skipped; a plan that could run and does not load fails."""
    import importlib.util

    from build_scripts.build_engine import PLAN

    if not (folder / PLAN).is_file():
        return f"no plan in {folder} ('make engine' builds one)"
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    return ""


def _forward(kind: str, export_dir: Path, shape, **kwargs):
    """``build_forward``, plus the fp16 export on ONNX Runtime: a check of the graph that
    TensorRT 11 builds from, not an engine the server offers (on a CPU it is slower)."""
    if kind != "onnx-fp16":
        return build_forward(kind, export_dir, shape, **kwargs)
    from build_scripts.build_engine import FP16_ONNX
    from gpt2_triton.engines.onnx_forward import OnnxForward

    path = export_dir / FP16_ONNX
    if not path.is_file():
        raise EngineError(f"{path} not found: export with --fp16 (make verify FP16=1)")
    return OnnxForward(path, shape, kwargs.get("threads", 0))


def run(
    model_spec: str,
    export_dir: Path | None,
    output: Path | None,
    num_prompts: int,
    new_tokens: int,
    threads: int,
    engine_dir: Path | None = None,
) -> tuple[list[EngineReport], Path]:
    import torch

    spec = checkpoint.resolve(model_spec)
    export_dir = export_dir or onnx_dir(spec.slug)
    engine_dir = engine_dir or trt_dir(spec.slug)
    output = output or checkpoint.artifacts_root() / "verify" / spec.slug
    shape = read_shape(export_dir)
    # A stale export would show up as a failed comparison; say what is wrong instead.
    check_current(export_dir, "re-export it ('make verify' does)", spec)
    has_engine_export = (engine_dir / SETTINGS_FILE).is_file()
    if has_engine_export:
        try:  # not fatal: ONNX Runtime's rows are the gated ones
            check_current(
                engine_dir, "re-export it and rebuild the plan ('make engine' does)", spec
            )
        except ExportError as exc:
            log.warning("skipping TensorRT's export: %s", exc)
            has_engine_export = False
    tokenizer = checkpoint.load_tokenizer(spec)
    model = checkpoint.load_model(spec)
    eos = shape.eos_token_id
    window = shape.max_positions
    if new_tokens >= window:
        raise EngineError(f"--new-tokens {new_tokens} leaves no room for a prompt in {window}")
    # One value for every engine, set before anything is timed: the reference included.
    threads = resolve_threads(threads)
    torch.set_num_threads(threads)
    log.info("timing with %d threads (PyTorch and ONNX Runtime)", threads)
    prompt_ids = verify_prompts(tokenizer, num_prompts, window, new_tokens)
    budgets = [token_budget(len(p), new_tokens, window) for p in prompt_ids]
    ref = reference(model, prompt_ids, budgets, eos)
    reports = []
    for name, kind, precision, device, bar in ENGINES:
        folder = engine_dir if kind in TENSORRT_KINDS else export_dir
        if kind in TENSORRT_KINDS and not has_engine_export:
            log.info(
                "skipping %s (%s): no TensorRT export in %s ('make engine'; 'make verify "
                "FP16=1' writes its fp16 graph alone)",
                name,
                precision,
                engine_dir,
            )
            continue
        if kind == "trt" and (unable := plan_cannot_run_here(folder)):
            log.info("skipping %s: %s", name, unable)
            continue
        rows = len(prompt_ids) + 1
        # the torch engine moves (and casts) its model: give it a copy of the reference
        given = {"threads": threads, "device": device}
        given["model"] = copy.deepcopy(model) if kind == "torch" else None
        try:
            if kind in IN_PLACE_KINDS:  # what the server runs: the cache written in place
                engine = build_engine(kind, export_dir, max_sequences=rows, **given)
            else:
                forward = _forward(kind, folder, shape, **given)
                # A TensorRT plan takes at most the batch it was built for: the batched
                # check then runs in batches of that size.
                limit = getattr(forward, "max_batch", None) or rows
                engine = StatefulEngine(forward, shape, max_sequences=min(rows, limit))
        except EngineError as exc:
            if bar == EXACT:  # the fp32 reference engine must run
                raise
            if bar == FLOOR:  # a plan that could run here and does not load: its failure
                failed = EngineReport(name, precision, True, bar, prompts=len(prompt_ids))
                failed.failures.append(f"the plan does not load: {exc}")
                reports.append(failed)
                continue
            log.info("skipping %s (%s): %s", name, precision, exc)
            continue
        if kind == "trt":
            check_plan(folder)  # only where TensorRT runs: elsewhere it was skipped
            precision = json.loads((folder / "engine_settings.json").read_text())["precision"]
        log.info("checking %s %s", name, precision)
        reports.append(check_engine(name, precision, bar, engine, ref, tokenizer, eos))
    with atomic_dir(output) as tmp:
        write_json(
            tmp / "report.json",
            {
                "model": spec.source,
                "export_dir": str(export_dir),
                "tensorrt_export_dir": str(engine_dir) if has_engine_export else None,
                "prompts": [tokenizer.decode(p) for p in prompt_ids],
                "prompt_tokens": [len(p) for p in prompt_ids],
                "new_tokens": new_tokens,
                "window": window,
                "last_position_checked": last_position(prompt_ids, ref.greedy),
                "threads": threads,
                "reference_prompt_latency_ms_p50": ref.prompt_latency_ms_p50,
                "engines": [asdict(r) | {"passed": r.passed} for r in reports],
            },
        )
        (tmp / "report.md").write_text(
            markdown(spec.source, ref, reports, tokenizer, window, threads)
        )
    return reports, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="hub id, 'tiny' or checkpoint folder")
    parser.add_argument("--export-dir", type=Path, help="default: artifacts/onnx/<model>")
    parser.add_argument(
        "--tensorrt-export-dir",
        type=Path,
        help="TensorRT's export and plan (default: artifacts/trt/<model>)",
    )
    parser.add_argument("--output", type=Path, help="default: artifacts/verify/<model>")
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts (>= 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads of every engine (0: the CPUs allowed)"
    )
    args = parser.parse_args(argv)
    if args.prompts < 32 or args.new_tokens < 1 or args.threads < 0:
        parser.error("--prompts must be >= 32, --new-tokens >= 1 and --threads >= 0")
    logs.setup()
    try:
        reports, output = run(
            args.model,
            args.export_dir,
            args.output,
            args.prompts,
            args.new_tokens,
            args.threads,
            engine_dir=args.tensorrt_export_dir,
        )
    except Gpt2TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((output / "report.md").read_text())
    failed = [r for r in reports if r.gated and not r.passed]
    for r in failed:
        print(f"FAIL {r.engine} {r.precision}: {'; '.join(r.failures)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
