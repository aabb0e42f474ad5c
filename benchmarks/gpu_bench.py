"""The GPU benchmark: one call on a GPU machine that answers what the GPU path is worth.

    benchmarks/gpu_bench.sh [--dry-run] [options]     (make gpu-bench; make gpu-bundle here first)

On GPT-2 small's architecture (the bench model: random weights drawn from a fixed seed,
GPT-2's tokenizer), on one GPU, in one run, the headline first:

0. ``ahead`` (with ``--decode-ahead 1``): a check first, a few seconds: the generation
   loop on the graphs engine in fp32, every prompt at once, without and with decoding
   ahead, must stream the same text (the asynchronous path no CPU can run).
1. ``triton``: the service through the pip ``tritonserver`` over gRPC (the front door's
   Envoy does not travel): TTFT, ITL and tokens/s at each concurrency and prompt length,
   exactly ``--new-tokens`` tokens, with CUDA graphs, eager, and graphs whose layer code
   went through torch.compile, and TensorRT-LLM's published workload (200-token prompts,
   100 tokens, concurrency 1), on which the latency targets are judged. The clients run in
   several processes (``served_load.py``), each connected before its wave starts.
2. ``engine``: a decode step of the engine alone at each concurrency, each variant, with
   what the engine ran (graphs captured, the logits' path) and what a step launches; and
   ms a token with ``HOST_WORK_MS`` of host work after each step, plainly and decoding
   ahead (engines with static decode steps).
3. ``hf``: Hugging Face ``generate()`` in fp16 on the same GPU (greedy, exact length), as
   it comes and without cuDNN's attention.
4. ``consistency``: the engine with CUDA graphs in fp32 (its tokens must be the
   reference's: random weights put many tokens within fp16's rounding of each other, so
   only fp32 tells a graph bug from rounding), then in fp16 with graphs, eager and compiled,
   against the fp32 reference (Hugging Face on the CPU): verify.py's check (top-1
   agreement, greedy sequences identical alone and batched, max abs logit difference).
   Where TensorRT is importable, an fp16 plan is built (opset-18 export, ``build_engine``)
   and checked the same way through ``trt_forward.py``; where not, the run says so.
5. ``genai-perf``: run when the machine has it; it is not carried (it wants an environment
   of its own, with numpy 2 and perf_analyzer), so the run says so.

Results are written after every measured point (``--out``: ``results.json``,
``REPORT.md`` and the servers' logs, nothing else; ``$OUT`` on the device tool's
machines), so a run cut short keeps what it measured, and a step that fails leaves the
others. A deadline (``--deadline-s``, inside the device tool's 10 minutes) skips what is
left. The end prints one table with the targets. ``--dry-run`` checks the bundle and the
plan without a GPU (``make test`` runs it); ``--device cpu --model artifacts/models/tiny``
runs every step on the CPU at toy sizes (the smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS = ("ahead", "triton", "engine", "hf", "consistency", "genai-perf")
# issue 13's targets, at concurrency 1 through Triton on an H100 or H200 (TensorRT-LLM's
# published genai-perf figures for GPT-2 on Triton: TTFT 13.7 ms, ITL 1.86 ms)
TARGET_ITL_MS = 1.86
TARGET_TTFT_MS = 13.7
TARGET_HF_SPEEDUP = 10.0  # per token, over Hugging Face generate() fp16, same run
TARGET_SCALING = 20.0  # tokens/s at concurrency 64 over concurrency 1
# a stream that came whole streamed nothing: the worst outcome for a latency target
ONE_PIECE = "missed: the streams came in one piece"
PUBLISHED = {"prompt_tokens": 200, "new_tokens": 100, "concurrency": 1}  # their workload
HF_NO_CUDNN = "hf-generate-no-cudnn"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from gpt2_triton.batcher import MAX_BURST_WINDOW_MS, default_burst_window_ms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(".gpu_bundle"))
    parser.add_argument(
        "--model", type=Path, default=None,
        help="a checkpoint folder (default: the bench model, rebuilt from the bundle)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="waves per point at concurrency 1")
    parser.add_argument("--prompts", type=int, default=16, help="prompts the consistency checks")
    parser.add_argument(
        "--response-lanes", type=int, nargs="+", default=None,
        help="gpt2's sending threads: the graphs service once per value, the eager one with "
        "the first (default: the repository's default for the device: 1 on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--prefill-tokens", type=int, nargs="+", default=[0],
        help="the prefill budget (MAX_PREFILL_TOKENS): the graphs service once per value, "
        "with the first lanes value (default 0: the repository's, 512 on a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--burst-window-ms", type=int, nargs="+", default=None,
        help="the burst window (BURST_WINDOW_MS, 0: none): the graphs service once per "
        "further value, with the first lanes and budget (default: the repository's for the "
        "device, 0 on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--decode-ahead", type=int, nargs="+", choices=[0, 1], default=[0],
        help="DECODE_AHEAD (1: each decode step queued on the GPU before the last one's "
        "tokens are read): the first value everywhere it can run, each further one once "
        "more for every variant with static decode steps (graphs, compiled)",
    )  # fmt: skip
    parser.add_argument(
        "--engines", nargs="+", default=None,
        help="the engine variants to run (default: all; on CUDA graphs, eager, compiled)",
    )  # fmt: skip
    parser.add_argument("--skip", nargs="*", choices=STEPS, default=[])
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "artifacts/gpu_bench")
    )
    parser.add_argument(
        "--deadline-s", type=float, default=540.0,
        help="from the start: what is left after it is skipped (the device tool stops a "
        "command at 600 s)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the bundle and the plan")
    parser.add_argument(
        "--bundle-python", default=None,
        help="the Python the bundle must be for (default: 3.12 in a dry run, else this one)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.response_lanes is None:  # the repository's default where the engine runs
        from gpt2_triton.sending import default_response_lanes

        args.response_lanes = [default_response_lanes("torch", args.device)]
    known = list(variants(args.device))
    args.engines = args.engines or known
    if unknown := [e for e in args.engines if e not in known]:
        parser.error(f"--engines: {unknown} not in {known} (on {args.device})")
    numbers = args.concurrency + args.prompt_tokens + args.response_lanes
    if min(numbers + [args.new_tokens, args.rounds]) < 1:
        parser.error("concurrency, prompt tokens, new tokens, rounds and lanes must be >= 1")
    if min(args.prefill_tokens) < 0:
        parser.error("prefill tokens must be >= 0 (0: the repository's default)")
    if args.burst_window_ms is None:
        args.burst_window_ms = [default_burst_window_ms("torch", args.device)]
    listed = {
        "response lanes": args.response_lanes,
        "prefill tokens": args.prefill_tokens,
        "burst windows": args.burst_window_ms,
        "decode ahead": args.decode_ahead,
    }
    for what, values in listed.items():
        if len(set(values)) < len(values):  # two servers under one name: one's rows lost
            parser.error(f"{what}: each value once, got {values}")
    if not all(0 <= w <= MAX_BURST_WINDOW_MS for w in args.burst_window_ms):
        parser.error(f"burst windows must be in [0, {MAX_BURST_WINDOW_MS}] ms (0: none)")
    return args


def variants(device: str, only: list[str] | None = None) -> dict[str, dict]:
    """The engines compared (``only``: those of them): on CUDA graphs, graphs whose layer
    code went through torch.compile, and eager; on the CPU the graphs' static inputs
    without capture (``static_decode``) and eager."""
    if device.startswith("cuda"):
        every = {  # compiled last: its compile takes the longest, and may fail
            "graphs": {"cuda_graphs": True},
            "eager": {"cuda_graphs": False},
            "compiled": {"cuda_graphs": True, "compile_decode": True},  # torch.compile
        }
    else:
        every = {"static": {"static_decode": True}, "eager": {"static_decode": False}}
    return {name: every[name] for name in every if only is None or name in only}


def has_static_steps(options: dict) -> bool:
    """Whether a variant's decode steps run through the graphs' static inputs (captured or
    not): the steps that can run ahead."""
    return bool(options.get("cuda_graphs") or options.get("static_decode"))


def services(args) -> list[tuple[str, dict, int]]:
    """The servers the ``triton`` step runs, in order: ``(system, options, response
    lanes)``, the options the engine's, ``max_prefill_tokens``, ``burst_window_ms`` and
    ``decode_ahead``; the first variant (graphs) once per lanes value, then once per further
    prefill budget and once per further burst window, the others with the first of each;
    then each variant with static decode steps once per further decode-ahead value. The
    first is the one the targets are judged on."""
    lanes_first, budget_first = args.response_lanes[0], args.prefill_tokens[0]
    window_first, ahead_first = args.burst_window_ms[0], args.decode_ahead[0]
    several_lanes, several_budgets = len(args.response_lanes) > 1, len(args.prefill_tokens) > 1
    several_windows, several_ahead = len(args.burst_window_ms) > 1, len(args.decode_ahead) > 1
    out = []
    for index, (name, options) in enumerate(variants(args.device, args.engines).items()):
        static = has_static_steps(options)
        first = ahead_first if static else 0  # eager steps cannot run ahead
        runs = [(lanes_first, budget_first, window_first, first)]
        if index == 0:
            runs = [(lanes, budget_first, window_first, first) for lanes in args.response_lanes]
            runs += [(lanes_first, b, window_first, first) for b in args.prefill_tokens[1:]]
            runs += [(lanes_first, budget_first, w, first) for w in args.burst_window_ms[1:]]
        if static:
            runs += [(lanes_first, budget_first, window_first, a) for a in args.decode_ahead[1:]]
        for lanes, budget, window, ahead in runs:
            system = f"triton:torch-{name}" + (f"-lanes{lanes}" if several_lanes else "")
            system += f"-prefill{budget}" if several_budgets else ""
            system += f"-window{window}" if several_windows else ""
            system += f"-ahead{ahead}" if several_ahead and static else ""
            served = {"max_prefill_tokens": budget, "burst_window_ms": window}
            out.append((system, options | served | {"decode_ahead": bool(ahead)}, lanes))
    return out


def plan(args) -> list[str]:
    """What the run will do, one line a step; raises on settings that cannot run."""
    from build_scripts.build_repo import RepoSettings

    window = 1024  # GPT-2's; the tiny model's too
    longest = max(args.prompt_tokens + [PUBLISHED["prompt_tokens"]])
    if longest + max(args.new_tokens, PUBLISHED["new_tokens"]) > window:
        raise SystemExit(f"error: prompts of {longest} + new tokens exceed the window {window}")
    for _, options, lanes in services(args):
        RepoSettings(
            str(args.model or "artifacts/models/gpt2-small-random"),
            "torch",
            max_sequences=max(args.concurrency),
            device=args.device,
            cuda_graphs=options.get("cuda_graphs", True),
            torch_compile=options.get("compile_decode", False),
            max_prefill_tokens=options.get("max_prefill_tokens", 0),
            burst_window_ms=options["burst_window_ms"],
            response_lanes=lanes,
            decode_ahead=options["decode_ahead"],
        )
    names = ", ".join(variants(args.device, args.engines))
    served = ", ".join(system.removeprefix("triton:torch-") for system, _, _ in services(args))
    grid = f"concurrency {args.concurrency} x prompt {args.prompt_tokens}, {args.new_tokens} tokens"
    exact = ", graphs fp32" if args.device.startswith("cuda") else ""
    static = [n for n, o in variants(args.device, args.engines).items() if has_static_steps(o)]
    ahead = (
        f"the loop on {static[0]} in fp32, {args.prompts} prompts at once, without and with "
        "decode ahead: the same text"
        if 1 in args.decode_ahead and static
        else "nothing to check (no --decode-ahead 1)"
        if 1 not in args.decode_ahead
        else "nothing to check (no variant with static decode steps)"
    )
    steps = {
        "ahead": ahead,
        "triton": f"tritonserver, gRPC, {served}: prompt {PUBLISHED['prompt_tokens']}, "
        f"{PUBLISHED['new_tokens']} tokens at 1; {grid}, {args.rounds} rounds at 1",
        "engine": f"decode step alone ({names}) at concurrency {args.concurrency}",
        "hf": f"Hugging Face generate() on {args.device} at concurrency 1, prompts "
        f"{args.prompt_tokens}",
        "consistency": f"torch engine ({names}{exact}) vs fp32 reference, {args.prompts} "
        "prompts; a TensorRT plan too where TensorRT is importable",
        "genai-perf": "if installed there (not carried)",
    }
    return [f"{s}: {'skipped' if s in args.skip else steps[s]}" for s in STEPS]


# -- the steps ------------------------------------------------------------------------------
def machine(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        smi = shutil.which("nvidia-smi")
        if smi:
            # the UUID tells one lent machine from another between runs
            fields = "--query-gpu=name,driver_version,memory.total,uuid"
            query = [smi, fields, "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True
            ).stdout.strip()
    return info


def bench_model(args) -> Path:
    """The model folder: ``--model``, or the bench model rebuilt from the bundle's config
    and tokenizer with the seed ``make bench-model`` uses (the same weights)."""
    if args.model is not None:
        return args.model
    from build_scripts import build_bench_model

    out = build_bench_model.output_dir()
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoConfig, AutoTokenizer

    source = args.bundle / "model"
    tokenizer = AutoTokenizer.from_pretrained(source)
    return build_bench_model.write_model(tokenizer, AutoConfig.from_pretrained(source))


def slot_engine(model, device: str, max_sequences: int, **options):
    from gpt2_triton.engines.factory import torch_slot_engine
    from gpt2_triton.engines.shape import ModelShape

    shape = ModelShape.from_hf_config(model.config)
    return torch_slot_engine(model, shape, device, max_sequences, **options)


def consistency(model_dir: Path, args, deadline: float = float("inf")) -> list[dict]:
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from build_scripts import verify

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # fp32, CPU: the reference
    window, eos = model.config.n_positions, model.config.eos_token_id
    new_tokens = 32
    prompt_ids = verify.verify_prompts(tokenizer, args.prompts, window, new_tokens)
    budgets = [verify.token_budget(len(p), new_tokens, window) for p in prompt_ids]
    ref = verify.reference(model, prompt_ids, budgets, eos)
    import torch

    precision = "fp16" if args.device.startswith("cuda") else "fp32"
    engines = variants(args.device, args.engines)
    checked = {f"torch {name}": (options, precision) for name, options in engines.items()}
    if args.device.startswith("cuda"):  # exact: any difference is the engine's, not fp16's
        exact = {"torch graphs fp32": ({"cuda_graphs": True, "dtype": torch.float32}, "fp32")}
        if "compiled" in engines:
            fp32 = engines["compiled"] | {"dtype": torch.float32}
            exact["torch compiled fp32"] = (fp32, "fp32")
        checked = exact | checked
    reports = []
    for name, (options, kind) in checked.items():
        if time.monotonic() > deadline:
            reports.append({"engine": name, "error": "skipped: past the deadline"})
            continue
        engine = slot_engine(copy.deepcopy(model), args.device, len(prompt_ids) + 1, **options)
        if getattr(engine.forward, "compile_failed", None):  # it would check the plain code
            reports.append({"engine": name, "error": engine.forward.describe()})
            continue
        report = verify.check_engine(name, kind, False, engine, ref, tokenizer, eos)
        reports.append(asdict(report) | {"ran": engine.forward.describe()})
        del engine
    plan_engine = tensorrt_engine(model_dir, len(prompt_ids) + 1)
    if plan_engine is not None:
        report = verify.check_engine("tensorrt", "fp16", False, plan_engine, ref, tokenizer, eos)
        reports.append(asdict(report))
    return reports


class _Collected:
    """A ``ResponseSink`` that keeps a request's text and its end."""

    def __init__(self) -> None:
        self.text, self.reason, self.error, self.done = "", "", None, False

    def send(self, output, final: bool) -> None:
        self.text += output.text
        self.reason, self.done = output.finish_reason, final

    def send_error(self, message: str) -> None:
        self.error, self.done = message, True

    def is_cancelled(self) -> bool:
        return False

    def close(self) -> None:
        self.done = True


