"""Streaming clients for a served benchmark point, spread over processes.

``harness.bench_triton`` runs its clients as threads of one Python process: at 64 streams
on a fast server that process, not the server, sets the pace (a review measured one
process's ceiling at ~5,000 tokens/s against a server that answers at once, ITL 9 ms at
64 clients). Here a point's clients are shared among worker processes; each client opens
its gRPC stream before the wave starts (so TTFT counts no connection set-up, as
perf_analyzer's reused connections do not), and every client starts at one agreed
wall-clock instant instead of a barrier. Each wave reports, per request, the time the
request was sent, the time of each piece and the token count, and each process's CPU
time, so a report can say when the clients themselves were busy.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from benchmarks.harness import Row, stream_itl_ms
from client.core import grpc_inputs, own_connection_args

START_LEAD_S = 0.5  # from submitting a wave to its start: every client connected by then
TIMEOUT_S = 60.0  # the longest a request may take before it counts as failed


def _stream(url: str, prompt: str, params: dict, start_at: float) -> tuple:
    """One request: ``(sent, piece times, tokens, error)``, times on this host's clock."""
    import tritonclient.grpc as grpcclient

    from client import GenerationParams

    inputs = grpc_inputs(prompt, GenerationParams(**params), stream=True)
    stamps: list[float] = []
    tokens, errors = [0], []
    done = threading.Event()

    def callback(result, error):  # tritonclient passes both by these names
        now = time.time()
        if error is not None:
            errors.append(str(error))
            done.set()
            return
        text = result.as_numpy("text_output")
        if text is not None and text.size and text.reshape(-1)[0]:
            stamps.append(now)
        count = result.as_numpy("num_output_tokens")
        if count is not None and count.size:
            tokens[0] = int(count.reshape(-1)[0])
        if result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    # a channel per stream, each on its own connection (client/core.py)
    client = grpcclient.InferenceServerClient(url, channel_args=own_connection_args())
    try:
        client.start_stream(callback=callback)
        time.sleep(max(0.0, start_at - time.time()))
        sent = time.time()
        client.async_stream_infer("gpt2", inputs, enable_empty_final_response=True)
        if not done.wait(TIMEOUT_S):
            errors.append(f"no final response within {TIMEOUT_S:.0f} s")
        client.stop_stream(cancel_requests=bool(errors))
    finally:
        client.close()
    return sent, stamps, tokens[0], errors[0] if errors else None


def _share(url: str, prompts: list[str], params: dict, start_at: float) -> tuple[list, float]:
    """One process's clients, a thread each; their results and this process's CPU time."""
    cpu = time.process_time()
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        try:
            results[i] = _stream(url, prompts[i], params, start_at)
        except Exception as exc:  # reported with the point
            results[i] = (start_at, [], 0, f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.process_time() - cpu


class ServedLoad:
    """Waves of streaming clients against one gRPC address, from ``processes`` workers."""

    def __init__(self, url: str, processes: int | None = None) -> None:
        self.url = url
        self.processes = processes or max(1, min(8, (os.cpu_count() or 2) // 2))
        # spawn: the workers start clean, without this process's threads or gRPC state
        self._pool = ProcessPoolExecutor(self.processes, mp_context=get_context("spawn"))

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> ServedLoad:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wave(self, prompts: list[str], params: dict) -> tuple[list, float, float]:
        """All ``prompts`` at once: ``(per-request results, wall s, client CPU s)``."""
        start_at = time.time() + START_LEAD_S
        shares = [prompts[i :: self.processes] for i in range(self.processes)]
        futures = [
            self._pool.submit(_share, self.url, share, params, start_at)
            for share in shares
            if share
        ]
        results, cpu = [], 0.0
        for future in futures:
            share, seconds = future.result()
            results += share
            cpu += seconds
        ends = [r[1][-1] for r in results if r[1]]
        wall = (max(ends) if ends else time.time()) - start_at
        return results, wall, cpu

    def point(
        self, system: str, prompts: list[str], params: dict, rounds: int, prompt_tokens: int
    ) -> tuple[Row, dict]:
        """A warm-up wave, then ``rounds`` measured ones: the Row (as the harness reports
        it) and what else was seen (failed requests, client CPU per token)."""
        new_tokens = params["max_tokens"]
        row = Row(system, len(prompts), prompt_tokens, new_tokens)
        self.wave(prompts, params)
        failed, cpu = [], 0.0
        for _ in range(rounds):
            results, wall, seconds = self.wave(prompts, params)
            cpu += seconds
            row.wall_s += wall
            for sent, stamps, tokens, error in results:
                if error or not stamps or tokens != new_tokens:  # min_length holds EOS off
                    failed.append(error or f"{tokens} tokens of {new_tokens}")
                    continue
                row.ttft_ms.append(1e3 * (stamps[0] - sent))
                itl = stream_itl_ms(stamps, tokens)  # gaps: between pieces, not tokens
                if itl is not None:
                    row.itl_ms.append(itl)
                row.gap_ms.extend(1e3 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False))
                row.latency_ms.append(1e3 * (stamps[-1] - sent))
                row.tokens += tokens
        extra = {
            "failed": len(failed),
            "first_failure": failed[0] if failed else None,
            "client_processes": self.processes,
            "client_cpu_ms_per_token": 1e3 * cpu / row.tokens if row.tokens else None,
        }
        return row, extra
