"""``make soak``: many clients for a while; any error, or memory that keeps growing, fails it.

    python -m benchmarks.soak --http-url 127.0.0.1:8000 --grpc-url 127.0.0.1:8001 \
        --metrics-url http://127.0.0.1:8002/metrics --clients 8 --seconds 600

Each client thread loops until the time is up: a random mix of streamed and whole
requests, over gRPC and HTTP, with random valid parameters, through the project's own
client (``client/core.py``). A sampler records, every ~2 s, the resident memory of
``tritonserver`` and all its children (the Python backend stubs) and the files in
``/dev/shm`` (the Python backend's shared memory). Exits non-zero on any error or when the
memory grew by 5 % or more after the warm-up. A client of a service on this machine only.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil

from client import ClientError, GenerationParams, Gpt2Client
from client.core import check_address
from gpt2_triton import logs
from gpt2_triton.front_door import is_loopback
from gpt2_triton.process import shared_memory_files

log = logging.getLogger("benchmarks.soak")

MAX_CLIENTS = 64
MAX_SECONDS = 24 * 3600
SAMPLE_EVERY_S = 2.0
MAX_RSS_GROWTH_PCT = 5.0
# A request never outlives the run by much: at most 64 tokens, and this client timeout.
REQUEST_TIMEOUT_S = 120.0

PROMPTS = [
    "The cat",
    "Hello, my name is",
    "In 1998, the city council decided",
    "A small bird looks at the old",
    "東京 is a city where",
    "The chef at the café paints",
    "",  # unconditional: starts from <|endoftext|>
]
STOP_WORDS = [".", " the", "\n", ",", " and"]


@dataclass
class Outcome:
    protocol: str
    stream: bool
    started_s: float  # since the run began
    latency_s: float
    error: str = ""  # empty: it succeeded
    ttft_s: float | None = None  # streams that produced text
    tokens: int = 0


@dataclass
class Sample:
    at_s: float
    rss_bytes: int | None  # tritonserver + children; None: the process is gone
    processes: int
    shm_files: int
    shm_bytes: int


@dataclass
class Soak:
    """What the run collected; the threads append, the summary reads."""

    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def random_params(rng: random.Random) -> GenerationParams:
    max_tokens = rng.randint(1, 64)
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=round(rng.uniform(0.0, 1.5), 3),
        top_k=rng.randint(0, 50),
        top_p=round(rng.uniform(0.5, 1.0), 3),
        repetition_penalty=round(rng.uniform(1.0, 1.3), 3),
        seed=rng.randint(1, 2**32),
        stop_words=tuple(rng.sample(STOP_WORDS, rng.randint(1, 2))) if rng.random() < 0.3 else (),
        min_length=rng.randint(0, max_tokens) if rng.random() < 0.3 else None,
    )


def one_request(clients: dict[str, Gpt2Client], rng: random.Random, began: float) -> Outcome:
    protocol = rng.choice(["grpc", "http"])
    stream = rng.random() < 0.5
    prompt, params = rng.choice(PROMPTS), random_params(rng)
    started = time.perf_counter()
    outcome = Outcome(protocol, stream, started - began, 0.0)
    try:
        if stream:
            text_stream = clients[protocol].stream(prompt, params)
            for _ in text_stream:
                pass
            result = text_stream.result
            if result is None:
                raise ClientError("the stream ended without its final response")
        else:
            result = clients[protocol].generate(prompt, params)
        outcome.tokens = result.num_output_tokens
        outcome.ttft_s = result.time_to_first_token_s if stream else None
    except ClientError as exc:
        outcome.error = f"{exc.status or 'error'}: {exc}"
    except Exception as exc:  # anything the client let through is a finding too
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.latency_s = time.perf_counter() - started
    return outcome


def client_loop(args, index: int, soak: Soak, began: float, stop: threading.Event) -> None:
    rng = random.Random(args.seed * 1000 + index)
    clients = {
        "grpc": Gpt2Client(args.grpc_url, "grpc", timeout_s=REQUEST_TIMEOUT_S),
        "http": Gpt2Client(args.http_url, "http", timeout_s=REQUEST_TIMEOUT_S),
    }
    try:
        while not stop.is_set():
            soak.add(one_request(clients, rng, began))
    finally:
        for client in clients.values():
            client.close()


# -- what the server holds ------------------------------------------------------------------
def find_triton(metrics_url: str) -> psutil.Process:
    """The ``tritonserver`` whose metrics port is ours (several may run on one machine)."""
    port = urlsplit(metrics_url).port
    servers = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        if process.info["name"] == "tritonserver" and process.info["status"] != "zombie":
            servers.append(process)
            if f"--metrics-port={port}" in (process.info["cmdline"] or []):
                return process
    if len(servers) == 1:
        return servers[0]
    raise SystemExit(
        f"error: found {len(servers)} tritonserver processes, none with --metrics-port={port}: "
        "pass --triton-pid"
    )


def rss_of(server: psutil.Process) -> tuple[int | None, int]:
    """Resident bytes of the server and all its children, and how many processes."""
    if not server.is_running():
        return None, 0
    try:
        processes = [server, *server.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None, 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a stub that just ended
            pass
    return total, len(processes)


def shm_usage(server: psutil.Process) -> tuple[int, int]:
    """The /dev/shm files the server's processes map (other servers on the machine have
    their own), and their size."""
    files = sizes = 0
    for path in shared_memory_files(server.pid):
        try:
            sizes += Path(path).stat().st_size
            files += 1
        except OSError:  # removed since
            pass
    return files, sizes


def sampler(server: psutil.Process, soak: Soak, began: float, stop: threading.Event) -> None:
    while True:
        rss, count = rss_of(server)
        files, sizes = shm_usage(server)
        soak.samples.append(Sample(time.perf_counter() - began, rss, count, files, sizes))
        if stop.wait(SAMPLE_EVERY_S):
            return


def server_metrics(urls: list[str]) -> dict[str, float]:
    """The ``gpt2_`` lines of Triton's metrics pages, by full name (labels included),
    summed over the pages: one per replica (``make serve REPLICAS=N``), whose share of
    the requests each one counts."""
    summed: dict[str, float] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("gpt2_"):
                name, value = line.rsplit(" ", 1)
                summed[name] = summed.get(name, 0.0) + float(value)
    return summed


def requests_counted(metrics: dict[str, float]) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith("gpt2_requests_total")))


def sequences_held(metrics: dict[str, float]) -> dict[str, float]:
    """Gauges that must be back at 0 once no request is in flight."""
    return {
        k: v
        for k, v in metrics.items()
        if k.startswith(("gpt2_active_sequences", "gpt2_engine_cached_sequences"))
    }


# -- the summary ------------------------------------------------------------------------------
def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def _rss_around(samples: list[Sample], after_s: float) -> int | None:
    """Median of the first three samples from ``after_s`` on: one sample is noisy."""
    values = [s.rss_bytes for s in samples if s.at_s >= after_s and s.rss_bytes is not None]
    return int(np.median(values[:3])) if values else None


def summarize(soak: Soak, args, wall_s: float, before: dict, after: dict) -> dict:
    outcomes, samples = soak.outcomes, soak.samples
    done = [o for o in outcomes if not o.error]
    errors = Counter(o.error for o in outcomes if o.error)
    latencies = [o.latency_s for o in done]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    tokens = sum(o.tokens for o in done)

    rss = [s.rss_bytes for s in samples if s.rss_bytes is not None]
    warm = _rss_around(samples, args.warmup_seconds)
    # the median of the last three samples: the end is as robust as the warm-up point
    end = int(np.median(rss[-3:])) if rss else None
    # growth needs a run past the warm-up by more than both windows of three samples
    measured = wall_s >= args.warmup_seconds + 6 * SAMPLE_EVERY_S
    growth = round((end - warm) / warm * 100, 2) if measured and warm and end else None

    summary = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_s": round(wall_s, 1),
        "requests": len(outcomes),
        "succeeded": len(done),
        "by_kind": dict(
            Counter(f"{o.protocol}-{'stream' if o.stream else 'whole'}" for o in outcomes)
        ),
        "errors": dict(errors.most_common()),
        "latency_ms": {
            "p50": _ms(latencies, 50),
            "p90": _ms(latencies, 90),
            "p99": _ms(latencies, 99),
        },
        "ttft_ms": {"p50": _ms(ttfts, 50), "p99": _ms(ttfts, 99)},
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "rss_mb": {
            "start": round(rss[0] / 2**20, 1) if rss else None,
            "after_warmup": round(warm / 2**20, 1) if warm else None,
            "end": round(end / 2**20, 1) if end else None,
            "growth_after_warmup_pct": growth,
        },
        "shm": {
            "start": {"files": samples[0].shm_files, "bytes": samples[0].shm_bytes},
            "end": {"files": samples[-1].shm_files, "bytes": samples[-1].shm_bytes},
        },
        "server": {
            "requests_counted": requests_counted(after) - requests_counted(before),
            "sequences_held_at_end": sequences_held(after),
        },
        "samples": [asdict(s) for s in samples],
    }
    failures = []
    if not outcomes:
        failures.append("no request was sent")
    if errors:
        failures.append(f"{sum(errors.values())} request(s) failed")
    counted = summary["server"]["requests_counted"]
    if counted < len(done):  # after main's wait for the count: answered, yet not counted
        failures.append(
            f"the server counted {counted} requests, fewer than the {len(done)} answered"
        )
    if any(s.rss_bytes is None for s in samples):
        failures.append("tritonserver exited during the soak")
    if growth is not None and growth >= MAX_RSS_GROWTH_PCT:
        failures.append(f"server memory grew {growth} % after the warm-up")
    if any(sequences_held(after).values()):
        failures.append(f"sequences still held after the last request: {sequences_held(after)}")
    summary["failures"] = failures
    summary["ok"] = not failures
    return summary


def print_summary(s: dict) -> None:
    rss, shm, lat, ttft = s["rss_mb"], s["shm"], s["latency_ms"], s["ttft_ms"]
    print(f"soak: {s['requests']} requests in {s['wall_s']} s, {s['succeeded']} succeeded")
    print(f"  kinds           {s['by_kind']}")
    for message, count in s["errors"].items():
        print(f"  error x{count:<6} {message}")
    print(f"  latency ms      p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}")
    print(f"  TTFT ms         p50 {ttft['p50']}  p99 {ttft['p99']}  (streams)")
    print(f"  tokens/s        {s['tokens_per_s']}  ({s['output_tokens']} tokens)")
    print(
        f"  server RSS MiB  start {rss['start']}  after warm-up {rss['after_warmup']}  "
        f"end {rss['end']}  growth after warm-up {rss['growth_after_warmup_pct']} %"
    )
    print(
        f"  /dev/shm        start {shm['start']['files']} files {shm['start']['bytes']} B, "
        f"end {shm['end']['files']} files {shm['end']['bytes']} B"
    )
    print(
        f"  server counted  {s['server']['requests_counted']} requests; held at end "
        f"{s['server']['sequences_held_at_end']}"
    )
    print("  PASS" if s["ok"] else "  FAIL: " + "; ".join(s["failures"]))


# -- main -------------------------------------------------------------------------------------
def _loopback(address: str) -> bool:
    return is_loopback(urlsplit(address if "//" in address else f"//{address}").hostname or "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--http-url", default="127.0.0.1:8000", help="the front door, HTTP")
    parser.add_argument("--grpc-url", default="127.0.0.1:8001", help="the front door, gRPC")
    parser.add_argument(
        "--metrics-url",
        action="append",
        help="Triton's metrics page (default http://127.0.0.1:8002/metrics); once per "
        "replica: requests are counted on all, memory is watched on the first's server",
    )
    parser.add_argument("--clients", type=int, default=8, help=f"1 to {MAX_CLIENTS} threads")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        help="memory growth is measured from this point (caches and arenas fill first, "
        "until every request shape has been seen); default: a fifth of the run, >= 20 s",
    )
    parser.add_argument("--seed", type=int, default=0, help="the request mix (reproducible)")
    parser.add_argument("--out", type=Path, help="write the summary (with every sample) here")
    parser.add_argument("--triton-pid", type=int, help="default: found by its metrics port")
    args = parser.parse_args(argv)
    if args.warmup_seconds is None:
        args.warmup_seconds = max(20.0, args.seconds / 5)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be 1 to {MAX_CLIENTS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    args.metrics_url = args.metrics_url or ["http://127.0.0.1:8002/metrics"]
    for name, value in [("http_url", args.http_url), ("grpc_url", args.grpc_url)] + [
        ("metrics_url", url) for url in args.metrics_url
    ]:
        if not _loopback(value):
            parser.error(
                f"--{name.replace('_', '-')}: the soak only loads a service on this machine"
            )
    for name in ("http_url", "grpc_url"):  # what the clients take: host:port
        try:
            check_address(getattr(args, name))
        except ClientError as exc:
            parser.error(f"--{name.replace('_', '-')}: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup()
    server = (
        psutil.Process(args.triton_pid) if args.triton_pid else find_triton(args.metrics_url[0])
    )
    before = server_metrics(args.metrics_url)
    soak, stop, stop_sampler = Soak(), threading.Event(), threading.Event()
    began = time.perf_counter()
    sampling = threading.Thread(
        target=sampler, args=(server, soak, began, stop_sampler), name="sampler", daemon=True
    )
    sampling.start()
    clients = [
        threading.Thread(
            target=client_loop, args=(args, i, soak, began, stop), name=f"client-{i}", daemon=True
        )
        for i in range(args.clients)
    ]
    for thread in clients:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    for thread in clients:
        thread.join(REQUEST_TIMEOUT_S + 10)
    hung = [t.name for t in clients if t.is_alive()]
    wall_s = time.perf_counter() - began
    stop_sampler.set()
    sampling.join(30)
    # The model publishes its metrics every half second: give the last requests a moment
    # to be counted and their sequences to be let go (the deadline only bounds a hang).
    # (a request that failed may never have reached the server: the ones that did not)
    succeeded, deadline = sum(not o.error for o in soak.outcomes), time.monotonic() + 60
    after = server_metrics(args.metrics_url)
    while time.monotonic() < deadline and (
        any(sequences_held(after).values())
        or requests_counted(after) - requests_counted(before) < succeeded
    ):
        time.sleep(0.5)
        after = server_metrics(args.metrics_url)

    summary = summarize(soak, args, wall_s, before, after)
    if hung:
        summary["failures"].append(f"clients still running after the end: {hung}")
        summary["ok"] = False
    print_summary(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2, default=str))
        log.info("wrote %s", args.out)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
