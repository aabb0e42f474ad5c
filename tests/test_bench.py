"""The benchmark harness's plumbing, on the tiny model with a small grid."""

import json
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.report import (
    front_door_rows,
    peer_rows,
    ratio_rows,
    sampling_rows,
    weight_read_rows,
)
from benchmarks.report import main as report_main


@pytest.mark.integration
def test_harness_measures_every_system_and_writes_the_report(
    tiny_export, tmp_path, unused_port_block
):
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
            str(unused_port_block),
            "--rounds",
            "2",
            "--sampling",
            "--http",
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
            "triton-http:onnx",
            "triton-http:onnx-int8",
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
            # shared pages shared out: below the RSS sum of tritonserver and its stubs
            assert 0 < row["server_pss_mb"] < row["server_rss_mb"]
    # the front door's rows count Envoy too, the OpenAI API's Envoy and the gateway: read
    # at the same moment as Triton's, so strictly more
    by_system = {(r["system"], r["concurrency"]): r for r in results["rows"]}
    for c in (1, 2):
        triton, door = by_system["triton:onnx", c], by_system["front-door:onnx", c]
        gateway = by_system["openai:onnx", c]
        assert triton["server_pss_mb"] < door["server_pss_mb"] < gateway["server_pss_mb"]
    assert results["door_memory_counted"]
    # the read bandwidth, timed beside each engine's concurrency-1 point
    assert {(f["engine"], f["prompt_tokens"]) for f in results["bandwidth"]} == {
        ("onnx", 8),
        ("onnx-int8", 8),
    }
    assert results["weight_bytes"] > 0 and all(f["gb_per_s"] > 0 for f in results["bandwidth"])
    report = (tmp_path / "docs" / "BENCH.md").read_text()
    assert "| triton:onnx | 2 | 8 |" in report
    # Triton's generate_stream read with http.client: the same token counts as over gRPC
    assert "| triton-http:onnx-int8 | 2 | 8 |" in report
    by = {(r["system"], r["concurrency"]): r for r in results["rows"]}
    assert by[("triton-http:onnx", 2)]["tokens"] == by[("triton:onnx", 2)]["tokens"] > 0
    assert "| front-door:onnx | 2 | 8 |" in report and "front door's cost" in report
    assert "| openai:onnx | 2 | 8 |" in report
    assert "| triton-sampled:onnx | 2 | 8 |" in report and "Sampling against greedy" in report
    # The in-process loop always sees its tokens one by one; a served path has a read-time row
    # only if it has an ITL: on a busy machine a 6-token stream can come in one piece
    # (pieces that wait join, sending.py), and then it has none.
    assert "weights' read time" in report and "| onnxruntime-loop | 8 |" in report
    served_itl = by[("triton:onnx", 1)]["itl_ms_p50"]
    assert ("| triton:onnx | 8 |" in report) == (served_itl is not None)
    assert (tmp_path / "docs" / "bench" / "concurrency_prompt8.png").stat().st_size > 1000
    # the report names the run's own flags, and comes out the same again from its results
    assert "Produced by `python -m benchmarks.harness --model tiny --concurrency 1 2" in report
    again = tmp_path / "published" / "BENCHMARKS.md"
    assert report_main([str(tmp_path / "out" / "results.json"), "--report", str(again)]) == 0
    assert again.read_text() == report
    assert (tmp_path / "published" / "bench" / "concurrency_prompt8.png").stat().st_size > 1000


def row(system, c, itl, ttft, tps, pss=None, peak=None):
    """One summary row of the harness at prompt 32 (what the report functions read)."""
    return {
        "system": system,
        "concurrency": c,
        "prompt_tokens": 32,
        "itl_ms_p50": itl,
        "ttft_ms_p50": ttft,
        "tokens_per_s": tps,
        "server_pss_mb": pss,
        "server_peak_rss_mb": peak,
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
            row("triton-http:onnx-int8", 1, 5.0, 11.0, 190.0),
        ]
    }
    lines = ratio_rows(results)
    assert lines[4] == "| triton-http:onnx-int8 | 1 | 32 | 1.00x | 1.10x | 0.95x | 7.60x |"
    assert lines[2] == "| triton:onnx | 1 | 32 | 1.10x | 1.25x | 0.90x | 3.60x |"
    # the int8 service against the int8 loop (the same file), not the fp32 one
    assert lines[3] == "| triton:onnx-int8 | 1 | 32 | 1.10x | 1.20x | 0.90x | 7.20x |"
    # a run without Hugging Face (--skip-hf) has no column for it; a missing loop reads "-"
    results["rows"] = [r for r in results["rows"] if r["system"] != "hf-generate"]
    results["rows"].append(row("triton:onnx", 16, 30.0, 90.0, 400.0))
    lines = ratio_rows(results)
    assert lines[0].endswith("| tokens/s vs ONNX loop |") and lines[1] == "|---" * 6 + "|"
    assert lines[2] == "| triton:onnx | 1 | 32 | 1.10x | 1.25x | 0.90x |"
    assert lines[5] == "| triton:onnx | 16 | 32 | - | - | - |"


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


