"""The GPU benchmark without a GPU: ``gpu_bench.sh --dry-run`` checks the bundle and the
plan, and every step of ``gpu_bench.py`` runs on the CPU at toy sizes (the tiny model, two
real tritonservers one after the other, the clients in worker processes). Not covered
here: the GPU's own paths (capture, fp16 logits through ``mm``'s fp32 output, the fp32
graphs check), the bundle's environment and the bench model rebuilt from it (rehearsed by
hand with a 3.11 bundle, docs/GPU.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bench, gpu_bundle

ROOT = Path(__file__).resolve().parent.parent


def fake_bundle(folder: Path, python: str = gpu_bundle.PYTHON_VERSION) -> Path:
    """A bundle's layout and manifest with stand-in files (the real one is 37 MiB)."""
    files = {gpu_bundle.SITE: b"site", **{f"model/{n}": b"{}" for n in gpu_bundle.MODEL_FILES}}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    manifest = {
        "python": python,
        "packages": list(gpu_bundle.PACKAGES),
        "files": {name: len(data) for name, data in files.items()},
    }
    (folder / gpu_bundle.MANIFEST).write_text(json.dumps(manifest))
    return folder


def dry_run(bundle: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), "--dry-run", *options],
        cwd=ROOT,
        env={"GPU_BUNDLE": str(bundle), "PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_dry_run_checks_the_bundle_and_prints_the_plan(tmp_path):
    bundle = fake_bundle(tmp_path / "bundle")
    done = dry_run(bundle)
    assert done.returncode == 0, done.stderr
    assert "triton: tritonserver, gRPC, graphs, eager, compiled" in done.stdout
    assert "in order" in done.stdout

    (bundle / "model" / "config.json").write_text('{"changed": true}')
    done = dry_run(bundle)
    assert done.returncode == 2 and "config.json is missing or changed" in done.stderr


@pytest.mark.parametrize(
    "problem, options, message",
    [
        ("no bundle", (), "make gpu-bundle"),
        ("another python", (), "built for Python 3.11, not 3.12"),
        ("too long", ("--prompt-tokens", "1000"), "exceed the window"),
        ("bad option", ("--concurrency", "0"), "must be >= 1"),
    ],
)
def test_the_dry_run_refuses_what_would_fail_there(tmp_path, problem, options, message):
    bundle = tmp_path / "bundle"
    if problem != "no bundle":
        fake_bundle(bundle, "3.11" if problem == "another python" else gpu_bundle.PYTHON_VERSION)
    done = dry_run(bundle, *options)
    assert done.returncode != 0 and message in done.stdout + done.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_options_and_sets_nothing_up(tmp_path, flag):
    """--help is answered before the machine's set-up, which would build (and keep, as
    complete) a virtual environment from a bundle made for another Python."""
    env_dir = tmp_path / "env"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), flag],
        cwd=ROOT,
        env={
            "GPU_BUNDLE": str(tmp_path / "no-bundle"),
            "GPU_BENCH_ENV": str(env_dir),
            "PATH": "/usr/bin:/bin",
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--engines" in done.stdout
    assert not env_dir.exists()


def test_pruning_keeps_the_machines_stub_and_drops_what_never_runs():
    def pruned(path):
        return gpu_bundle._pruned(Path(path), "3.12")

    stubs = "pytriton/tritonserver/python_backend_stubs"
    assert not pruned(f"{stubs}/3.12/triton_python_backend_stub")
    assert pruned(f"{stubs}/3.13/triton_python_backend_stub")
    assert pruned("nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0")
    assert not pruned("nvidia_pytriton.libs/libicudata-c1404396.so.70.1")  # libxml2 needs it
    assert pruned("tritonclient-2.51.0.data/data/bin/perf_analyzer")
    assert not pruned("tritonclient/grpc/_client.py")
    assert pruned("pytriton/triton.py") and not pruned("pytriton/tritonserver/bin/tritonserver")
    assert not pruned("pytriton/__init__.py")  # find_spec finds a regular package


@pytest.mark.integration
def test_every_step_runs_on_the_cpu(tmp_path, tiny_model):
    """gpu_bench.py end to end on the CPU: the tiny model, toy sizes, a real tritonserver."""
    out = tmp_path / "out"
    code = gpu_bench.main(
        [
            "--device", "cpu", "--model", str(tiny_model), "--concurrency", "1", "2",
            "--prompt-tokens", "8", "--new-tokens", "6", "--rounds", "1", "--prompts", "4",
            "--port", "18170", "--out", str(out), "--decode-ahead", "1",
        ]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and results["errors"] == {}
    # only what should travel back from a device machine: no repository, no checkpoint
    assert sorted(p.name for p in out.iterdir()) == [
        "REPORT.md", "results.json", "tritonserver-eager.log", "tritonserver-static.log",
    ]  # fmt: skip
    assert [r["engine"] for r in results["consistency"]] == ["torch static", "torch eager"]
    ahead = results["ahead"]  # the loop with and without decoding ahead, first
    assert ahead["identical"] == ahead["prompts"] >= 3 and ahead["steps_ahead"] > 0
    assert not ahead["errors"] and not ahead["differ"]
    assert list(results["seconds"])[0] == "ahead"
    for report in results["consistency"]:  # fp32 on the CPU: the reference's own tokens
        assert report["top1_agreement"] == 1.0 and report["greedy_identical_batched"] == 4
    assert {(r["engine"], r["concurrency"]) for r in results["engine"]} == {
        (e, c) for e in ("static", "eager") for c in (1, 2)
    }
    static = [r for r in results["engine"] if r["engine"] == "static"]
    assert all(r["graph_replays"] > 0 for r in static)  # the graphs' inputs path ran
    for row in results["engine"]:  # host work after each step, plainly and decoding ahead
        if row["engine"] == "static":
            overlap = row["overlap"]
            assert overlap["plain_ms_p50"] > overlap["host_work_ms"] and overlap["taken_back"] == 0
            assert overlap["ahead_ms_p50"] > 0 and overlap["steps_ahead"] >= 40
        else:  # eager steps cannot run ahead
            assert row["overlap"] is None
    for row in results["engine"]:  # what a step ran, from the profiler
        launched = row["launched"]
        assert launched["per_step"] > 0 and launched["us_per_step"] > 0
        assert any("addmm" in k["name"] for k in launched["costliest"])
    for variant in ("static", "eager"):  # both servers, one after the other
        served = [r for r in results["triton"] if r["system"] == f"triton:torch-{variant}"]
        points = [(r["concurrency"], r["prompt_tokens"], r["new_tokens"]) for r in served]
        assert points == [(1, 200, 100), (1, 8, 6), (2, 8, 6)]
        assert all(r["tokens_per_s"] > 0 and r["failed"] == 0 for r in served)
        assert all(r["tokens"] if "tokens" in r else True for r in served)
        assert all("torch on cpu" in r["ran"] for r in served)
        assert all(r["decode_ahead"] == (variant == "static") for r in served)  # eager cannot
    assert [r["system"] for r in results["hf"]] == ["hf-generate"]  # on CUDA, no-cudnn too
    report = (out / "REPORT.md").read_text()
    assert "Costliest top-level CPU operators a step, static, concurrency 1" in report
    assert "| ITL c1 p200 n100" in report and "tokens/s c2 / c1, p8" in report
    assert "streams the same text as without" in report
    assert "ms of host work a token" in report


def test_engines_narrows_the_variants_and_refuses_unknown_ones(capsys):
    args = gpu_bench.parse_args(["--engines", "graphs"])
    assert [system for system, _, _ in gpu_bench.services(args)] == ["triton:torch-graphs"]
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--engines", "static"])  # the CPU's name, not CUDA's
    assert "not in ['graphs', 'eager', 'compiled']" in capsys.readouterr().err


def test_each_lanes_value_gets_a_graphs_server_and_the_first_is_judged():
    args = gpu_bench.parse_args(["--response-lanes", "4", "1", "8"])
    assert [(system, lanes) for system, _, lanes in gpu_bench.services(args)] == [
        ("triton:torch-graphs-lanes4", 4),
        ("triton:torch-graphs-lanes1", 1),
        ("triton:torch-graphs-lanes8", 8),
        ("triton:torch-eager-lanes4", 4),
        ("triton:torch-compiled-lanes4", 4),
    ]
    one = gpu_bench.parse_args([])  # the repository's default, under the plain names
    assert [system for system, _, _ in gpu_bench.services(one)] == [
        "triton:torch-graphs", "triton:torch-eager", "triton:torch-compiled",
    ]  # fmt: skip
    compiled = dict(gpu_bench.variants("cuda"))["compiled"]
    assert compiled == {"cuda_graphs": True, "compile_decode": True}
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--response-lanes", "0"])


def triton_line(plan: list[str]) -> str:
    return next(line for line in plan if line.startswith("triton:"))


def test_each_further_prefill_budget_gets_a_graphs_server_with_the_first_lanes():
    args = gpu_bench.parse_args(["--response-lanes", "1", "4", "--prefill-tokens", "0", "2048"])
    served = [
        (system, o["max_prefill_tokens"], lanes) for system, o, lanes in gpu_bench.services(args)
    ]
    assert served == [
        ("triton:torch-graphs-lanes1-prefill0", 0, 1),
        ("triton:torch-graphs-lanes4-prefill0", 0, 4),
        ("triton:torch-graphs-lanes1-prefill2048", 2048, 1),
        ("triton:torch-eager-lanes1-prefill0", 0, 1),
        ("triton:torch-compiled-lanes1-prefill0", 0, 1),
    ]
    assert "graphs-lanes1-prefill2048" in triton_line(
        gpu_bench.plan(args)
    )  # the settings are valid
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--prefill-tokens", "-1"])


def test_each_further_burst_window_gets_a_graphs_server_with_the_first_lanes_and_budget():
    args = gpu_bench.parse_args(["--prefill-tokens", "0", "2048", "--burst-window-ms", "0", "2"])
    served = [
        (system, o["max_prefill_tokens"], o["burst_window_ms"], lanes)
        for system, o, lanes in gpu_bench.services(args)
    ]
    assert served == [
        ("triton:torch-graphs-prefill0-window0", 0, 0, 1),
        ("triton:torch-graphs-prefill2048-window0", 2048, 0, 1),
        ("triton:torch-graphs-prefill0-window2", 0, 2, 1),
        ("triton:torch-eager-prefill0-window0", 0, 0, 1),
        ("triton:torch-compiled-prefill0-window0", 0, 0, 1),
    ]
    assert "graphs-prefill0-window2" in triton_line(gpu_bench.plan(args))  # the settings are valid
    from gpt2_triton.batcher import MAX_BURST_WINDOW_MS

    for window in (-1, MAX_BURST_WINDOW_MS + 1):
        with pytest.raises(SystemExit):
            gpu_bench.parse_args(["--burst-window-ms", str(window)])
    for option in ("--burst-window-ms", "--prefill-tokens", "--response-lanes"):
        with pytest.raises(SystemExit):  # a repeated value: two servers under one name
            gpu_bench.parse_args([option, "2", "2"])


def test_each_further_decode_ahead_value_gets_a_server_per_variant_with_static_steps():
    args = gpu_bench.parse_args(
        ["--prefill-tokens", "0", "2048", "--burst-window-ms", "0", "6", "--decode-ahead", "0", "1"]
    )
    served = [(system, o["decode_ahead"]) for system, o, _ in gpu_bench.services(args)]
    assert served == [
        ("triton:torch-graphs-prefill0-window0-ahead0", False),
        ("triton:torch-graphs-prefill2048-window0-ahead0", False),
        ("triton:torch-graphs-prefill0-window6-ahead0", False),
        ("triton:torch-graphs-prefill0-window0-ahead1", True),
        ("triton:torch-eager-prefill0-window0", False),
        ("triton:torch-compiled-prefill0-window0-ahead0", False),
        ("triton:torch-compiled-prefill0-window0-ahead1", True),
    ]
    assert "compiled-prefill0-window0-ahead1" in triton_line(gpu_bench.plan(args))  # valid settings
    on_cpu = gpu_bench.parse_args(["--device", "cpu", "--decode-ahead", "1"])
    assert [(system, o["decode_ahead"]) for system, o, _ in gpu_bench.services(on_cpu)] == [
        ("triton:torch-static", True), ("triton:torch-eager", False),
    ]  # fmt: skip
    for values in (["2"], ["1", "1"]):
        with pytest.raises(SystemExit):
            gpu_bench.parse_args(["--decode-ahead", *values])


def test_a_stream_that_came_in_one_piece_leaves_the_verdicts_standing():
    """Pieces that wait join: a short stream can arrive as one piece, with no ITL to read."""
    args = gpu_bench.parse_args(["--device", "cpu", "--concurrency", "1", "2"])
    args.prompt_tokens, args.new_tokens = [8], 6

    def row(system, concurrency, itl):
        return {
            "system": system, "concurrency": concurrency, "prompt_tokens": 8, "new_tokens": 6,
            "tokens_per_s": 10.0 * concurrency, "itl_ms_p50": itl, "ttft_ms_p50": 1.0,
        }  # fmt: skip

    served = [row("triton:torch-static", 1, 0.0), row("triton:torch-static", 2, 0.0)]
    results = {"triton": served, "hf": [row("hf-generate", 1, 5.0)]}
    assert gpu_bench.verdicts(results, args)[2:] == [
        ("per token vs HF generate() fp16, p8 >= 10x", "-", gpu_bench.ONE_PIECE),
        ("tokens/s c2 / c1, p8 >= 20x", "2.0x", "missed"),
    ]


def test_a_point_with_failed_requests_is_not_judged_and_fails_the_run():
    """Its tokens/s is that of the requests that did not fail: it was judged "met", and
    the run exited 0. A point skipped by the deadline left its verdict out silently."""
    args = gpu_bench.parse_args(["--device", "cpu", "--concurrency", "1", "64"])
    args.prompt_tokens, args.new_tokens = [8], 6

    def row(concurrency, **extra):
        return {
            "system": "triton:torch-static", "concurrency": concurrency, "prompt_tokens": 8,
            "new_tokens": 6, "tokens_per_s": 10.0 * concurrency, "itl_ms_p50": 1.0,
            "ttft_ms_p50": 1.0, "failed": 0, **extra,
        }  # fmt: skip

    clean = {"triton": [row(1), row(64)], "hf": []}
    assert gpu_bench.verdicts(clean, args)[-1][2] == "met" and not gpu_bench.incomplete(clean)
    # the published workload's row (prompt 200) is not among these: said, not left out
    assert [v[2] for v in gpu_bench.verdicts(clean, args)[:2]] == [gpu_bench.NOT_MEASURED] * 2
    lone = {"triton": [row(64)], "hf": []}  # no c1 row: nothing to judge the others by
    assert {v[2] for v in gpu_bench.verdicts(lone, args)} == {gpu_bench.NOT_MEASURED}
    for top in (row(64, failed=40, first_failure="UNAVAILABLE: gone"),
                {"system": "triton:torch-static", "skipped": "deadline"}):  # fmt: skip
        results = {"triton": [row(1), top], "hf": []}
        assert gpu_bench.verdicts(results, args)[-1] == (
            "tokens/s c64 / c1, p8 >= 20x",
            "-",
            gpu_bench.NOT_MEASURED,
        )
        (point,) = gpu_bench.incomplete(results)
        assert "UNAVAILABLE: gone" in point or "skipped (deadline)" in point


def test_the_per_token_target_is_judged_against_the_faster_generate():
    args = gpu_bench.parse_args(["--device", "cpu", "--concurrency", "1"])
    args.prompt_tokens, args.new_tokens = [8], 6

    def row(system, itl):
        return {
            "system": system, "concurrency": 1, "prompt_tokens": 8, "new_tokens": 6,
            "tokens_per_s": 100.0, "itl_ms_p50": itl, "ttft_ms_p50": 1.0,
        }  # fmt: skip

    hf = [row("hf-generate", 12.0), row("hf-generate-no-cudnn", 6.0)]
    results = {"triton": [row("triton:torch-static", 1.0)], "hf": hf}
    assert gpu_bench.verdicts(results, args)[2:] == [
        ("per token vs HF generate() fp16, p8 >= 10x", "6.0x (vs hf-generate-no-cudnn)", "missed")
    ]
    results["hf"] = hf[:1]  # one of them: no name needed
    assert gpu_bench.verdicts(results, args)[2][1] == "12.0x"


def test_the_compile_check_says_whether_torch_compile_works_here():
    check = gpu_bench.compile_check("cpu")  # inductor's C++ backend on this machine
    assert check["ok"] and check["why"] is None and check["seconds"] >= 0


def test_a_failed_decode_ahead_check_is_an_error_that_says_why():
    passed = {"prompts": 4, "identical": 4, "differ": [], "errors": [], "steps_ahead": 9}
    assert gpu_bench.ahead_failure(passed) is None and gpu_bench.ahead_failure(None) is None
    parted = passed | {"identical": 3, "differ": [(2, 17)]}
    assert gpu_bench.ahead_failure(parted).startswith("1 streams differ")
    assert gpu_bench.ahead_failure(passed | {"steps_ahead": 0}) == "no step ran ahead"
    assert "boom" in gpu_bench.ahead_failure(passed | {"errors": ["boom"]})