def decode_ahead_check(model_dir: Path, args) -> dict | None:
    """The generation loop on the first variant with static decode steps (graphs on CUDA),
    in fp32, without and with ``decode_ahead``, every prompt at once (each up to 32 tokens,
    fewer where the window ends, so that the last step runs ahead at the window's last
    position), greedy: the streams must be the same text, and steps must have run ahead.
    fp32, because a step run ahead keeps the rows that finished meanwhile (a bucket or a
    window larger than the plain loop's step), which fp16 may round apart. None without
    ``--decode-ahead 1``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from build_scripts import verify
    from gpt2_triton.batcher import BatcherLimits, InflightBatcher
    from gpt2_triton.request import GenerationRequest
    from gpt2_triton.sampling import SamplingParams
    from gpt2_triton.text import TextCodec

    engines = variants(args.device, args.engines)
    static = [n for n, o in engines.items() if has_static_steps(o)]
    if 1 not in args.decode_ahead or not static:
        return None
    # the asynchronous path is the check's subject, not torch.compile: plain graphs
    name = static[0]
    options = {k: v for k, v in engines[name].items() if k != "compile_decode"}
    options["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    window = model.config.n_positions
    prompt_ids = verify.verify_prompts(tokenizer, args.prompts, window, 32)
    codec = TextCodec(model_dir)
    texts = [codec.decode(ids) for ids in prompt_ids]
    room = [(text, min(32, window - len(codec.encode(text)))) for text in texts]
    room = [(text, budget) for text, budget in room if budget >= 1]
    runs, steps_ahead = [], 0
    for ahead in (False, True):
        engine = slot_engine(copy.deepcopy(model), args.device, len(room), **options)
        limits = BatcherLimits(
            window, codec.eos_token_id, max_active=len(room), max_queue=len(room),
            decode_ahead=ahead,
        )  # fmt: skip
        batcher = InflightBatcher(engine, codec, limits)
        sinks = [_Collected() for _ in room]
        for (text, budget), sink in zip(room, sinks, strict=True):
            request = GenerationRequest(
                text, max_tokens=budget, stream=True, sampling=SamplingParams(temperature=0)
            )
            batcher.submit(request, sink)
        for _ in range(10_000):
            if all(s.done for s in sinks):
                break
            batcher.step()
        runs.append(sinks)
        steps_ahead = batcher.stats.steps_ahead
        engine_line = engine.forward.describe()
        del batcher, engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    plain, ahead = runs
    errors = [s.error for s in plain + ahead if s.error]
    differ = [  # (prompt, the first character where the streams part)
        (i, _parting(a.text, b.text))
        for i, (a, b) in enumerate(zip(plain, ahead, strict=True))
        if (a.text, a.reason) != (b.text, b.reason)
    ]
    return {
        "engine": f"torch {name} fp32, decode ahead",
        "identical": len(room) - len(differ),
        "prompts": len(room),
        "differ": differ,
        "steps_ahead": steps_ahead,
        "errors": errors[:3],
        "ran": f"decode ahead check: {engine_line}",
    }


def ahead_failure(check: dict | None) -> str | None:
    """Why the decode-ahead check failed (streams that differ, errors, nothing run ahead);
    None when it passed or did not run."""
    if not check:
        return None
    if check["differ"] or check["errors"]:
        return f"{check['prompts'] - check['identical']} streams differ, errors {check['errors']}"
    if not check["steps_ahead"]:
        return "no step ran ahead"
    return None


def _parting(a: str, b: str) -> int:
    """The first character where two texts differ (the shorter's length if one begins the
    other)."""
    return next(
        (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def tensorrt_engine(model_dir: Path, max_batch: int):
    """An fp16 TensorRT plan of the model through ``trt_forward.py``, built here; None
    (said in the output) where TensorRT is not importable."""
    from gpt2_triton.engines.trt_forward import import_tensorrt
    from gpt2_triton.errors import EngineError

    try:
        trt = import_tensorrt()
    except EngineError as exc:
        print(f"  tensorrt: not run ({exc})", flush=True)
        return None
    from build_scripts import build_engine, export_onnx
    from gpt2_triton.engines.factory import build_forward, read_shape
    from gpt2_triton.engines.stateful import StatefulEngine

    print(f"  tensorrt {trt.__version__}: export (opset 18, fp16 copy) and build", flush=True)
    export_dir = export_onnx.run(str(model_dir), fp16=True, skip_existing=True, tensorrt=True)
    build_engine.build(export_dir, build_engine.EngineSettings("fp16", max_batch=max_batch))
    shape = read_shape(export_dir)
    return StatefulEngine(build_forward("trt", export_dir, shape), shape, max_batch)


def compile_check(device: str) -> dict:
    """Whether torch.compile works on ``device`` here (the lent machines were never asked:
    Triton's kernels need a C compiler and Python's headers), in a few seconds."""
    import torch

    started = time.perf_counter()
    try:
        add_one = torch.compile(lambda x: x + 1, fullgraph=True)
        value = add_one(torch.ones(4, device=device))
        ok = bool((value == 2).all())
        why = None if ok else "a compiled x + 1 gave a wrong answer"
    except Exception as exc:
        ok, why = False, f"{type(exc).__name__}: {exc}"[:300]
    return {"ok": ok, "why": why, "seconds": round(time.perf_counter() - started, 1)}


def engine_steps(
    model_dir: Path, args, steps: int = 48, deadline: float = float("inf")
) -> list[dict]:
    """Decode steps of the engine alone, each followed by the argmax's copy to the host
    (what the service's sampler waits for): ms per step at each concurrency."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpt2_triton.engines.protocol import host_logits

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    rng = np.random.default_rng(0)
    for name, options in variants(args.device, args.engines).items():
        if time.monotonic() > deadline:
            rows.append({"engine": name, "error": "skipped: past the deadline"})
            continue
        engine = slot_engine(copy.deepcopy(model), args.device, max(args.concurrency), **options)
        if getattr(engine.forward, "compile_failed", None):  # it would time the plain code
            rows.append({"engine": name, "error": engine.forward.describe()})
            continue
        for c in args.concurrency:
            ids = list(range(c))
            prompts = rng.integers(0, model.config.vocab_size, (c, 32)).tolist()
            tokens = host_logits(engine.step(prompts, ids, [True] * c)).argmax(-1)
            times, gpu, cpu = [], [], []
            for _ in range(steps):
                marks = _gpu_marks(args.device)
                started, cpu_started = time.perf_counter(), time.process_time()
                logits = engine.step([[int(t)] for t in tokens], ids)
                tokens = logits.argmax(-1).cpu().numpy()  # the copy waits for the step
                times.append(time.perf_counter() - started)
                cpu.append(time.process_time() - cpu_started)
                gpu.append(_gpu_seconds(marks))
            try:  # the timings above stay, whatever the profiler does
                launched = kernel_profile(engine, ids, tokens, args.device)
            except Exception as exc:
                launched = {"error": f"{type(exc).__name__}: {exc}"}
            overlap = None
            if engine.decodes_ahead:
                try:
                    overlap = host_work_overlap(engine, ids, tokens, steps)
                except Exception as exc:
                    overlap = {"error": f"{type(exc).__name__}: {exc}"}
            engine.release(ids)
            rows.append(
                {
                    "engine": name,
                    "concurrency": c,
                    "step_ms_p50": 1e3 * float(np.median(times[4:])),
                    "step_ms_p90": 1e3 * float(np.percentile(times[4:], 90)),
                    # where a slow step's time went: the elapsed time between CUDA events
                    # around the step (launch gaps included: not the kernels' own time),
                    # and this process's CPU time (all its threads)
                    "gpu_ms_p50": 1e3 * float(np.median(gpu[4:])) if gpu[0] is not None else None,
                    "cpu_ms_p50": 1e3 * float(np.median(cpu[4:])),
                    "ran": engine.forward.describe(),
                    "graph_replays": engine.forward.graph_replays,
                    "launched": launched,
                    "overlap": overlap,
                }
            )
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


# the loop's own work a token (reading, detokenizing, sending), stood in for by a spin of
# the host: what decoding ahead is to hide behind the step
HOST_WORK_MS = 0.5


def host_work_overlap(engine, ids: list[int], tokens, steps: int) -> dict:
    """ms a token when each step is followed by HOST_WORK_MS of host work, plainly (step,
    argmax, its copy to the host, the work) and decoding ahead (argmax on the device, the
    next step queued, the copy, the work while that step runs, its logits taken): the
    first is about step + work, the second about max(step, work) if nothing else waits."""

    def work() -> None:
        end = time.perf_counter() + HOST_WORK_MS / 1e3
        while time.perf_counter() < end:
            pass

    plain, ahead = [], []
    for _ in range(steps):
        started = time.perf_counter()
        logits = engine.step([[int(t)] for t in tokens], ids)
        tokens = logits.argmax(-1).cpu().numpy()
        work()
        plain.append(time.perf_counter() - started)
    logits = engine.step([[int(t)] for t in tokens], ids)
    for _ in range(steps):
        started = time.perf_counter()
        tokens = engine.step_ahead(ids, logits.argmax(-1))
        work()
        logits = engine.step([[int(t)] for t in tokens], ids)  # the step run ahead
        ahead.append(time.perf_counter() - started)
    return {
        "host_work_ms": HOST_WORK_MS,
        "plain_ms_p50": 1e3 * float(np.median(plain[4:])),
        "ahead_ms_p50": 1e3 * float(np.median(ahead[4:])),
        "steps_ahead": engine.steps_ahead,
        "taken_back": engine.steps_ahead_taken_back,
    }


def kernel_profile(engine, ids: list[int], tokens, device: str, steps: int = 6) -> dict:
    """What a decode step launches, read by PyTorch's profiler over ``steps`` steps: on
    CUDA the GPU kernels (CUPTI sees those a graph replays too) with their summed time, so
    a step's time splits into the kernels' own and the gaps between them; on the CPU the
    operators PyTorch ran at top level. Per step: count, summed time, and the eight
    costliest names. Copies are left out; the argmax this bench adds is a kernel in."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.startswith("cuda")
    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as profiler:
        for _ in range(steps):
            logits = engine.step([[int(t)] for t in tokens], ids)
            tokens = logits.argmax(-1).cpu().numpy()
        if on_cuda:
            torch.cuda.synchronize()
    wanted = DeviceType.CUDA if on_cuda else DeviceType.CPU
    events = [
        e for e in profiler.events()
        if e.device_type == wanted and (on_cuda or e.cpu_parent is None)
        and not e.name.startswith(("Memcpy", "Memset"))  # the inputs' copy in, argmax's out
    ]  # fmt: skip
    by_name: dict[str, list[float]] = {}
    for event in events:
        by_name.setdefault(event.name, []).append(event.time_range.elapsed_us())
    costliest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:8]
    return {
        "what": "GPU kernels" if on_cuda else "top-level CPU operators",
        "per_step": len(events) / steps,
        "us_per_step": sum(sum(t) for t in by_name.values()) / steps,
        "costliest": [
            {"name": name[:120], "per_step": len(t) / steps, "us_per_step": sum(t) / steps}
            for name, t in costliest
        ],
    }


def _gpu_marks(device: str):
    """A CUDA event recorded now on ``device``'s current stream (None on the CPU), and its
    end."""
    if not device.startswith("cuda"):
        return None
    import torch

    stream = torch.cuda.current_stream(torch.device(device))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    return start, end, stream


def _gpu_seconds(marks) -> float | None:
    if marks is None:
        return None
    start, end, stream = marks
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def hf_generate(model_dir: Path, args) -> list[dict]:
    """``generate()`` as it comes (``hf-generate``) and, on CUDA, with cuDNN's attention
    switched off (``hf-generate-no-cudnn``): cuDNN builds a plan for each new shape, and
    each decode step of ``generate()`` is one position longer than the last. Each way is
    warmed up with a whole run first, and the order alternates between prompt lengths; the
    targets are judged against the faster of the two."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.harness import bench_hf

    on_cuda = args.device.startswith("cuda")
    dtype = torch.float16 if on_cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    without_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    ways = [("hf-generate", contextlib.nullcontext)]
    if on_cuda:  # the CPU has no cuDNN: one way
        ways.append((HF_NO_CUDNN, lambda: sdpa_kernel(without_cudnn)))
    rows = []
    for index, p in enumerate(args.prompt_tokens):
        for system, attention in ways if index % 2 == 0 else ways[::-1]:
            try:
                with attention():
                    bench_hf(model, tokenizer, 1, p, args.new_tokens)  # warm-up: every shape
                    row = bench_hf(model, tokenizer, 1, p, args.new_tokens, repeats=3)
            except Exception as exc:  # the other way's rows stay
                rows.append({"system": system, "prompt_tokens": p, "error": str(exc)[:200]})
                continue
            row.system = system
            rows.append(row.summary())
    del model
    return rows


def through_triton(model_dir: Path, args, record, deadline: float, ahead_failed=None) -> None:
    """Each variant served by its own tritonserver; ``record(row)`` after every point.
    ``ahead_failed``: why the decode-ahead check failed (its servers are then skipped: they
    would time a path that computes the wrong thing)."""
    from transformers import AutoTokenizer

    from benchmarks.harness import prompt_ids
    from benchmarks.served_load import ServedLoad
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton import checkpoint
    from gpt2_triton.triton_server import Ports, TritonServer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    grid = [(PUBLISHED["concurrency"], PUBLISHED["prompt_tokens"], PUBLISHED["new_tokens"])]
    grid += [(c, p, args.new_tokens) for p in args.prompt_tokens for c in args.concurrency]
    for index, (system, options, lanes) in enumerate(services(args)):
        name = system.removeprefix("triton:torch-")
        if options["decode_ahead"] and ahead_failed:
            record({"system": system, "skipped": f"the decode-ahead check failed: {ahead_failed}"})
            continue
        # the repository (with a 500 MB checkpoint) outside --out: only results travel back
        repository = checkpoint.artifacts_root() / "gpu_bench" / f"repo-{name}"
        settings = RepoSettings(
            str(model_dir),
            "torch",
            max_sequences=max(args.concurrency),
            device=args.device,
            cuda_graphs=options.get("cuda_graphs", True),
            torch_compile=options.get("compile_decode", False),
            max_prefill_tokens=options.get("max_prefill_tokens", 0),
            burst_window_ms=options["burst_window_ms"],
            response_lanes=lanes,
            decode_ahead=options["decode_ahead"],
        )
        port = args.port + 10 * index  # the next server never waits on the last's ports
        log_file = args.out / f"tritonserver-{name}.log"
        left = deadline - time.monotonic()
        if left < 60:  # not even its load would fit
            record({"system": system, "skipped": "deadline"})
            continue
        try:
            build(settings, repository=repository)
            # a compiling engine loads for minutes (its kernels compile inside the stub)
            ready = min(420.0 if settings.torch_compile else 120.0, left - 30)
            ports = Ports(port, port + 1, port + 2)
            server = TritonServer(repository, ports, log_file=log_file, ready_timeout=ready)
            with server, ServedLoad(server.grpc_url) as load:
                ran = [line for line in log_file.read_text().splitlines() if "gpt2: torch" in line]
                if ran and "compiled: failed" in ran[-1]:  # it would measure the plain code
                    record({"system": system, "error": ran[-1]})
                    continue
                for c, p, n in grid:
                    if time.monotonic() > deadline:
                        record({"system": system, "skipped": "deadline"})
                        break
                    print(f"  triton {name}: concurrency {c}, prompt {p}, {n} tokens", flush=True)
                    prompts = [tokenizer.decode(prompt_ids(tokenizer, p, i)) for i in range(c)]
                    params = {"max_tokens": n, "min_length": n, "temperature": 0}
                    rounds = args.rounds if c == 1 else max(args.rounds // 4, 1)
                    row, extra = load.point(system, prompts, params, rounds, p)
                    ran_line = ran[-1] if ran else None
                    served_with = {
                        "response_lanes": lanes,
                        "max_prefill_tokens": settings.max_prefill_tokens,
                        "burst_window_ms": settings.burst_window_ms,
                        "decode_ahead": settings.decode_ahead,
                    }
                    record(row.summary() | extra | {"ran": ran_line} | served_with)
        except Exception as exc:  # the other variant still runs
            record({"system": system, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            shutil.rmtree(repository, ignore_errors=True)


def genai_perf() -> dict:
    if shutil.which("genai-perf") is None:
        return {"ran": False, "why": "genai-perf is not installed on this machine (not carried)"}
    return {"ran": False, "why": "genai-perf is installed, but this script does not drive it yet"}


# -- the report -----------------------------------------------------------------------------
def _find(rows, system, c, p, n=None):
    """The measured row of that point; None when it was not measured, or when some of its
    requests failed (its numbers then describe the ones that did not: no verdict)."""
    for r in rows:
        if (
            r.get("system") == system
            and r.get("concurrency") == c
            and r.get("prompt_tokens") == p
            and (n is None or r.get("new_tokens") == n)
            and r.get("tokens_per_s")
            and not r.get("failed")
        ):
            return r
    return None


def incomplete(results: dict) -> list[str]:
    """The served points that failed, lost requests or were not run: a run with any of
    them exits 1, whatever its verdicts say."""
    points = []
    for r in results.get("triton") or []:
        where = f"{r.get('system')} c{r.get('concurrency', '?')} p{r.get('prompt_tokens', '?')}"
        if "error" in r:
            points.append(f"{where}: {r['error']}")
        elif "skipped" in r:
            points.append(f"{where}: skipped ({r['skipped']})")
        elif r.get("failed"):
            points.append(f"{where}: {r['failed']} request(s) failed: {r.get('first_failure')}")
    return points


def verdicts(results: dict, args) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for issue 13's targets, from what the run measured: the
    latency targets on the published workload's row (prompt 200, 100 tokens, one
    stream), the others at each prompt length."""
    served = results.get("triton") or []
    system = services(args)[0][0]
    hf = results.get("hf") or []
    lines = []
    published = _find(served, system, 1, PUBLISHED["prompt_tokens"], PUBLISHED["new_tokens"])
    where = f"c1 p{PUBLISHED['prompt_tokens']} n{PUBLISHED['new_tokens']}"
    itl_target, ttft_target = (
        f"ITL {where} <= {TARGET_ITL_MS} ms",
        f"TTFT {where} <= {TARGET_TTFT_MS} ms",
    )
    if published is None:  # always in the grid: it failed or was not reached
        lines += [(itl_target, "-", NOT_MEASURED), (ttft_target, "-", NOT_MEASURED)]
    else:
        itl, ttft = published["itl_ms_p50"], published["ttft_ms_p50"]
        if itl is None:  # every stream came in one piece: nothing streamed
            lines.append((itl_target, "-", ONE_PIECE))
        else:
            lines.append((itl_target, f"{itl:.2f} ms", _met(itl <= TARGET_ITL_MS)))
        lines.append((ttft_target, f"{ttft:.2f} ms", _met(ttft <= TARGET_TTFT_MS)))
    top_c = max(args.concurrency)
    for p in args.prompt_tokens:
        hf_target = f"per token vs HF generate() fp16, p{p} >= {TARGET_HF_SPEEDUP:.0f}x"
        scaling_target = f"tokens/s c{top_c} / c1, p{p} >= {TARGET_SCALING:.0f}x"
        one = _find(served, system, 1, p, args.new_tokens)
        if one is None:  # nothing to set the others against: each target said unjudged
            lines.append((hf_target, "-", NOT_MEASURED))
            if top_c > 1:
                lines.append((scaling_target, "-", NOT_MEASURED))
            continue
        bases = [b for b in (_find(hf, "hf-generate", 1, p), _find(hf, HF_NO_CUDNN, 1, p)) if b]
        base = min(bases, key=lambda b: b["itl_ms_p50"] or np.inf, default=None)  # the faster
        if base and base["itl_ms_p50"] and one["itl_ms_p50"]:
            speedup = base["itl_ms_p50"] / one["itl_ms_p50"]
            against = f" (vs {base['system']})" if len(bases) > 1 else ""
            lines.append(
                (hf_target, f"{speedup:.1f}x{against}", _met(speedup >= TARGET_HF_SPEEDUP))
            )
        elif base and base["itl_ms_p50"]:  # no ITL: the streams came in one piece each
            lines.append((hf_target, "-", ONE_PIECE))
        elif base:
            lines.append((hf_target, "-", "not judged: generate() gave no ITL"))
        if top_c > 1:  # a missing point is said, not left out: a missing line reads as none
            top = _find(served, system, top_c, p, args.new_tokens)
            if top:
                scaling = top["tokens_per_s"] / one["tokens_per_s"]
                lines.append((scaling_target, f"{scaling:.1f}x", _met(scaling >= TARGET_SCALING)))
            else:
                lines.append((scaling_target, "-", NOT_MEASURED))
    return lines


NOT_MEASURED = "not judged: the point failed, lost requests or was not run"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def markdown(results: dict, args) -> str:
    out = [f"# GPU benchmark, {results['started']}", ""]
    out.append("Machine: " + json.dumps(results.get("machine")))
    out.append("")
    rows = [
        r for r in (results.get("hf") or []) + (results.get("triton") or []) if "ttft_ms_p50" in r
    ]
    if rows:
        out += [
            "## Served (gRPC streams) and Hugging Face generate()",
            "",
            "| system | concurrency | prompt | new | TTFT p50 ms | ITL p50 ms | ITL p99 ms | "
            "tokens/s | failed | client CPU ms/token |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| {r['system']} | {r['concurrency']} | {r['prompt_tokens']} | "
                f"{r['new_tokens']} | {_num(r['ttft_ms_p50'])} | {_num(r['itl_ms_p50'])} | "
                f"{_num(r['itl_ms_p99'])} | {_num(r['tokens_per_s'], 0)} | "
                f"{r.get('failed', '-')} | {_num(r.get('client_cpu_ms_per_token'), 3)} |"
            )
        out.append("")
    timed = [r for r in results.get("engine") or [] if "step_ms_p50" in r]
    if timed:
        out += [
            "## Decode step, engine alone (ms)",
            "",
            "| engine | concurrency | p50 | p90 | GPU p50 | process CPU p50 | launched a step "
            "| their summed ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            launched = r.get("launched") or {}
            out.append(
                f"| {r['engine']} | {r['concurrency']} | {r['step_ms_p50']:.3f} | "
                f"{r['step_ms_p90']:.3f} | {_num(r.get('gpu_ms_p50'), 3)} | "
                f"{_num(r.get('cpu_ms_p50'), 3)} | {_num(launched.get('per_step'), 0)} | "
                f"{_num(launched.get('us_per_step') and launched['us_per_step'] / 1e3, 3)} |"
            )
        out.append("")
        overlapped = [r for r in timed if "ahead_ms_p50" in (r.get("overlap") or {})]
        if overlapped:
            out += [
                f"Decode step with {HOST_WORK_MS} ms of host work a token (ms a token; "
                "decoding ahead runs the work while the next step runs):",
                "",
                "| engine | concurrency | step alone | plain | decoding ahead |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {r['engine']} | {r['concurrency']} | {r['step_ms_p50']:.3f} | "
                f"{r['overlap']['plain_ms_p50']:.3f} | {r['overlap']['ahead_ms_p50']:.3f} |"
                for r in overlapped
            ]
            out.append("")
        first = timed[0]
        if (first.get("launched") or {}).get("costliest"):
            launched = first["launched"]
            out += [
                f"Costliest {launched['what']} a step, {first['engine']}, concurrency "
                f"{first['concurrency']}:",
                "",
                "| name | a step | us a step |",
                "|---|---|---|",
            ]
            out += [
                f"| `{k['name'][:80]}` | {k['per_step']:.1f} | {k['us_per_step']:.1f} |"
                for k in launched["costliest"]
            ]
            out.append("")
    checked = [r for r in results.get("consistency") or [] if "top1_agreement" in r]
    if checked:
        out += [
            "## Consistency (torch engine vs fp32 reference)",
            "",
            "| engine | precision | top-1 agreement | greedy identical (alone / batched) | "
            "max abs logit diff | prompt ms | decode ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in checked:
            out.append(
                f"| {r['engine']} | {r['precision']} | {r['top1_agreement']:.1%} | "
                f"{r['greedy_identical']}/{r['prompts']} / "
                f"{r['greedy_identical_batched']}/{r['prompts']} | "
                f"{r['max_abs_logit_diff']:.2e} | {r['prompt_latency_ms_p50']:.2f} | "
                f"{r['decode_latency_ms_p50']:.2f} |"
            )
        out.append("")
    if results.get("verdicts"):
        out += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in results["verdicts"]]
        out.append("")
    if results.get("ahead"):
        r = results["ahead"]
        out += [
            f"Decoding ahead ({r['engine']}, greedy, every prompt at once): "
            f"{r['identical']}/{r['prompts']} streams the same text as without, "
            f"{r['steps_ahead']} steps run ahead"
            + (f"; they part at (prompt, character) {r['differ']}" if r["differ"] else "")
            + (f"; errors: {r['errors']}" if r["errors"] else ""),
            "",
        ]
    ran = {r["ran"] for key in ("triton", "engine", "consistency") for r in results.get(key) or []
           if r.get("ran")}  # fmt: skip
    out += [f"- engine: {line}" for line in sorted(ran)]
    for r in results.get("triton") or []:
        if "skipped" in r or "error" in r:
            out.append(f"- {r['system']}: {r.get('error') or 'skipped (' + r['skipped'] + ')'}")
    for key in ("engine", "consistency"):
        for r in results.get(key) or []:
            if "error" in r:
                out.append(f"- {key} {r['engine']}: {r['error']}")
    if results.get("compile_check") and not results["compile_check"]["ok"]:
        out.append(f"- torch.compile does not work here: {results['compile_check']['why']}")
    for r in results.get("hf") or []:
        if "error" in r:
            out.append(f"- {r['system']}, prompt {r['prompt_tokens']}: {r['error']}")
    for step, error in (results.get("errors") or {}).items():
        out.append(f"- step {step} failed: {error}")
    if results.get("genai-perf"):
        out.append(f"- genai-perf: {results['genai-perf']['why']}")
    return "\n".join(out) + "\n"


def _num(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results["verdicts"] = verdicts(results, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "REPORT.md").write_text(markdown(results, args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.deadline_s
    from benchmarks import gpu_bundle

    # a dry run checks the bundle for the GPU machines' Python; a run, for the one running
    python = args.bundle_python or (
        gpu_bundle.PYTHON_VERSION if args.dry_run else "{}.{}".format(*sys.version_info[:2])
    )
    problems = [] if args.model is not None else gpu_bundle.check(args.bundle, python)
    print("plan:", *plan(args), sep="\n  ")
    if problems:
        print("bundle:", *problems, sep="\n  ", file=sys.stderr)
        return 2
    if args.dry_run:
        print("dry run: the bundle and the plan are in order")
        return 0
    from gpt2_triton import logs

    logs.setup()
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": {}, "triton": []}

    def record(row: dict) -> None:
        results["triton"].append(row)
        write(results, args)

    try:
        results["machine"] = machine(args.device)
        print("machine:", json.dumps(results["machine"]), flush=True)
        model_dir = bench_model(args)
    except Exception as exc:
        results["errors"]["set-up"] = f"{type(exc).__name__}: {exc}"
        write(results, args)
        print(markdown(results, args))
        return 1
    if "compiled" in args.engines:  # a C compiler, Python's headers, Triton: all needed
        results["compile_check"] = compile_check(args.device)
        if not results["compile_check"]["ok"]:
            args.engines = [e for e in args.engines if e != "compiled"]
            print("torch.compile does not work here:", results["compile_check"]["why"])
    steps = {
        "ahead": lambda: decode_ahead_check(model_dir, args),
        "triton": lambda: through_triton(
            model_dir, args, record, deadline, ahead_failure(results.get("ahead"))
        ),
        "engine": lambda: engine_steps(model_dir, args, deadline=deadline),
        "hf": lambda: hf_generate(model_dir, args),
        "consistency": lambda: consistency(model_dir, args, deadline),
        "genai-perf": genai_perf,
    }
    for name in STEPS:
        if name in args.skip:
            continue
        if time.monotonic() > deadline:
            results["errors"][name] = "skipped: past the deadline"
            continue
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            value = steps[name]()
            if value is not None:
                results[name] = value
            if name == "ahead" and ahead_failure(value):
                results["errors"][name] = ahead_failure(value)
        except Exception as exc:  # one failed step leaves the others' numbers
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"step {name} failed: {exc}", file=sys.stderr, flush=True)
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        write(results, args)
    print(markdown(results, args))
    unfinished = incomplete(results)
    for point in unfinished:
        print(f"incomplete: {point}", file=sys.stderr)
    return 1 if results["errors"] or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
