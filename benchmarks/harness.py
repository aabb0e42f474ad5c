"""``make bench``: the same GPT-2-small architecture measured three ways, in one run.

    python -m benchmarks.harness --model artifacts/models/gpt2-small-random

(a) Hugging Face ``generate()`` in PyTorch eager, in process (what a user tries first);
(b) the raw ONNX Runtime KV-cache loop on the same ONNX file, in process (the engine's
    limit: no server, no Python loop around it beyond argmax), fp32 and, when the int8
    engine is served, int8;
(c) the service: Triton over gRPC streaming, for each engine built (onnx, onnx-int8, torch),
    straight to Triton (``triton:<engine>``) and, for ``--front-door-engines``, through the
    Envoy front door of ``make serve`` (``front-door:<engine>``) and the OpenAI-compatible
    API behind it (``openai:<engine>``, streaming completions), taking turns wave by wave;
(d) with ``--peer`` (``make bench-peer``), the same checkpoint on llama.cpp's
    ``llama-server`` (``llama:f32`` beside ``onnx``, ``llama:q8_0`` beside ``onnx-int8``;
    ``benchmarks/peer.py``), its waves taking turns with the service's: peer, service,
    peer, service.

For each: time to first token, inter-token latency, request latency (p50/p90/p99) and
output tokens/s at each concurrency and prompt length, with exactly ``--new-tokens``
tokens per request (``min_length`` = ``max_tokens``; greedy). Ratios of (c) to (a) and
(b) are taken within the run. With ``--sampling``, the service is also measured sampling
(temperature 0.8, top_p 0.95, seeded: ``triton-sampled:<engine>``), its waves taking
turns with the greedy ones, and the report sets sampled against greedy tokens/s. Writes
``results.json`` and the report with plots. At each concurrency-1 point it also times a
read of the weights' bytes (``benchmarks/bandwidth.py``): the weights' read time of a
decode step, of which the report gives every engine's inter-token latency as a multiple.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import bandwidth, peer
from gpt2_triton import checkpoint, logs
from gpt2_triton.batcher import CPU_BURST_WINDOW_MS, CPU_PREFILL_TOKENS

log = logging.getLogger("benchmarks.harness")
REST_S = 16.0  # the wait before a grid point's memory is read (see bench_triton)

SAMPLED_PATH = "triton-sampled"  # straight to Triton, like "triton", sampling
SAMPLED_TEMPERATURE, SAMPLED_TOP_P = 0.8, 0.95  # common chat settings (issue 14)
PEER_PATH = "llama"  # llama-server's /completion over HTTP, streaming
# Triton's own HTTP generate_stream (server-sent events), read by the same lean client as
# the peer's (http.client, a JSON event per response): the issue's "same HTTP streaming
# client" on both sides
HTTP_PATH = "triton-http"


@dataclass
class Row:
    system: str  # hf-generate | onnxruntime-loop | triton:<engine> | llama:<quant> | ...
    concurrency: int
    prompt_tokens: int
    new_tokens: int
    ttft_ms: list[float] = field(default_factory=list)  # per request
    # per request: (last token - first token) / (tokens - 1), as genai-perf defines it
    itl_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)  # every gap between two tokens
    latency_ms: list[float] = field(default_factory=list)  # per request
    wall_s: float = 0.0
    # each measured wave's wall time, in order (the service's paths): a wave of one path
    # and the same round's wave of another ran a few seconds apart, so their ratio, round
    # by round, shows how far one run's ratio can be trusted
    wave_s: list[float] = field(default_factory=list)
    tokens: int = 0
    # after the grid point's waves, summed over the server's processes (tritonserver and
    # every backend stub; llama-server is one process). RSS counts a page shared by two
    # processes twice (libraries, the weights file mapped by both); PSS shares it out, so
    # PSS sums compare a multi-process server with a single-process one.
    server_rss_mb: float | None = None
    server_pss_mb: float | None = None
    # the most each process held at once since it started (VmHWM), summed: an upper bound
    # of the peak (pages several processes share count once per process), for sizing
    server_peak_rss_mb: float | None = None

    def summary(self) -> dict:
        def pct(values, q):
            return float(np.percentile(values, q)) if values else None

        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_ms_p50": pct(self.ttft_ms, 50),
            "ttft_ms_p99": pct(self.ttft_ms, 99),
            "itl_ms_p50": pct(self.itl_ms, 50),
            "itl_ms_p90": pct(self.itl_ms, 90),
            "itl_ms_p99": pct(self.itl_ms, 99),
            # issue 14's stall target reads gap p99 against the median gap
            "gap_ms_p50": pct(self.gap_ms, 50),
            "gap_ms_p99": pct(self.gap_ms, 99),
            # a rare stall (one stream of many, once) is under p99: the worst one, said
            "gap_ms_max": max(self.gap_ms) if self.gap_ms else None,
            "latency_ms_p50": pct(self.latency_ms, 50),
            "latency_ms_p90": pct(self.latency_ms, 90),
            "latency_ms_p99": pct(self.latency_ms, 99),
            "tokens": self.tokens,  # counted over the measured waves (not the warm-up)
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s else None,
            "wave_s": self.wave_s or None,
            "server_rss_mb": self.server_rss_mb,
            "server_pss_mb": self.server_pss_mb,
            "server_peak_rss_mb": self.server_peak_rss_mb,
        }


def prompt_ids(tokenizer, n: int, seed: int) -> list[int]:
    """A prompt of exactly ``n`` tokens: English text, cut at ``n`` tokens."""
    from gpt2_triton.prompts import varied_prompts

    text = " ".join(varied_prompts(32)[seed % 32 :] + varied_prompts(32))
    ids = tokenizer(text)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


# -- (a) Hugging Face generate ------------------------------------------------------------
class _Stamps:
    """A generate() streamer that only notes when each step's tokens come out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def stream_itl_ms(stamps: list[float], tokens: int) -> float | None:
    """A stream's inter-token latency as genai-perf and NVIDIA's NIM benchmarks define it
    (the GPU targets' source): (last piece - first piece) / (tokens - 1). Pieces can carry
    several tokens (a held-back multi-byte character; pieces that wait join, sending.py):
    a first piece of k tokens makes it read up to (k - 1) / (tokens - 1) low. None when it
    cannot be seen: a stream that came in one piece."""
    if len(stamps) < 2 or tokens < 2:
        return None
    return 1e3 * (stamps[-1] - stamps[0]) / (tokens - 1)


