"""The benchmark harness's plumbing, on the tiny model with a small grid."""

import json

import pytest

from benchmarks import harness
from benchmarks.report import front_door_rows, ratio_rows, sampling_rows


@pytest.mark.integration
def test_harness_measures_every_system_and_writes_the_report(tiny_export, tmp_path, unused_port):
    code = harness.main(
        [
            "--model",
            "tiny",
            "--concurrency",
            "1",
            "2",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "6",
            "--engines",
            "onnx",
            "onnx-int8",
            "--port",
            str(unused_port),
            "--rounds",
            "2",
            "--sampling",
            "--out",
            str(tmp_path / "out"),
            "--report",
            str(tmp_path / "docs" / "BENCH.md"),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    systems = {(r["system"], r["concurrency"]) for r in results["rows"]}
    assert systems == {
        (s, c)
        for s in (
            "hf-generate",
            "onnxruntime-loop",
            "onnxruntime-loop:int8",
            "triton:onnx",
            "front-door:onnx",
            "openai:onnx",
            "triton:onnx-int8",
            "triton-sampled:onnx",
            "triton-sampled:onnx-int8",
        )
        for c in (1, 2)
    }
    for row in results["rows"]:
        assert row["tokens_per_s"] > 0 and row["ttft_ms_p50"] > 0
        assert row["latency_ms_p50"] >= row["ttft_ms_p50"]
        if row["system"].startswith("triton"):
            assert row["server_rss_mb"] > 0
    report = (tmp_path / "docs" / "BENCH.md").read_text()
    assert "| triton:onnx | 2 | 8 |" in report
    assert "| front-door:onnx | 2 | 8 |" in report and "front door's cost" in report
    assert "| openai:onnx | 2 | 8 |" in report
    assert "| triton-sampled:onnx | 2 | 8 |" in report and "Sampling against greedy" in report
    assert (tmp_path / "docs" / "bench" / "concurrency_prompt8.png").stat().st_size > 1000


def row(system, c, itl, ttft, tps):
    """One summary row of the harness at prompt 32 (what the report functions read)."""
    return {
        "system": system,
        "concurrency": c,
        "prompt_tokens": 32,
        "itl_ms_p50": itl,
        "ttft_ms_p50": ttft,
        "tokens_per_s": tps,
    }


def test_ratios_are_taken_against_the_same_concurrency_and_prompt():
    results = {
        "rows": [
            row("onnxruntime-loop", 1, 10.0, 20.0, 100.0),
            row("hf-generate", 1, 40.0, 80.0, 25.0),
            row("onnxruntime-loop", 4, 20.0, 40.0, 200.0),
            row("triton:onnx", 1, 11.0, 25.0, 90.0),
            row("onnxruntime-loop:int8", 1, 5.0, 10.0, 200.0),
            row("triton:onnx-int8", 1, 5.5, 12.0, 180.0),
        ]
    }
    lines = ratio_rows(results)
    assert lines[2] == "| triton:onnx | 1 | 32 | 1.10x | 1.25x | 0.90x | 3.60x |"
    # the int8 service against the int8 loop (the same file), not the fp32 one
    assert lines[3] == "| triton:onnx-int8 | 1 | 32 | 1.10x | 1.20x | 0.90x | 7.20x |"


def test_front_door_cost_is_taken_against_direct_triton_at_the_same_point():
    results = {
        "rows": [
            row("triton:onnx", 1, 10.0, 20.0, 100.0),
            row("front-door:onnx", 1, 10.1, 20.5, 99.0),
            row("triton:onnx", 16, 30.0, 60.0, 400.0),
            row("front-door:onnx", 16, 31.0, 61.0, 392.0),
        ]
    }
    lines = front_door_rows(results)
    assert lines[2] == (
        "| front-door | onnx | 1 | 32 | 10.00 ms | 10.10 ms | +0.10 ms | +0.5 ms | 0.990 |"
    )
    assert lines[3].endswith("| +1.00 ms | +1.0 ms | 0.980 |")
    assert front_door_rows({"rows": results["rows"][:1]}) == []


def test_sampled_tokens_per_s_are_set_against_greedy_at_the_same_point():
    results = {
        "rows": [
            row("triton:onnx", 16, 30.0, 60.0, 400.0),
            row("triton-sampled:onnx", 16, 31.0, 61.0, 388.0),
            row("triton:onnx", 1, 10.0, 20.0, 100.0),
            row("triton-sampled:onnx-int8", 1, 5.0, 10.0, 180.0),  # no greedy row: left out
        ]
    }
    lines = sampling_rows(results)
    assert lines[2:] == ["| onnx | 16 | 32 | 400 | 388 | 0.970 | 30.00 ms | 31.00 ms |"]
    assert sampling_rows({"rows": results["rows"][:1]}) == []


def test_genai_summary_reads_each_concurrency_export(tmp_path, capsys):
    from benchmarks import genai_summary

    def stats(p50):
        return {"avg": p50, "p50": p50, "p99": 2 * p50}

    runs = [(f"c{c}", f"gpt2-triton-tensorrtllm-concurrency{c}", c) for c in (16, 1)] + [
        ("chat-c1", "gpt2-openai-chat-concurrency1", 1)
    ]
    for top, name, c in runs:
        folder = tmp_path / top / name
        folder.mkdir(parents=True)
        export = {
            "request_count": {"avg": 4 * c},
            "time_to_first_token": stats(10.0 * c),
            "inter_token_latency": stats(5.0),
            "request_latency": stats(300.0),
            "output_token_throughput": {"avg": 100.0 * c},
            "output_sequence_length": {"avg": 64.0},
        }
        (folder / "profile_export_genai_perf.json").write_text(json.dumps(export))
    assert genai_summary.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| kserve (gRPC) | 1 | 4 | 10.0 ms | 20.0 ms | 5.00 ms | 10.00 ms |")
    assert lines[3].startswith("| kserve (gRPC) | 16 | 64 | 160.0 ms |") and "| 1600 |" in lines[3]
    assert lines[4].startswith("| OpenAI chat | 1 | 4 | 10.0 ms |")
    assert genai_summary.main([str(tmp_path / "none")]) == 2
