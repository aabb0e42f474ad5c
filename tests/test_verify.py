"""build_scripts/verify.py: one thread count for every engine, prompts that span the window."""

import os

import pytest

from build_scripts import verify


@pytest.fixture()
def affinity(monkeypatch):
    """Pretend this process may run on ``n`` CPUs."""

    def set_cpus(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)

    return set_cpus


@pytest.mark.parametrize(
    "cpus, cpu_max, expected",
    [
        (8, None, 8),  # no cgroup v2 file: the affinity mask
        (8, "max 100000\n", 8),  # cgroup without a quota
        (8, "200000 100000\n", 2),  # quota of 2 CPUs on an 8-CPU host
        (8, "150000 100000\n", 1),  # 1.5 CPUs: a second busy thread would be throttled
        (8, "50000 100000\n", 1),  # half a CPU: still one thread
        (2, "400000 100000\n", 2),  # taskset to 2 CPUs under a 4-CPU quota
        (4, "garbage\n", 4),  # unreadable contents: the affinity mask
    ],
)
def test_available_cpus_follow_affinity_and_cgroup_quota(
    tmp_path, affinity, cpus, cpu_max, expected
):
    affinity(cpus)
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert verify.available_cpus(path) == expected
    assert verify.resolve_threads(0, path) == expected


def test_explicit_threads_win(tmp_path, affinity):
    affinity(8)
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert verify.resolve_threads(3, tmp_path / "cpu.max") == 3


@pytest.mark.parametrize("new_tokens", [1, 32, 100])
def test_prompts_reach_the_last_position_of_the_window(tiny_tokenizer, new_tokens):
    window = 1024  # the tiny model's, as gpt2's
    prompts = verify.verify_prompts(tiny_tokenizer, 32, window, new_tokens)
    assert len(prompts) == 32
    lengths = sorted(map(len, prompts))
    assert lengths[-1] == window  # its prompt step is compared at position window - 1
    budgets = [verify.token_budget(len(p), new_tokens, window) for p in prompts]
    # a prompt that leaves room for every generated token, fed up to the last position
    pairs = list(zip(map(len, prompts), budgets, strict=True))
    assert any(n >= window - new_tokens and b == new_tokens for n, b in pairs)
    full = [[0] * b for b in budgets]  # every budget used, no EOS
    assert verify.last_position(prompts, full) == window - 1
    assert all(n + b - 1 <= window for n, b in pairs)  # never beyond the window
    assert lengths[0] < 20 and any(300 < n < 700 for n in lengths)  # short and mid as well
    assert all(0 <= t < len(tiny_tokenizer) for p in prompts for t in p)


def test_report_records_threads_and_positions(tiny_export, tmp_path):
    import json

    reports, out = verify.run("tiny", tiny_export, tmp_path / "v", 32, 4, 1)
    report = json.loads((out / "report.json").read_text())
    assert report["threads"] == 1
    assert report["window"] == 1024 and {1024 - 4 + 1, 1024} <= set(report["prompt_tokens"])
    assert report["last_position_checked"] == 1023  # the window-filling prompt's step
    assert "threads: 1, the same for PyTorch and ONNX Runtime" in (out / "report.md").read_text()
    fp32 = next(r for r in reports if r.gated)
    assert fp32.passed, fp32.failures


def test_a_tensorrt_row_is_held_to_the_floor_and_fp32_onnx_to_the_exact_bar():
    def row(bar, top1=1.0, alone=32, batched=32, diff=0.0):
        return verify.EngineReport(
            "e", "p", bool(bar), bar, top1_agreement=top1, greedy_identical=alone,
            greedy_identical_batched=batched, max_abs_logit_diff=diff, prompts=32,
        )  # fmt: skip

    # what fp16 rounding does (one flipped near-tie): under the exact bar, over the floor
    rounded = {"top1": 31 / 32, "alone": 31, "batched": 30, "diff": 5.6e-3}
    assert verify.bar_failures(row(verify.FLOOR, **rounded)) == []
    assert len(verify.bar_failures(row(verify.EXACT, **rounded))) == 3
    assert verify.bar_failures(row("", top1=0.0, alone=0, batched=0)) == []  # reported only
    # a plan that is wrong somewhere: a broken cache (the decode steps), a wrong graph
    assert "greedy" in " ".join(verify.bar_failures(row(verify.FLOOR, batched=15)))
    assert "greedy" in " ".join(verify.bar_failures(row(verify.FLOOR, alone=15)))
    assert verify.bar_failures(row(verify.FLOOR, alone=16, batched=16)) == []
    assert verify.bar_failures(row(verify.FLOOR, top1=0.875)) == ["top-1 agreement 87.5% < 90%"]
    assert verify.bar_failures(row(verify.FLOOR, diff=50.0)) == []  # logits: fp16's own scale
    bars = {kind: bar for _, kind, _, device, bar in verify.ENGINES if device != "cuda"}
    assert (bars["onnx"], bars["onnx-int8"]) == (verify.EXACT, "")
    assert {kind: bar for _, kind, *_, bar in verify.ENGINES}["trt"] == verify.FLOOR


def test_a_plan_is_skipped_only_where_it_cannot_run(tmp_path):
    """Absent, or no TensorRT or GPU here: skipped. A plan that could run and does not
    load is that row's failure (run() records it), never a skip that exits 0."""
    import importlib.util

    assert "no plan in" in verify.plan_cannot_run_here(tmp_path)
    (tmp_path / "model.plan").write_bytes(b"placeholder, not a TensorRT plan")
    if importlib.util.find_spec("tensorrt") is None:
        assert verify.plan_cannot_run_here(tmp_path) == "TensorRT is not installed here"


def test_batched_greedy_runs_in_batches_the_engine_takes(tiny_export, tiny_tokenizer):
    """A TensorRT plan takes at most the batch it was built for: the batched check then
    runs prompts in batches of that size, with the same greedy tokens."""
    from gpt2_triton.engines.factory import build_engine
    from gpt2_triton.prompts import varied_prompts

    prompts = [tiny_tokenizer(p)["input_ids"] for p in varied_prompts(6)]
    budgets = [5] * len(prompts)
    whole = verify.greedy_batched(
        build_engine("onnx", tiny_export, max_sequences=8), prompts, budgets, 0
    )
    small = build_engine("onnx", tiny_export, max_sequences=4)
    assert verify.greedy_batched(small, prompts, budgets, 0) == whole
    assert small.cached_sequences == 0
