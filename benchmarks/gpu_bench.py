"""The GPU benchmark: one call on a GPU machine that answers what the GPU path is worth.

    benchmarks/gpu_bench.sh [--dry-run] [options]     (make gpu-bench; make gpu-bundle here first)

On GPT-2 small's architecture (the bench model: random weights drawn from a fixed seed,
GPT-2's tokenizer), on one GPU, in one run, in this order:

1. ``consistency``: the torch engine in fp16 with its static cache, CUDA graphs and then
   eager, against the fp32 reference (Hugging Face on the CPU): verify.py's check (top-1
   agreement, greedy sequences identical alone and batched, max abs logit difference).
   Where TensorRT is importable, an fp16 plan is built (opset-18 export, ``build_engine``)
   and checked the same way through ``trt_forward.py``; where not, the run says so.
2. ``engine``: a decode step of the engine alone at each concurrency, graphs and eager.
3. ``hf``: Hugging Face ``generate()`` in fp16 on the same GPU (greedy, exact length).
4. ``triton``: the service through the pip ``tritonserver`` over gRPC (the front door's
   Envoy does not travel): TTFT, ITL and tokens/s at each concurrency and prompt length,
   exactly ``--new-tokens`` tokens, with CUDA graphs and then eager; and the published
   TensorRT-LLM workload's shape (200-token prompts, 100 tokens, concurrency 1).
5. ``genai-perf``: run when the machine has it; it is not carried (it wants an environment
   of its own, with numpy 2 and perf_analyzer), so the run says so.

Each step's results are written as soon as it ends (``--out``: ``results.json`` and
``REPORT.md``; ``$OUT`` on the device tool's machines), so a run cut short keeps what it
measured; the end prints one table with the targets. ``--dry-run`` checks the bundle and
the plan without a GPU (``make test`` runs it); ``--device cpu --model artifacts/models/tiny``
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

STEPS = ("consistency", "engine", "hf", "triton", "genai-perf")
# issue 13's targets, at concurrency 1 through Triton on an H100 or H200 (TensorRT-LLM's
# published genai-perf figures for GPT-2 on Triton: TTFT 13.7 ms, ITL 1.86 ms)
TARGET_ITL_MS = 1.86
TARGET_TTFT_MS = 13.7
TARGET_HF_SPEEDUP = 10.0  # per token, over Hugging Face generate() fp16, same run
TARGET_SCALING = 20.0  # tokens/s at concurrency 64 over concurrency 1
PUBLISHED = {"prompt_tokens": 200, "new_tokens": 100, "concurrency": 1}  # their workload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--skip", nargs="*", choices=STEPS, default=[])
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "artifacts/gpu_bench")
    )
    parser.add_argument("--dry-run", action="store_true", help="check the bundle and the plan")
    parser.add_argument(
        "--bundle-python", default=None,
        help="the Python the bundle must be for (default: 3.12 in a dry run, else this one)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.concurrency + args.prompt_tokens + [args.new_tokens, args.rounds]) < 1:
        parser.error("concurrency, prompt tokens, new tokens and rounds must be >= 1")
    return args


def variants(device: str) -> dict[str, dict]:
    """The engines compared: on CUDA graphs and eager; on the CPU the graphs' static
    inputs without capture (``static_decode``) and eager."""
    if device.startswith("cuda"):
        return {"graphs": {"cuda_graphs": True}, "eager": {"cuda_graphs": False}}
    return {"static": {"static_decode": True}, "eager": {"static_decode": False}}


def plan(args) -> list[str]:
    """What the run will do, one line a step; raises on settings that cannot run."""
    from build_scripts.build_repo import RepoSettings

    window = 1024  # GPT-2's; the tiny model's too
    longest = max(args.prompt_tokens + [PUBLISHED["prompt_tokens"]])
    if longest + max(args.new_tokens, PUBLISHED["new_tokens"]) > window:
        raise SystemExit(f"error: prompts of {longest} + new tokens exceed the window {window}")
    for options in variants(args.device).values():
        RepoSettings(
            str(args.model or "artifacts/models/gpt2-small-random"),
            "torch",
            max_sequences=max(args.concurrency),
            device=args.device,
            cuda_graphs=options.get("cuda_graphs", True),
        )
    names = ", ".join(variants(args.device))
    grid = f"concurrency {args.concurrency} x prompt {args.prompt_tokens}, {args.new_tokens} tokens"
    steps = {
        "consistency": f"torch engine ({names}) vs fp32 reference, {args.prompts} prompts; "
        "a TensorRT plan too where TensorRT is importable",
        "engine": f"decode step alone ({names}) at concurrency {args.concurrency}",
        "hf": f"Hugging Face generate() on {args.device} at concurrency 1, prompts "
        f"{args.prompt_tokens}",
        "triton": f"tritonserver, gRPC, {names}: {grid}, {args.rounds} rounds at 1; "
        f"and prompt {PUBLISHED['prompt_tokens']}, {PUBLISHED['new_tokens']} tokens at 1",
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
            query = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
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
    from gpt2_triton.engines.shape import ModelShape
    from gpt2_triton.engines.slots import SlotEngine
    from gpt2_triton.engines.torch_slots import TorchSlotForward

    shape = ModelShape.from_hf_config(model.config)
    forward = TorchSlotForward(model, shape, device, **options)
    forward.capture_graphs(max_sequences)
    return SlotEngine(forward, shape, max_sequences)


def consistency(model_dir: Path, args) -> list[dict]:
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
    precision = "fp16" if args.device.startswith("cuda") else "fp32"
    reports = []
    for name, options in variants(args.device).items():
        engine = slot_engine(copy.deepcopy(model), args.device, len(prompt_ids) + 1, **options)
        report = verify.check_engine(f"torch {name}", precision, False, engine, ref, tokenizer, eos)
        reports.append(asdict(report))
        del engine
    plan_engine = tensorrt_engine(model_dir, len(prompt_ids) + 1)
    if plan_engine is not None:
        report = verify.check_engine("tensorrt", "fp16", False, plan_engine, ref, tokenizer, eos)
        reports.append(asdict(report))
    return reports


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
    export_dir = export_onnx.run(str(model_dir), opset=18, fp16=True, skip_existing=True)
    build_engine.build(export_dir, build_engine.EngineSettings("fp16", max_batch=max_batch))
    shape = read_shape(export_dir)
    return StatefulEngine(build_forward("trt", export_dir, shape), shape, max_batch)


def engine_steps(model_dir: Path, args, steps: int = 48) -> list[dict]:
    """Decode steps of the engine alone, each followed by the argmax's copy to the host
    (what the service's sampler waits for): ms per step at each concurrency."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpt2_triton.engines.protocol import host_logits

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    rng = np.random.default_rng(0)
    for name, options in variants(args.device).items():
        engine = slot_engine(copy.deepcopy(model), args.device, max(args.concurrency), **options)
        for c in args.concurrency:
            ids = list(range(c))
            prompts = rng.integers(0, model.config.vocab_size, (c, 32)).tolist()
            tokens = host_logits(engine.step(prompts, ids, [True] * c)).argmax(-1)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                logits = engine.step([[int(t)] for t in tokens], ids)
                tokens = logits.argmax(-1).cpu().numpy()  # the copy waits for the step
                times.append(time.perf_counter() - started)
            engine.release(ids)
            rows.append(
                {
                    "engine": name,
                    "concurrency": c,
                    "step_ms_p50": 1e3 * float(np.median(times[4:])),
                    "step_ms_p90": 1e3 * float(np.percentile(times[4:], 90)),
                }
            )
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def hf_generate(model_dir: Path, args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.harness import bench_hf

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for p in args.prompt_tokens:
        rows.append(bench_hf(model, tokenizer, 1, p, args.new_tokens).summary())
    del model
    return rows


def through_triton(model_dir: Path, args, out: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from benchmarks.harness import bench_triton
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.triton_server import Ports, TritonServer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    grid = [(c, p, args.new_tokens) for p in args.prompt_tokens for c in args.concurrency]
    grid.append((PUBLISHED["concurrency"], PUBLISHED["prompt_tokens"], PUBLISHED["new_tokens"]))
    engines = variants(args.device)
    if not args.device.startswith("cuda"):  # the server runs eagerly on the CPU either way
        engines = dict(list(engines.items())[:1])
    rows = []
    for name, options in engines.items():
        repository = build(
            RepoSettings(
                str(model_dir),
                "torch",
                max_sequences=max(args.concurrency),
                device=args.device,
                cuda_graphs=options.get("cuda_graphs", True),
            ),
            repository=out / f"repo-{name}",
        )
        ports = Ports(args.port, args.port + 1, args.port + 2)
        with TritonServer(repository, ports, log_file=out / f"tritonserver-{name}.log") as server:
            for c, p, n in grid:
                print(f"  triton {name}: concurrency {c}, prompt {p}, {n} tokens", flush=True)
                (row,) = bench_triton(
                    {"triton": server.grpc_url},
                    "torch",
                    tokenizer,
                    c,
                    p,
                    n,
                    server.process.pid,
                    rounds=args.rounds if c == 1 else max(args.rounds // 4, 1),
                    rest_s=0.0,
                )
                row.system = f"triton:torch-{name}"
                rows.append(row.summary())
        shutil.rmtree(repository / "engine" / "1" / "checkpoint", ignore_errors=True)
    return rows


def genai_perf() -> dict:
    if shutil.which("genai-perf") is None:
        return {"ran": False, "why": "genai-perf is not installed on this machine (not carried)"}
    return {"ran": False, "why": "genai-perf is installed, but this script does not drive it yet"}


# -- the report -----------------------------------------------------------------------------
def _find(rows, system, c, p, n=None):
    for r in rows:
        if (
            r["system"] == system
            and r["concurrency"] == c
            and r["prompt_tokens"] == p
            and (n is None or r["new_tokens"] == n)
        ):
            return r
    return None


def verdicts(results: dict, args) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for issue 13's targets, from what the run measured."""
    served = results.get("triton") or []
    first = next(iter(variants(args.device)))
    system = f"triton:torch-{first}"
    hf = results.get("hf") or []
    lines = []
    for p in args.prompt_tokens:
        one = _find(served, system, 1, p, args.new_tokens)
        if one is None:
            continue
        lines.append(
            (f"ITL c1 p{p} <= {TARGET_ITL_MS} ms", f"{one['itl_ms_p50']:.2f} ms",
             _met(one["itl_ms_p50"] <= TARGET_ITL_MS))
        )  # fmt: skip
        lines.append(
            (f"TTFT c1 p{p} <= {TARGET_TTFT_MS} ms", f"{one['ttft_ms_p50']:.2f} ms",
             _met(one["ttft_ms_p50"] <= TARGET_TTFT_MS))
        )  # fmt: skip
        base = _find(hf, "hf-generate", 1, p)
        if base and base["itl_ms_p50"]:
            speedup = base["itl_ms_p50"] / one["itl_ms_p50"]
            lines.append(
                (f"per token vs HF generate() fp16, p{p} >= {TARGET_HF_SPEEDUP:.0f}x",
                 f"{speedup:.1f}x", _met(speedup >= TARGET_HF_SPEEDUP))
            )  # fmt: skip
        top = _find(served, system, max(args.concurrency), p, args.new_tokens)
        if top and max(args.concurrency) > 1 and one["tokens_per_s"]:
            scaling = top["tokens_per_s"] / one["tokens_per_s"]
            lines.append(
                (f"tokens/s c{max(args.concurrency)} / c1, p{p} >= {TARGET_SCALING:.0f}x",
                 f"{scaling:.1f}x", _met(scaling >= TARGET_SCALING))
            )  # fmt: skip
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def markdown(results: dict, args) -> str:
    out = [f"# GPU benchmark, {results['started']}", ""]
    out.append("Machine: " + json.dumps(results["machine"]))
    out.append("")
    if results.get("consistency"):
        out += [
            "## Consistency (torch engine vs fp32 reference)",
            "",
            "| engine | precision | top-1 agreement | greedy identical (alone / batched) | "
            "max abs logit diff | prompt ms | decode ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["consistency"]:
            out.append(
                f"| {r['engine']} | {r['precision']} | {r['top1_agreement']:.1%} | "
                f"{r['greedy_identical']}/{r['prompts']} / "
                f"{r['greedy_identical_batched']}/{r['prompts']} | "
                f"{r['max_abs_logit_diff']:.2e} | {r['prompt_latency_ms_p50']:.2f} | "
                f"{r['decode_latency_ms_p50']:.2f} |"
            )
        out.append("")
    if results.get("engine"):
        out += ["## Decode step, engine alone (ms)", "", "| engine | concurrency | p50 | p90 |"]
        out.append("|---|---|---|---|")
        for r in results["engine"]:
            out.append(
                f"| {r['engine']} | {r['concurrency']} | {r['step_ms_p50']:.3f} | "
                f"{r['step_ms_p90']:.3f} |"
            )
        out.append("")
    rows = (results.get("hf") or []) + (results.get("triton") or [])
    if rows:
        out += [
            "## Served (gRPC streams) and Hugging Face generate()",
            "",
            "| system | concurrency | prompt | new | TTFT p50 ms | ITL p50 ms | ITL p99 ms | "
            "tokens/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| {r['system']} | {r['concurrency']} | {r['prompt_tokens']} | "
                f"{r['new_tokens']} | {_num(r['ttft_ms_p50'])} | {_num(r['itl_ms_p50'])} | "
                f"{_num(r['itl_ms_p99'])} | {_num(r['tokens_per_s'], 0)} |"
            )
        out.append("")
    if results.get("verdicts"):
        out += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in results["verdicts"]]
        out.append("")
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
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": {}}
    results["machine"] = machine(args.device)
    print("machine:", json.dumps(results["machine"]), flush=True)
    model_dir = bench_model(args)
    steps = {
        "consistency": lambda: consistency(model_dir, args),
        "engine": lambda: engine_steps(model_dir, args),
        "hf": lambda: hf_generate(model_dir, args),
        "triton": lambda: through_triton(model_dir, args, args.out),
        "genai-perf": genai_perf,
    }
    for name in STEPS:
        if name in args.skip:
            continue
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            results[name] = steps[name]()
        except Exception as exc:  # one failed step leaves the others' numbers
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"step {name} failed: {exc}", file=sys.stderr, flush=True)
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        write(results, args)
    print(markdown(results, args))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