def test_a_path_whose_streams_came_in_one_piece_reads_as_unmeasured_in_the_report():
    """No ITL (every stream one piece: harness.stream_itl_ms) is '-', not a crash."""
    results = {
        "rows": [
            row("triton:onnx", 1, 10.0, 20.0, 100.0),
            row("front-door:onnx", 1, None, 20.5, 99.0),
            row("triton-sampled:onnx", 1, None, 21.0, 98.0),
        ]
    }
    assert front_door_rows(results)[2] == (
        "| front-door | onnx | 1 | 32 | 10.00 ms | - ms | - ms | +0.5 ms | 0.990 |"
    )
    assert sampling_rows(results)[2] == "| onnx | 1 | 32 | 100 | 98 | 0.980 | - | 10.00 ms | - ms |"


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
    assert lines[2:] == ["| onnx | 16 | 32 | 400 | 388 | 0.970 | - | 30.00 ms | 31.00 ms |"]
    assert sampling_rows({"rows": results["rows"][:1]}) == []
    # with each wave's time, round by round: sampled over the same round's greedy wave
    results["rows"][0]["wave_s"] = [2.0, 2.0, 2.2]
    results["rows"][1]["wave_s"] = [2.1, 2.0, 2.4]
    assert sampling_rows(results)[2].split(" | ")[6] == "0.917-1.000"
    results["rows"][1]["wave_s"] = [2.1, 2.0]  # rounds that do not pair: no range
    assert sampling_rows(results)[2].split(" | ")[6] == "-"


def test_the_service_is_set_against_the_peer_of_its_precision_at_the_same_point():
    results = {
        "rows": [
            row("llama:f32", 1, 10.0, 30.0, 95.0, pss=700.0, peak=800.0),
            row("llama:q8_0", 1, 5.0, 30.0, 190.0, pss=350.0),
            row("llama:f32", 16, 40.0, 300.0, 400.0, pss=720.0),
            row("triton:onnx", 1, 12.0, 27.0, 80.0, pss=1400.0, peak=1200.0),
            row("triton:onnx-int8", 1, 4.5, 15.0, 210.0, pss=700.0),
            row("triton:onnx", 16, 32.0, 240.0, 480.0, pss=1440.0),
            row("triton-http:onnx", 16, 30.0, 220.0, 520.0, pss=1440.0),  # the same client
            row("triton:torch", 1, 40.0, 90.0, 25.0, pss=1500.0),  # no peer: left out
        ]
    }
    lines = peer_rows(results)
    assert lines[2:] == [
        "| triton:onnx | llama:f32 | 1 | 32 | 1.20x | 0.90x | 0.84x | 2.00x | 1.50x |",
        "| triton:onnx-int8 | llama:q8_0 | 1 | 32 | 0.90x | 0.50x | 1.11x | 2.00x | - |",
        "| triton:onnx | llama:f32 | 16 | 32 | 0.80x | 0.80x | 1.20x | 2.00x | - |",
        "| triton-http:onnx | llama:f32 | 16 | 32 | 0.75x | 0.73x | 1.30x | 2.00x | - |",
    ]
    assert peer_rows({"rows": results["rows"][3:]}) == []  # a run without the peer


def test_every_single_stream_itl_is_read_against_the_bandwidth_measured_beside_it():
    results = {
        "weight_bytes": 500_000_000,
        "bandwidth": [
            {"engine": "onnx", "prompt_tokens": 32, "gb_per_s": 25.0},  # read time 20 ms
            {"engine": "onnx-int8", "prompt_tokens": 32, "gb_per_s": 50.0},  # read time 10 ms
        ],
        "rows": [
            row("hf-generate", 1, 45.0, 100.0, 20.0),
            row("llama:q8_0", 1, 5.0, 30.0, 190.0),
            row("triton:onnx", 1, 16.0, 27.0, 60.0),
            row("triton:onnx", 16, 40.0, 240.0, 480.0),  # not single-stream: left out
        ],
    }
    lines = weight_read_rows(results)
    assert lines[2:] == [
        # before any bandwidth was measured: the run's median (the higher of two here)
        "| hf-generate | 32 | 45.00 ms | 50.0 GB/s | 10.00 ms | 4.50x |",
        # the peer beside the int8 engine, read against the bandwidth timed there
        "| llama:q8_0 | 32 | 5.00 ms | 50.0 GB/s | 10.00 ms | 0.50x |",
        "| triton:onnx | 32 | 16.00 ms | 25.0 GB/s | 20.00 ms | 0.80x |",
    ]
    assert weight_read_rows({**results, "bandwidth": []}) == []


