"""The preStop drain of the Kubernetes pods (gpt2_triton.drain): it returns only once the
streams a replica (or a front door) holds are over. Unit tests of the wait on a fake clock;
then the real thing: a tritonserver serving the tiny model with streams in flight, and the
real envoy on the project's template holding a request."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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


def wait(readings, timeout=60.0, quiet=10.0):
    """Runs the wait on a fake clock, one reading a second: (drained?, seconds taken)."""
    clock = FakeClock()
    readings = iter(readings)

    def in_flight():
        value = next(readings)
        if isinstance(value, Exception):
            raise value
        return value

    drained = drain.wait_until_idle(in_flight, timeout, quiet, 1.0, clock, clock.sleep)
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


@pytest.mark.integration
def test_a_replica_is_drained_only_once_its_streams_end(bare_triton):
    in_flight = lambda: drain.triton_in_flight(bare_triton.metrics_url)  # noqa: E731
    assert in_flight() == 0
    ended: list[float] = []
    streams = [threading.Thread(target=stream, args=(bare_triton, 500, ended)) for _ in range(8)]
    for thread in streams:
        thread.start()
    deadline = time.monotonic() + 30
    while in_flight() == 0:  # the gauges are published every 0.5 s
        assert time.monotonic() < deadline and len(ended) < len(streams), "never seen in flight"
        time.sleep(0.05)
    if ended:
        pytest.fail("a stream ended before the drain began: lengthen the streams")

    assert drain.wait_until_idle(in_flight, timeout_s=120, quiet_s=1.0, interval_s=0.1)
    drained = time.monotonic()
    for thread in streams:
        thread.join(timeout=120)
    assert len(ended) == len(streams)
    assert max(ended) <= drained  # not one stream was still running when it returned
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