def _record(row: Row, started: float, stamps: list[float], rows: int) -> None:
    """One batch that produced a token per row at each of ``stamps``."""
    gaps = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
    for _ in range(rows):
        row.ttft_ms.append(1e3 * (stamps[0] - started))
        row.itl_ms.append(1e3 * (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1))
        row.gap_ms.extend(gaps)
        row.latency_ms.append(1e3 * (stamps[-1] - started))
    row.wall_s += stamps[-1] - started
    row.tokens += rows * len(stamps)


def bench_hf(
    model, tokenizer, concurrency: int, prompt_tokens: int, new_tokens: int, repeats: int = 1
) -> Row:
    import torch

    row = Row("hf-generate", concurrency, prompt_tokens, new_tokens)
    batch = torch.tensor([prompt_ids(tokenizer, prompt_tokens, i) for i in range(concurrency)])
    batch = batch.to(model.device)  # the GPU benchmark runs it there
    mask = torch.ones_like(batch)

    def generate(n: int, record: bool) -> None:
        stamps = _Stamps()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                batch,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                streamer=stamps,
            )
        if record:  # the streamer's first put() is the prompt itself
            _record(row, started, stamps.times[1:], concurrency)

    generate(4, record=False)  # warm-up
    for _ in range(repeats):
        generate(new_tokens, record=True)
    return row


