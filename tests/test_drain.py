"""The preStop drain of the Kubernetes pods (gpt2_triton.drain): it returns only once the
streams a replica (or a front door) holds are over, and never after its time budget.
Unit tests of the wait on a fake clock; hostile servers on real sockets (silent, trickling,
cut short, not text, failing) that it must outlast without crashing or overrunning; then
the real thing: a tritonserver serving the tiny model with streams in flight, and the real
envoy on the project's template holding a request."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_ports, gpt2_metrics

from gpt2_triton import drain, names
from gpt2_triton.front_door import EnvoyProxy, FrontDoorSettings
from gpt2_triton.triton_server import Ports, TritonServer

TRITON_METRICS = """\
# HELP gpt2_active_sequences Sequences in the running batch
# TYPE gpt2_active_sequences gauge
gpt2_active_sequences 3
# HELP gpt2_waiting_requests Requests queued to join
# TYPE gpt2_waiting_requests gauge
gpt2_waiting_requests{} 2
gpt2_waiting_requests_total 40
nv_inference_count{model="gpt2",version="1"} 7
gpt2_engine_cached_sequences{engine="onnx",model="gpt2 in process"} 3
"""


# -- unit ------------------------------------------------------------------------------------
def test_in_flight_is_the_batch_plus_the_queue():
    assert drain.IN_FLIGHT_METRICS == (
        names.ACTIVE_SEQUENCES_METRIC,
        names.WAITING_REQUESTS_METRIC,
    )
    assert drain.metric_sum(TRITON_METRICS, drain.IN_FLIGHT_METRICS) == 5
    assert drain.metric_sum(TRITON_METRICS, ["gpt2_engine_cached_sequences"]) == 3
    assert drain.metric_sum("", drain.IN_FLIGHT_METRICS) == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def wait(readings, timeout=60.0, quiet=10.0, read_timeout=5.0):
    """Runs the wait on a fake clock, one reading a second: (drained?, seconds taken). A
    reading that is a number of seconds in a tuple, ("takes", s), is a read that takes
    that long (capped by the time it was given, as a socket timeout would) and fails."""
    clock = FakeClock()
    readings = iter(readings)

    def in_flight(timeout_s):
        assert 0 < timeout_s <= read_timeout
        value = next(readings)
        if isinstance(value, tuple):
            clock.sleep(min(value[1], timeout_s))
            raise TimeoutError("timed out")
        if isinstance(value, Exception):
            raise value
        return value

    drained = drain.wait_until_idle(
        in_flight, timeout, quiet, 1.0, read_timeout, clock=clock, sleep=clock.sleep
    )
    return drained, clock.now


def test_the_wait_ends_after_a_quiet_window_not_at_the_first_zero():
    # a request routed just before the pod left the rotation arrives at second 3
    readings = [0, 0, 0, 1, 1, 0] + [0] * 20
    assert wait(readings) == (True, 15.0)  # 5 + 10 quiet seconds


def test_the_wait_gives_up_at_its_timeout():
    assert wait([2] * 100, timeout=30) == (False, 30.0)


def test_a_server_that_is_gone_has_nothing_to_drain():
    assert wait([1, 1, None]) == (True, 2.0)


def test_an_unreadable_count_is_not_taken_for_idle():
    readings = [0, 0, OSError("timed out")] + [0] * 20
    assert wait(readings, quiet=5) == (True, 8.0)


@pytest.mark.parametrize(
    "failure",
    [
        http.client.IncompleteRead(b"gpt2_active", 100),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        json.JSONDecodeError("Expecting value", "{", 1),
        ValueError("could not convert string to float: 'x'"),
        http.client.BadStatusLine("garbage"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_failure_of_a_read_is_unknown_not_idle_nor_a_crash(failure):
    # a crash would end the hook at once and the kubelet's SIGTERM would cut the streams
    readings = [0, failure, 0] + [0] * 20
    assert wait(readings, quiet=5) == (True, 7.0)  # the quiet window restarted after it
    assert wait([failure] * 100, timeout=20) == (False, 20.0)


def test_reads_that_hang_do_not_stretch_the_timeout():
    # a silent server, read with a 5 s timeout each time: the old wait returned after
    # 17 s for --timeout 12 (the last read started at 12 s less a bit, and took 5 s)
    assert wait([("takes", 60)] * 100, timeout=12, read_timeout=5) == (False, 12.0)
    # the last read gets only the time left: 0.5 s here
    assert wait([("takes", 60)] * 100, timeout=11.5, read_timeout=5) == (False, 11.5)


# -- hostile servers on real sockets -----------------------------------------------------
# What a drain may meet instead of a healthy metrics endpoint or admin socket: each one
# answers every request (read up to its blank line) with one of these, on the raw socket.
Behaviour = Callable[[socket.socket, threading.Event], None]
# What a busy 2-core machine may add to a deadline (thread start-up, logging, a stall).
# The budget is larger than the slack, so a budget spent twice (by the drain call, then
# again by the wait) still fails; the reads it must cut short last far longer than both.
SLACK_S = 4.0
BUDGET_S = 6
READ_TIMEOUT_S = "60"
# the warnings the drain logs where it used to crash
READ_FAILED = "cannot read what is in flight"
DRAIN_CALL_FAILED = "envoy did not drain its listeners"


def answer(body: bytes, status: str = "200 OK") -> Behaviour:
    def behave(conn, stop):
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    return behave


def silent(conn, stop):
    stop.wait(60)  # reads the request, never answers


def trickle(conn, stop):
    # a valid start, then one byte of an endless header every 50 ms: each byte resets a
    # per-read socket timeout, so only a deadline for the whole read ends it
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while not stop.wait(0.05):
        conn.sendall(b"a")


def cut_short(conn, stop):
    # the server dies mid-body: shorter than its Content-Length (IncompleteRead)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\ngpt2_active_sequences 0\n")


IDLE = f"{names.ACTIVE_SEQUENCES_METRIC} 0\n{names.WAITING_REQUESTS_METRIC} 0\n".encode()
NOT_UTF8 = IDLE.decode().encode("utf-16")  # a byte-order mark and NULs: not UTF-8
HOSTILE_METRICS = {
    "silent": silent,
    "trickle": trickle,
    "cut-short": cut_short,
    "not-utf8": answer(NOT_UTF8),
    "not-the-gauges": answer(b"nv_inference_count 0\n"),  # not idle: not the model's page
    "http-500": answer(b"oops", "500 Internal Server Error"),
}


class HostileServer:
    """A local server (TCP, or a unix socket like Envoy's admin) whose every connection
    gets ``behave``: not a stand-in for Triton or Envoy, a misbehaving peer."""

    def __init__(self, behave: Behaviour, unix_path: Path | None = None) -> None:
        self.behave = behave
        self.stop = threading.Event()
        if unix_path:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(unix_path))
            self.listener.listen(16)
        else:
            self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # the accept loop looks at `stop` this often
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/metrics"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                self.behave(conn, self.stop)
            except OSError:
                pass  # the client gave up (its deadline): what this server is for

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        self.listener.close()


@pytest.fixture()
def hostile() -> Iterator[Callable[..., HostileServer]]:
    servers: list[HostileServer] = []

    def start(behave: Behaviour, unix_path: Path | None = None) -> HostileServer:
        servers.append(HostileServer(behave, unix_path))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    # a unix socket's path has 107 bytes at most: pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="drain") as folder:
        yield Path(folder)


def run_hook(argv: list[str], limit_s: float) -> tuple[int, float]:
    """drain.main in a thread: (its exit status, seconds taken); fails if it is still
    running after ``limit_s`` (a hook that never returns), or raised."""
    result: list[int] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(drain.main(argv))
        except BaseException as exc:  # SystemExit included: the kubelet would see rc 1
            errors.append(exc)

    started = time.monotonic()
    hook = threading.Thread(target=target, daemon=True)
    hook.start()
    hook.join(timeout=limit_s)
    taken = time.monotonic() - started
    assert not hook.is_alive(), f"the hook was still running after {limit_s} s"
    assert not errors, f"the hook crashed: {errors[0]!r}"
    return result[0], taken


def test_a_well_behaved_idle_replica_drains(hostile):
    # the control for the hostile servers below: the same harness, an honest answer
    server = hostile(answer(IDLE))
    assert drain.triton_in_flight(server.url) == 0
    argv = ["--timeout", "5", "--quiet", "0.3", "--interval", "0.1"]
    assert run_hook([*argv, "triton", "--metrics-url", server.url], 5 + SLACK_S)[0] == 0


@pytest.mark.parametrize("behave", HOSTILE_METRICS.values(), ids=HOSTILE_METRICS.keys())
def test_a_hostile_metrics_endpoint_is_waited_out_within_the_timeout(hostile, behave, caplog):
    server = hostile(behave)
    argv = ["--timeout", str(BUDGET_S), "--quiet", "0", "--interval", "0.1"]
    argv += ["--read-timeout", READ_TIMEOUT_S]
    with caplog.at_level(logging.WARNING, logger="gpt2_triton.drain"):
        status, taken = run_hook([*argv, "triton", "--metrics-url", server.url], BUDGET_S + 80)
    # not idle (unknown means wait on), not a crash, and within the budget (give or take a
    # busy machine's slack), though each read may take 60 s
    assert status == 1
    assert BUDGET_S - 0.05 <= taken <= BUDGET_S + SLACK_S, taken
    assert READ_FAILED in caplog.text


def test_a_trickling_server_cannot_hold_one_read(hostile):
    server = hostile(trickle)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        drain.triton_in_flight(server.url, timeout=1.0)
    assert time.monotonic() - started <= 1.0 + SLACK_S


HOSTILE_ADMIN = {  # the behaviour, and the first warning it earns
    "silent": (silent, DRAIN_CALL_FAILED),
    "trickle": (trickle, DRAIN_CALL_FAILED),
    "cut-short": (cut_short, DRAIN_CALL_FAILED),
    "http-503": (answer(b"busy", "503 Service Unavailable"), DRAIN_CALL_FAILED),
    # the drain call has its 200; the stats that follow are no JSON (nor UTF-8)
    "not-json": (answer(b"\xff\xfe not json"), READ_FAILED),
}


@pytest.mark.parametrize("behave, warning", HOSTILE_ADMIN.values(), ids=HOSTILE_ADMIN.keys())
def test_a_hostile_envoy_admin_is_waited_out_within_the_timeout(
    hostile, short_dir, behave, warning, caplog
):
    socket_path = short_dir / "admin.sock"
    hostile(behave, unix_path=socket_path)
    argv = ["--timeout", str(BUDGET_S), "--quiet", "0", "--interval", "0.1"]
    argv += ["--read-timeout", READ_TIMEOUT_S]
    with caplog.at_level(logging.WARNING, logger="gpt2_triton.drain"):
        status, taken = run_hook(
            [*argv, "envoy", "--admin-socket", str(socket_path)], BUDGET_S + 80
        )
    # the drain call's failures are logged, not raised: the wait (or its budget) goes on,
    # and the call spends the same budget (a silent admin holds it the budget, not 60 s)
    assert status == 1
    assert BUDGET_S - 0.05 <= taken <= BUDGET_S + SLACK_S, taken
    assert warning in caplog.text


def test_a_failed_drain_call_is_logged_and_the_wait_goes_on(hostile, short_dir, caplog):
    socket_path = short_dir / "admin.sock"
    hostile(answer(b"busy", "503 Service Unavailable"), unix_path=socket_path)
    with caplog.at_level(logging.WARNING, logger="gpt2_triton.drain"):
        assert drain.envoy_drain_listeners(str(socket_path), timeout=2) is True
    assert "HTTP 503" in caplog.text
    assert drain.envoy_drain_listeners(str(short_dir / "gone.sock")) is False


# -- a real Triton -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_triton(tiny_export, tmp_path_factory):
    """The tiny model on a real tritonserver, without the front door: what a pod runs."""
    from build_scripts.build_repo import RepoSettings, build

    folder = tmp_path_factory.mktemp("drain")
    repository = build(
        RepoSettings("tiny", "onnx", max_sequences=16), repository=folder / "model_repository"
    )
    with TritonServer(repository, Ports(*free_ports(3)), log_file=folder / "triton.log") as server:
        yield server


def stream(server: TritonServer, tokens: int, ended: list[float]) -> None:
    # greedy, and exactly `tokens` long: every run streams the same, long enough to drain
    fields = {"text_input": "The cat", "max_tokens": tokens, "min_length": tokens}
    body = json.dumps({**fields, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/gpt2/generate_stream", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [
            line for line in response.read().decode().splitlines() if line.startswith("data:")
        ]
    last = json.loads(events[-1][5:])
    assert last.get("finish_reason") == "length", last
    ended.append(time.monotonic())


def ran_out(server: TritonServer) -> float:
    """gpt2_requests_total{finish_reason="length"} on the server's metrics port."""
    return gpt2_metrics(server.metrics_url).get('gpt2_requests_total{finish_reason="length"}', 0.0)


@pytest.mark.integration
def test_a_replica_is_drained_only_once_its_streams_end(bare_triton):
    def in_flight(timeout: float = drain.READ_TIMEOUT_S) -> float | None:
        return drain.triton_in_flight(bare_triton.metrics_url, timeout)

    # The drain must begin while the streams run. On a busy machine a stream can end before
    # the gauges (published every 0.5 s) show it: that attempt proves nothing, so it is
    # repeated with longer streams (the tiny model's window allows 1000 new tokens).
    for tokens in (500, 1000, 1000, 1000):
        assert drain.wait_until_idle(in_flight, timeout_s=120, quiet_s=0.5, interval_s=0.1)
        ran_out_before = ran_out(bare_triton)
        ended: list[float] = []
        streams = [
            threading.Thread(target=stream, args=(bare_triton, tokens, ended)) for _ in range(8)
        ]
        for thread in streams:
            thread.start()
        while in_flight() == 0 and len(ended) < len(streams):
            time.sleep(0.05)
        if not ended:
            break
        for thread in streams:  # inconclusive: let them end, then try again
            thread.join(timeout=120)
    else:
        pytest.fail("in 4 attempts a stream always ended before the drain began")

    assert drain.wait_until_idle(in_flight, timeout_s=120, quiet_s=1.0, interval_s=0.1)
    # Not one stream was still running when it returned: the server had counted all of
    # them as run to their end (its counts are published before its gauges, so the idle
    # gauges the drain saw came with them). The clients may read their last bytes later.
    assert ran_out(bare_triton) - ran_out_before >= len(streams)
    for thread in streams:
        thread.join(timeout=120)
    assert len(ended) == len(streams)
    assert in_flight() == 0


def test_the_drain_of_a_stopped_replica_returns_at_once(unused_port):
    url = f"http://127.0.0.1:{unused_port}/metrics"
    assert drain.triton_in_flight(url) is None
    started = time.monotonic()
    assert drain.main(["--quiet", "30", "triton", "--metrics-url", url]) == 0
    assert time.monotonic() - started < 5


# -- a real Envoy ------------------------------------------------------------------------
class HeldUpstream(BaseHTTPRequestHandler):
    """Stands in for Triton: ready for the health checks; POST waits until released."""

    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer(b"")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.release.wait(60)
        self._answer(b'{"held": "released"}')

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def front_door(tmp_path):
    http_port, grpc_port, triton_http, triton_grpc, gateway = free_ports(5)
    upstream = ThreadingHTTPServer(("127.0.0.1", triton_http), HeldUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    settings = FrontDoorSettings(
        http_port=http_port,
        grpc_port=grpc_port,
        triton_http_port=triton_http,
        triton_grpc_port=triton_grpc,
        gateway_port=gateway,
        admin_socket=str(tmp_path / "admin.sock"),
        health_interval_s=0.2,
    )
    envoy = EnvoyProxy(settings, tmp_path / "envoy.yaml", tmp_path / "envoy.log").start()
    try:
        envoy.wait_live()
        yield envoy
    finally:
        HeldUpstream.release.set()
        envoy.stop()
        upstream.shutdown()
        upstream.server_close()


def call(port: int, method: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.integration
def test_the_front_door_drains_its_listeners_and_waits_for_what_is_in_flight(front_door):
    HeldUpstream.release.clear()
    port = front_door.settings.http_port
    socket_path = front_door.settings.admin_socket
    deadline = time.monotonic() + 30
    while call(port, "GET", "/v2/health/ready")[0] != 200:  # the upstream passed its check
        assert time.monotonic() < deadline, "the upstream never became healthy"
        time.sleep(0.1)
    assert drain.envoy_in_flight(socket_path) == 0  # the admin query itself is not counted

    held: list[tuple[int, bytes]] = []
    client = threading.Thread(target=lambda: held.append(call(port, "POST", "/v2/hold")))
    client.start()
    while drain.envoy_in_flight(socket_path) != 1:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.05)

    result: list[int] = []
    argv = ["--quiet", "0.5", "--interval", "0.1", "--timeout", "60"]
    hook = threading.Thread(
        target=lambda: result.append(drain.main([*argv, "envoy", "--admin-socket", socket_path]))
    )
    hook.start()
    hook.join(timeout=2)
    assert hook.is_alive(), "the drain returned while a request was in flight"

    HeldUpstream.release.set()
    hook.join(timeout=30)
    client.join(timeout=30)
    assert result == [0]
    assert held == [(200, b'{"held": "released"}')]  # the drain did not cut it


def test_the_drain_of_a_stopped_front_door_returns_at_once(tmp_path):
    assert drain.main(["envoy", "--admin-socket", str(tmp_path / "gone.sock")]) == 0


def says_draining(port: int) -> bool:
    """Whether the door's answer to a health request asks the client to reconnect
    (``Connection: close``): what a drained listener tells HTTP/1 clients."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/v2/health/ready")
        response = connection.getresponse()
        response.read()
        return (response.getheader("connection") or "").lower() == "close"
    finally:
        connection.close()


@pytest.mark.integration
@pytest.mark.parametrize("stop", ["compose's SIGTERM", "a terminal's Ctrl-C"])
def test_the_compose_front_door_drains_on_sigterm_then_stops(short_dir, stop):
    """compose has no preStop: `front_door --run --drain-seconds` runs the drain itself on
    the SIGTERM of a stop, so a request in flight through the door is answered before
    Envoy goes (before, Envoy was exec'd and ended at once, cutting it). A Ctrl-C goes to
    the terminal's whole process group: Envoy, in a group of its own, is not stopped by
    it before the drain."""
    import subprocess
    import sys

    http_port, grpc_port, triton_http, triton_grpc, gateway = free_ports(5)
    HeldUpstream.release.clear()
    upstream = ThreadingHTTPServer(("127.0.0.1", triton_http), HeldUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    socket_path = str(short_dir / "admin.sock")
    ports = {
        "--http-port": http_port,
        "--grpc-port": grpc_port,
        "--triton-http-port": triton_http,
        "--triton-grpc-port": triton_grpc,
        "--gateway-port": gateway,
    }
    door = subprocess.Popen(
        [sys.executable, "-m", "gpt2_triton.front_door", "--run", "--drain-seconds", "120",
         "--out", str(short_dir / "envoy.yaml"), "--admin-socket", socket_path,
         *[str(x) for pair in ports.items() for x in pair]],
        start_new_session=True,
    )  # fmt: skip
    held: list[tuple[int, bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # the door listens and the upstream passed its health check
            assert door.poll() is None, "the front door exited while starting"
            try:
                if call(http_port, "GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the front door never became ready"
            time.sleep(0.2)
        client = threading.Thread(target=lambda: held.append(call(http_port, "POST", "/v2/x")))
        client.start()
        while drain.envoy_in_flight(socket_path) != 1:
            assert time.monotonic() < deadline, "the request never reached the upstream"
            time.sleep(0.05)
        assert not says_draining(http_port)  # before the stop: connections are kept
        if stop == "compose's SIGTERM":
            door.send_signal(signal.SIGTERM)
        else:
            os.killpg(door.pid, signal.SIGINT)
        while not says_draining(http_port):  # the drain began; Envoy still serves
            assert door.poll() is None, "the front door stopped without draining"
            assert time.monotonic() < deadline + 60, "the drain never began"
            time.sleep(0.1)
        assert door.poll() is None and not held  # held: Envoy waits with it
        HeldUpstream.release.set()
        client.join(timeout=60)
        assert held == [(200, b'{"held": "released"}')]  # answered, not cut
        assert door.wait(timeout=60) == 0
    finally:
        HeldUpstream.release.set()
        if door.poll() is None:
            os.killpg(door.pid, signal.SIGKILL)
            door.wait()
        upstream.shutdown()
        upstream.server_close()