def test_the_peer_client_reads_llama_server_events():
    from benchmarks import peer

    # lines as llama-server 0.3.36 streams them from /completion (abridged)
    token = b'data: {"index":0,"content":" the","tokens":[262],"stop":false,"tokens_predicted":1}\n'
    held = b'data: {"index":0,"content":"","tokens":[157],"stop":false,"tokens_predicted":2}\n'
    final = (
        b'data: {"index":0,"content":"","tokens":[],"stop":true,"tokens_predicted":64,'
        b'"tokens_evaluated":32,"timings":{"prompt_n":32,"predicted_n":64}}\n'
    )
    assert peer.parse_event(token)["tokens"] == [262]
    assert peer.parse_event(held)["tokens"] == [157]  # text held back, the token counted
    assert peer.parse_event(final)["tokens_predicted"] == 64
    assert peer.parse_event(b"\n") is None and peer.parse_event(b":\n") is None  # keep-alive
    with pytest.raises(peer.PeerError, match="context size"):
        peer.parse_event(b'data: {"error":{"code":500,"message":"exceeds context size"}}\n')
    request = peer.completion_request([1, 2, 3], 64)
    assert request["prompt"] == [1, 2, 3] and request["n_predict"] == 64
    assert request["ignore_eos"] and request["stream"] and not request["cache_prompt"]
    # 16 slots of a 128-token prompt and 64 new tokens (plus the one llama-server keeps
    # free), rounded up to 256 per slot as llama.cpp does: NOTES.md's -c 4096
    assert peer.context_size(16, 128, 64) == 4096
    assert peer.context_size(16, 192, 64) == 16 * 512  # 257 tokens do not fit in 256


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


@pytest.mark.integration
def test_the_peer_client_against_a_real_llama_server(tmp_path, unused_port, monkeypatch):
    """The harness's client and workload on llama-server itself: every token one event, the
    prompt's ids taken as they are. Needs `make bench-peer`'s build and GGUF files."""
    import http.client

    from benchmarks import peer
    from gpt2_triton.checkpoint import local_slug

    # what `make bench-peer` leaves: the build in the user's cache, the GGUF file under the
    # repository's artifacts/ (the tests' own artifacts folder is a fresh temporary one),
    # in the folder named as make, run in the repository, names it
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    gguf = root / "artifacts" / "gguf" / local_slug(root / "artifacts/models/gpt2-small-random")
    files = peer.PeerFiles(
        peer.default_cache() / "build" / "bin" / "llama-server",
        {"f32": gguf / "model-f32.gguf"},
    )
    if not files.server.is_file() or not files.models["f32"].is_file():
        pytest.skip("llama.cpp not built / bench model not converted: make bench-peer")
    prompt = list(range(1000, 1016))
    server = peer.LlamaServer(
        files.server,
        files.models["f32"],
        port=unused_port,
        threads=2,
        slots=2,
        context=peer.context_size(2, len(prompt), 8),
        log_file=tmp_path / "llama.log",
    )
    with server:
        streams = []
        for _ in range(2):  # a connection per request, as the harness makes them
            connection = http.client.HTTPConnection("127.0.0.1", unused_port, timeout=60)
            streams.append(list(peer.stream_completion(connection, prompt, 8)))
            connection.close()
    events, again = streams
    tokens = [e["tokens"] for e in events if e.get("tokens")]
    assert len(tokens) == 8 and all(len(t) == 1 for t in tokens)
    assert events[-1]["stop"] and events[-1]["tokens_predicted"] == 8
    assert events[-1]["tokens_evaluated"] == len(prompt)  # no BOS added, nothing dropped
    # greedy: the same prompt gives the same tokens
    assert [e["tokens"] for e in again if e.get("tokens")] == tokens


def test_the_report_describes_the_systems_the_run_has():
    from benchmarks.report import _systems

    text = _systems({"rows": [row("onnxruntime-loop", 1, 1, 1, 1), row("triton:onnx", 1, 1, 1, 1)]})
    assert "`onnxruntime-loop` =" in text and "`triton:<engine>` =" in text
    assert "hf-generate" not in text and "openai" not in text and "llama" not in text
    assert "int8" not in text.partition("In the ratios")[0]  # no int8 loop in this run
    peer_only = _systems({"rows": [row("llama:f32", 1, 1, 1, 1)]})
    assert peer_only.startswith("the paths take turns")  # no empty "Systems: ;"