# -- (b) the raw ONNX Runtime loop ---------------------------------------------------------
LOOP_KINDS = ("onnx", "onnx-int8")  # engines with a raw ONNX Runtime loop on their file


def loop_system(kind: str) -> str:
    """The raw loop's name in the results: ``onnxruntime-loop`` (fp32), ``...:int8``."""
    return "onnxruntime-loop" if kind == "onnx" else "onnxruntime-loop:int8"


def bench_ort_loop(
    engine, tokenizer, concurrency: int, prompt_tokens: int, new_tokens: int, kind: str = "onnx"
) -> Row:
    row = Row(loop_system(kind), concurrency, prompt_tokens, new_tokens)
    prompts = [prompt_ids(tokenizer, prompt_tokens, i) for i in range(concurrency)]
    ids = list(range(1, concurrency + 1))

    def run(record: bool) -> None:
        started = time.perf_counter()
        logits = engine.step(prompts, ids, [True] * concurrency)
        stamps = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            tokens = [[int(t)] for t in logits.argmax(-1)]
            logits = engine.step(tokens, ids)
            stamps.append(time.perf_counter())
        engine.release(ids)
        if record:
            _record(row, started, stamps, concurrency)

    run(record=False)  # warm-up
    run(record=True)
    return row


# -- (c) the service through Triton --------------------------------------------------------
def bench_triton(
    urls: dict[str, str],
    engine: str,
    tokenizer,
    concurrency: int,
    prompt_tokens: int,
    new_tokens: int,
    server_pid: int,
    rounds: int,
    peer_pid: int | None = None,
    rest_s: float = REST_S,
    path_pids: dict[str, list[int]] | None = None,
) -> list[Row]:
    """The service at one grid point, over each of ``urls`` (path name -> a gRPC address, or
    the OpenAI API's base URL ``http://.../v1``; for PEER_PATH, llama-server's host:port):
    waves of ``concurrency`` clients, the paths taking turns wave by wave, so that the
    machine's drift falls on every path alike. The SAMPLED_PATH samples; the others are
    greedy."""
    from client import GenerationParams, Gpt2Client

    def system(path: str) -> str:
        return f"{path}:{peer.QUANT_FOR_ENGINE[engine] if path == PEER_PATH else engine}"

    rows = {path: Row(system(path), concurrency, prompt_tokens, new_tokens) for path in urls}
    greedy = GenerationParams(max_tokens=new_tokens, min_length=new_tokens, temperature=0)
    prompts = [
        tokenizer.decode(prompt_ids(tokenizer, prompt_tokens, i)) for i in range(concurrency)
    ]
    # the peer gets token ids: the very ids the service makes of each prompt's text
    peer_prompts = [tokenizer(text)["input_ids"] for text in prompts]
    lock = threading.Lock()

    def native(url: str, client_index: int, barrier: threading.Barrier, path: str):
        params = greedy
        if path == SAMPLED_PATH:  # seeded per client: the same tokens in every run
            params = GenerationParams(
                max_tokens=new_tokens,
                min_length=new_tokens,
                temperature=SAMPLED_TEMPERATURE,
                top_p=SAMPLED_TOP_P,
                seed=1 + client_index,
            )
        with Gpt2Client(url) as client:
            barrier.wait()
            started = time.perf_counter()
            stream = client.stream(prompts[client_index], params)
            stamps = [time.perf_counter() for _ in stream]
        return started, stamps, stream.result.num_output_tokens

    def openai_api(url: str, client_index: int, barrier: threading.Barrier, path: str):
        # A lean client, like the other paths' (http.client and json, as for llama-server):
        # the openai SDK builds pydantic objects per chunk, Python work that on 2 cores
        # would be charged to the gateway. The SDK itself is what the tests use.
        import http.client

        host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        key = os.environ.get("API_KEY")  # as Gpt2Client reads it for the other paths
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection.request("GET", "/v1/models", headers=headers)
        models = connection.getresponse()
        if models.status != 200:
            raise RuntimeError(f"GET /v1/models answered {models.status}: {models.read()!r}")
        model = json.loads(models.read())["data"][0]["id"]
        body = json.dumps(
            {
                "model": model,
                "prompt": prompts[client_index],
                "max_tokens": new_tokens,
                "min_tokens": new_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        barrier.wait()
        started = time.perf_counter()
        stamps, tokens = [], 0
        for chunk in peer.post_events(connection, "/v1/completions", body, headers, "the gateway"):
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        connection.close()
        return started, stamps, tokens

    def triton_http(url: str, client_index: int, barrier: threading.Barrier, path: str):
        import http.client

        host, port = url.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        connection.connect()  # before the barrier, as the other clients connect before it
        body = json.dumps(
            {
                "text_input": prompts[client_index],
                "max_tokens": new_tokens,
                "min_length": new_tokens,
                "temperature": 0,
                "stream": True,
            }
        )
        barrier.wait()
        started = time.perf_counter()
        stamps, tokens = [], None
        path, headers = "/v2/models/gpt2/generate_stream", {"Content-Type": "application/json"}
        for event in peer.post_events(connection, path, body, headers, "Triton's generate_stream"):
            if event.get("text_output"):
                stamps.append(time.perf_counter())
            if event.get("finish_reason"):
                tokens = event["num_output_tokens"]
        connection.close()
        if tokens is None:  # the final event (the only one with the counts) never came
            raise RuntimeError("Triton's generate_stream ended without its final event")
        return started, stamps, tokens

    def llama(url: str, client_index: int, barrier: threading.Barrier, path: str):
        import http.client

        host, port = url.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        connection.connect()  # before the barrier, as the other clients connect before it
        barrier.wait()
        started = time.perf_counter()
        stamps, tokens = [], 0
        for event in peer.stream_completion(connection, peer_prompts[client_index], new_tokens):
            if event.get("tokens"):  # one event per token, also when its text is held back
                stamps.append(time.perf_counter())
            if event.get("stop"):
                tokens = event["tokens_predicted"]
        connection.close()
        return started, stamps, tokens

    def one(path: str, row: Row | None, client_index: int, barrier: threading.Barrier) -> None:
        url = urls[path]
        if path == PEER_PATH:
            call = llama
        elif path == HTTP_PATH:
            call = triton_http
        else:
            call = openai_api if url.startswith("http") else native
        started, stamps, tokens = call(url, client_index, barrier, path)
        end = time.perf_counter()
        if tokens != new_tokens or not stamps:  # every path is asked for exactly new_tokens
            raise RuntimeError(
                f"{path}: a request ended with {tokens} tokens in {len(stamps)} pieces, "
                f"not the {new_tokens} tokens asked for"
            )
        with lock:
            spans.append((started, end))
        if row is not None:
            with lock:
                row.ttft_ms.append(1e3 * (stamps[0] - started))
                itl = stream_itl_ms(stamps, tokens)
                if itl is not None:
                    row.itl_ms.append(itl)
                row.gap_ms.extend(1e3 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False))
                row.latency_ms.append(1e3 * (end - started))
                row.tokens += tokens

    spans: list[tuple[float, float]] = []  # this wave's requests: (sent, last response)

    def wave(path: str, row: Row | None) -> float:
        """The wave's span: from its first request sent to its last response, so that
        client set-up (threads; HTTP connections, the gateway's model list) is not counted.
        A gRPC request opens its channel when it starts (client/core.py): that connection
        is inside the span, and inside its TTFT."""
        spans.clear()
        try:
            run_wave(len(prompts), lambda index, barrier: one(path, row, index, barrier))
        except RuntimeError as exc:
            raise RuntimeError(f"{path}: {exc}") from exc.__cause__
        return max(end for _, end in spans) - min(sent for sent, _ in spans)

    for path in urls:
        wave(path, None)  # warm-up
    for _ in range(rounds):
        for path in urls:
            wall = wave(path, rows[path])
            rows[path].wall_s += wall
            rows[path].wave_s.append(wall)
    # Memory at rest after the waves: the service gives freed heap back once idle for
    # GIVE_BACK_AFTER_S (model_repository/gpt2/1/model.py, 15 s); what it held at its
    # peak is the VmHWM column.
    time.sleep(rest_s)
    memory: dict[tuple[int, ...], tuple[float, float, float]] = {}
    for path, row in rows.items():
        # a path's own processes too: the front door's Envoy, the OpenAI gateway
        pids = (peer_pid,) if path == PEER_PATH else (server_pid, *(path_pids or {}).get(path, ()))
        if pids not in memory:
            memory[pids] = server_memory_mb(*pids)
        row.server_rss_mb, row.server_pss_mb, row.server_peak_rss_mb = memory[pids]
    return list(rows.values())


def run_wave(clients: int, client: Callable[[int, threading.Barrier], None]) -> None:
    """``client(index, barrier)`` on ``clients`` threads at once; each waits at the barrier
    before its request, so that all start together. A client that fails aborts the barrier
    (the others may be waiting there for it) and fails the wave: RuntimeError from the
    first failure. A wave that lost a client would report the others' speed as the
    whole."""
    barrier = threading.Barrier(clients)
    failures: list[BaseException] = []
    lock = threading.Lock()

    def guarded(index: int) -> None:
        try:
            client(index, barrier)
        except BaseException as exc:  # noqa: BLE001 (raised again below, in the caller)
            with lock:
                failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        real = [f for f in failures if not isinstance(f, threading.BrokenBarrierError)]
        raise RuntimeError(f"{len(failures)} of {clients} clients failed") from (real or failures)[
            0
        ]


def server_memory_mb(*pids: int) -> tuple[float, float, float]:
    """RSS, PSS and peak RSS (VmHWM) in MiB, summed over the processes and their
    descendants (tritonserver: its Python backend stubs, one process per model instance)."""
    import psutil

    processes = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            processes += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:  # restarted by its supervisor since: not counted
            log.warning("process %d is gone: its memory is not in this row", pid)
    rss = pss = peak = 0
    for p in processes:
        try:
            info = p.memory_full_info()  # reads smaps_rollup: PSS too
            status = Path(f"/proc/{p.pid}/status").read_text()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, FileNotFoundError):
            continue  # a stub that ended between the listing and the read
        rss += info.rss
        pss += info.pss
        hwm = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
        peak += int(hwm[0]) * 1024 if hwm else info.rss
    return rss / 2**20, pss / 2**20, peak / 2**20