def test_the_recorded_command_leaves_out_where_the_run_wrote():
    assert (
        harness.measured_command(
            ["--peer", "--out", "/tmp/x", "--report=/tmp/x.md", "--rounds", "8", "--skip-hf"]
        )
        == "python -m benchmarks.harness --peer --rounds 8 --skip-hf"
    )
    assert harness.measured_command(["--prompt-tokens", "32", "128"]) == (
        "python -m benchmarks.harness --prompt-tokens 32 128"
    )
    # an abbreviated output flag is refused, so it cannot slip into the record
    assert harness.arguments().parse_args(["--out", "x"]).out == Path("x")
    with pytest.raises(SystemExit):
        harness.arguments().parse_args(["--ou", "x"])


def test_a_new_bench_report_keeps_the_genai_perf_section(tmp_path):
    from benchmarks.report import KEPT_FROM, kept_sections

    report = tmp_path / "BENCHMARKS.md"
    assert kept_sections(report) == ""  # no report yet
    report.write_text("# Benchmarks\n\nold tables\n")
    assert kept_sections(report) == ""  # nothing to keep
    genai = f"\n{KEPT_FROM}\n\n| endpoint | concurrency |\n|---|---|\n| kserve (gRPC) | 1 |\n"
    report.write_text("# Benchmarks\n\nold tables\n" + genai)
    assert kept_sections(report) == genai
    report.write_text(genai.lstrip("\n"))  # the section alone, from the file's first line
    assert kept_sections(report) == genai


@pytest.mark.integration
def test_bench_pa_and_genai_need_and_get_triton_s_statistics_api(triton, artifacts, capsys):
    """perf_analyzer reads Triton's statistics API on its loopback port: closed by default
    (the pre-check says how to open it), open with OPEN_TRITON_STATISTICS=1, while the other
    admin APIs stay closed there."""
    import tritonclient.grpc as grpcclient
    from conftest import service
    from tritonclient.utils import InferenceServerException

    from benchmarks.statistics_check import main as statistics_check

    assert statistics_check([triton.triton.grpc_url]) == 2
    assert "OPEN_TRITON_STATISTICS=1" in capsys.readouterr().err
    repository = triton.triton.model_repository
    with service(repository, artifacts / "logs_stats", triton_statistics_open=True) as opened:
        assert statistics_check([opened.triton.grpc_url]) == 0
        client = grpcclient.InferenceServerClient(opened.triton.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_model_repository_index()
        finally:
            client.close()


def _raised_within(call, seconds=60):
    """What ``call()`` raised (None if nothing), asserting it returned within ``seconds``:
    a wave that hangs fails the test instead of the suite."""
    import threading

    outcome = []

    def run():
        try:
            call()
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the wave hung"
    return outcome[0]


def test_a_wave_whose_clients_cannot_connect_fails_the_run(tiny_tokenizer, unused_port):
    """Clients that cannot connect fail the run (their threads used to end quietly and
    the wave reported whatever the others measured, here nothing)."""
    error = _raised_within(
        lambda: harness.bench_triton(
            {harness.HTTP_PATH: f"127.0.0.1:{unused_port}"},  # nothing listens there
            "onnx",
            tiny_tokenizer,
            3,
            8,
            4,
            server_pid=0,
            rounds=1,
            rest_s=0,
        )
    )
    assert isinstance(error, RuntimeError) and "3 of 3 clients failed" in str(error)
    assert isinstance(error.__cause__, ConnectionRefusedError)


def test_a_client_failing_before_the_start_barrier_releases_the_others_waiting_there():
    """One client fails while the others wait for it at the barrier: they are let go and
    the wave fails with the first client's error (without the abort they waited for
    ever)."""

    def client(index, barrier):
        if index == 0:
            raise ValueError("client 0 could not connect")
        barrier.wait()

    error = _raised_within(lambda: harness.run_wave(3, client))
    assert isinstance(error, RuntimeError) and "3 of 3 clients failed" in str(error)
    assert isinstance(error.__cause__, ValueError)


def test_a_streams_itl_counts_tokens_and_is_not_read_from_one_piece():
    assert harness.stream_itl_ms([1.0, 1.004, 1.010], 6) == pytest.approx(2.0)  # 5 gaps
    assert harness.stream_itl_ms([1.0], 6) is None  # all six tokens in one piece: not seen
    assert harness.stream_itl_ms([1.0], 1) is None