# -- the run --------------------------------------------------------------------------------
def run(args) -> dict:
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.engines.factory import build_engine
    from gpt2_triton.front_door import FrontDoorSettings
    from gpt2_triton.serve import Service

    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    spec = checkpoint.resolve(args.model)
    tokenizer = checkpoint.load_tokenizer(spec)
    export_dir = checkpoint.artifacts_root() / "onnx" / spec.slug
    rows: list[Row] = []
    grid = [(c, p) for p in args.prompt_tokens for c in args.concurrency]
    threads = args.threads or os.cpu_count() or 1
    # built and converted before anything is timed (once: later runs reuse both)
    peer_files = peer.prepare(args.model, args.peer_cache) if args.peer else None
    local = checkpoint.local_folder(spec)
    weight_bytes = bandwidth.streamed_weight_bytes(local) if local else 0
    bandwidths: list[dict] = []

    if not args.skip_hf:
        import torch

        torch.set_num_threads(args.threads or torch.get_num_threads())
        model = checkpoint.load_model(spec)
        for c, p in grid:
            log.info("hf-generate c=%d prompt=%d", c, p)
            rows.append(bench_hf(model, tokenizer, c, p, args.new_tokens))
        del model
    # (b) and (c) side by side: the raw loop on the same file is measured right before
    # the service at each grid point, so that the machine's drift over minutes does not
    # land between the two numbers of a ratio. The fp32 loop always runs (the torch
    # engine is taken against it), served or not.
    for kind in dict.fromkeys(["onnx", *args.engines]):
        loop = None
        if kind in LOOP_KINDS:
            loop = build_engine(
                kind, export_dir, max_sequences=max(args.concurrency), threads=args.threads
            )
        server = None
        if kind in args.engines:
            repo = checkpoint.artifacts_root() / "bench" / f"repo-{kind}"
            build(
                RepoSettings(
                    args.model,
                    kind,
                    max_sequences=max(args.concurrency),
                    engine_threads=args.threads,
                    burst_window_ms=args.burst_window_ms,
                    **(
                        {"max_prefill_tokens": args.max_prefill_tokens}
                        if args.max_prefill_tokens
                        else {}
                    ),
                ),
                repository=repo,
            )
            # The service as `make serve` runs it: Triton behind the front door. Its own
            # loopback ports are measured too ("direct"), so the front door's cost is a
            # difference within one run.
            front = FrontDoorSettings(
                http_port=args.port,
                grpc_port=args.port + 1,
                triton_http_port=args.port + 3,
                triton_grpc_port=args.port + 4,
                gateway_port=args.port + 6,
            )
            server = Service(
                repo,
                front,
                metrics_port=args.port + 5,
                log_dir=checkpoint.artifacts_root() / "bench" / f"logs-{kind}",
            )
        llama = None
        if peer_files and server and kind in peer.QUANT_FOR_ENGINE:
            quant = peer.QUANT_FOR_ENGINE[kind]
            # as many slots as the service has sequences, each with room for the longest
            # prompt and its new tokens; the same threads as the engines
            slots = max(args.concurrency)
            llama = peer.LlamaServer(
                peer_files.server,
                peer_files.models[quant],
                port=args.port + 7,
                threads=threads,
                slots=slots,
                context=peer.context_size(slots, max(args.prompt_tokens), args.new_tokens),
                log_file=checkpoint.artifacts_root() / "bench" / f"logs-llama-{quant}.log",
            )
        with server or contextlib.nullcontext(), llama or contextlib.nullcontext():
            for c, p in grid:
                if c == 1 and weight_bytes:
                    # the bandwidth beside each single-stream point, so drift cannot
                    # fall between an engine's ITL and the read time it is set against
                    measured = bandwidth.measure(weight_bytes, threads)
                    bandwidths.append({"engine": kind, "prompt_tokens": p, **measured})
                    log.info("read bandwidth %.1f GB/s", measured["gb_per_s"])
                if loop is not None:
                    log.info("%s c=%d prompt=%d", loop_system(kind), c, p)
                    rows.append(bench_ort_loop(loop, tokenizer, c, p, args.new_tokens, kind))
                if server is None:
                    continue
                paths = {PEER_PATH: llama.url} if llama else {}  # first: peer, service, ...
                if llama or args.http:  # the service read by the peer's kind of client
                    paths[HTTP_PATH] = server.triton.http_url
                paths["triton"] = server.triton.grpc_url
                if args.sampling:
                    paths[SAMPLED_PATH] = server.triton.grpc_url
                door_pids: dict[str, list[int]] = {}
                if kind in args.front_door_engines:
                    paths["front-door"] = server.grpc_url
                    paths["openai"] = f"http://{server.http_url}/v1"
                    door_pids["front-door"] = [server.envoy.process.pid]
                    door_pids["openai"] = [server.envoy.process.pid, server.gateway.process.pid]
                log.info("%s c=%d prompt=%d (%s)", kind, c, p, ", ".join(paths))
                rows.extend(
                    bench_triton(
                        paths,
                        kind,
                        tokenizer,
                        c,
                        p,
                        args.new_tokens,
                        server.triton.process.pid,
                        rounds=args.rounds if c == 1 else max(args.rounds // 4, 1),
                        peer_pid=llama.process.pid if llama else None,
                        path_pids=door_pids,
                    )
                )
        del loop
    order = {"hf-generate": 0, "onnxruntime-loop": 1, "onnxruntime-loop:int8": 2}
    rows.sort(key=lambda r: (order.get(r.system, 3), r.system))  # stable: grid order kept
    return {
        "model": spec.source,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        # the harness serves CPU engines: the CPU's default unless it was given
        "max_prefill_tokens": args.max_prefill_tokens or CPU_PREFILL_TOKENS,
        "burst_window_ms": args.burst_window_ms,
        "started": started_at,
        "peer": (
            {"llama_cpp_python": peer.LLAMA_CPP_PYTHON, "server": str(peer_files.server)}
            if peer_files
            else None
        ),
        # the front-door and openai rows' memory counts Envoy and the gateway (report.py)
        "door_memory_counted": True,
        "weight_bytes": weight_bytes,  # fp32 bytes a decode step reads (bandwidth.py)
        "bandwidth": bandwidths,
        "rows": [r.summary() for r in rows],
        "raw": [asdict(r) for r in rows] if args.raw else None,
    }


# where a run writes, not what it measures: a report published from elsewhere
# (benchmarks/report.py) would name a scratch path
_OUTPUT_FLAGS = ("--out", "--report")


def measured_command(argv: list[str]) -> str:
    """The harness's command line without its output paths."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OUTPUT_FLAGS:
            skip = True  # and its value, the next argument
        elif not arg.startswith(tuple(f"{flag}=" for flag in _OUTPUT_FLAGS)):
            kept.append(arg)
    return shlex.join(["python", "-m", "benchmarks.harness", *kept])


def arguments() -> argparse.ArgumentParser:
    # no abbreviations: the recorded command (measured_command) knows the output flags
    # by their full names
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="artifacts/models/gpt2-small-random")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engines", nargs="+", default=["onnx", "onnx-int8", "torch"])
    parser.add_argument(
        "--front-door-engines",
        nargs="*",
        default=["onnx"],
        help="engines also measured through the Envoy front door (its cost, same run)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="waves per path at concurrency 1 (a quarter of it above): the paths alternate",
    )
    parser.add_argument(
        "--sampling",
        action="store_true",
        help=f"also measure the service sampling (temperature {SAMPLED_TEMPERATURE}, "
        f"top_p {SAMPLED_TOP_P}) next to greedy, taking turns wave by wave",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help=f"also measure the service over Triton's HTTP generate_stream ({HTTP_PATH}), "
        "read by the peer's kind of client (on with --peer)",
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also measure llama.cpp's llama-server (built once, see benchmarks/peer.py): "
        "f32 beside onnx, q8_0 beside onnx-int8, taking turns with the service "
        f"(and with {HTTP_PATH}: the same kind of client on both sides)",
    )
    parser.add_argument(
        "--peer-cache", type=Path, default=None, help="where llama.cpp is built (peer.py)"
    )
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: all)")
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=0,
        help="the service's prompt tokens per step while streams decode (0: make repo's default)",
    )
    parser.add_argument(
        "--burst-window-ms",
        type=int,
        default=CPU_BURST_WINDOW_MS,
        help="the service's admission window for bursts (BURST_WINDOW_MS; 0: none; "
        f"default {CPU_BURST_WINDOW_MS}, the repository's on the CPU)",
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--raw", action="store_true", help="keep every sample in the JSON")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--report", type=Path, default=Path("docs/BENCHMARKS.md"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import write_report

    args = arguments().parse_args(argv)
    logs.setup()
    started = time.perf_counter()
    results = run(args)
    results["duration_s"] = time.perf_counter() - started
    # the report says how it was made: a run with other flags than make's is another grid
    results["command"] = measured_command(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.report, args.report.parent / "bench")
    print(f"results in {args.out / 'results.json'}; report in {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
