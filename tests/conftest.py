"""Session fixtures: the tiny model and its ONNX export, built once into a temporary folder.

Every test runs on the tiny GPT-2 (same architecture and code path as ``gpt2``), built
offline by the project itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2_triton.checkpoint import ARTIFACTS_ENV

# Chosen before any test module imports code that reads it; kept (and named in the summary)
# when a test failed or the run was stopped, for the logs of the servers it ran, else removed.
_ARTIFACTS = Path(tempfile.mkdtemp(prefix="gpt2-triton-tests-"))
os.environ[ARTIFACTS_ENV] = str(_ARTIFACTS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _keep_artifacts(exitstatus) -> bool:
    return exitstatus in (pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.INTERRUPTED)


def pytest_sessionfinish(session, exitstatus) -> None:
    # session fixtures (servers included) are torn down by now
    if not _keep_artifacts(exitstatus):
        shutil.rmtree(_ARTIFACTS, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus) -> None:
    if _keep_artifacts(exitstatus) and _ARTIFACTS.exists():
        terminalreporter.write_line(f"the session's models, repositories and logs: {_ARTIFACTS}")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    return _ARTIFACTS


@pytest.fixture(scope="session")
def tiny_model(artifacts) -> Path:
    from build_scripts import build_tiny

    return build_tiny.ensure()


@pytest.fixture(scope="session")
def tiny_data(tiny_model) -> Path:
    from build_scripts import build_tiny

    return build_tiny.data_dir()


@pytest.fixture(scope="session")
def tiny_export(tiny_model) -> Path:
    from build_scripts import export_onnx

    return export_onnx.run("tiny", int8=True, skip_existing=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False): tests
    wait on a state, with the timeout only as a bound."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def gpt2_metrics(metrics_url: str) -> dict[str, float]:
    """The gpt2 model's series on a Triton metrics port, by their full names."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("gpt2_")
    }


# The gpt2 model publishes its metrics from its loop every 0.5 s (gpt2/1/model.py), also
# while idle; a reading taken this long after another shows a publication made after it.
METRICS_SETTLE_S = 1.2


def wait_until_idle(metrics_url: str, timeout: float = 120) -> dict[str, float]:
    """Wait until the gpt2 model holds no sequence (running, queued or cached), then
    return a reading published after that: a baseline that counts every request ended
    before. An idle reading alone may be older than the last requests (one too short to
    span a publication leaves none); the second one, taken a publication cycle later and
    idle too, is not. The model publishes counters before gauges, so idle gauges come with
    the counts of the requests that had just left."""
    seen: dict[str, float] = {}

    def idle() -> bool:
        seen.clear()
        seen.update(gpt2_metrics(metrics_url))
        cached = [v for k, v in seen.items() if k.startswith("gpt2_engine_cached_sequences{")]
        return (
            seen.get("gpt2_active_sequences") == 0
            and seen.get("gpt2_waiting_requests") == 0
            and not any(cached)
        )

    def settled() -> bool:
        if not idle():
            return False
        time.sleep(METRICS_SETTLE_S)
        return idle()

    if not wait_until(settled, timeout):
        pytest.fail(f"the gpt2 model did not become idle in {timeout:.0f} s: {seen}")
    return dict(seen)


def envoy_validate(config_file: Path) -> None:
    """The real envoy binary accepts the configuration (``--mode validate``)."""
    import subprocess

    from gpt2_triton.front_door import envoy_binary

    out = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-path", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def free_ports(count: int) -> list[int]:
    return _free_ports(count)


_HANDED_OUT: set[int] = set()  # ports given to servers this session: none is given twice


def _free_ports(count: int) -> list[int]:
    """Ports free now, none handed out before in this session: the kernel can offer a port
    again once its probe socket is closed, even while the server it went to is still
    starting (and has not bound it yet)."""
    import socket

    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


@pytest.fixture()
def unused_port() -> int:
    return _free_ports(1)[0]


def _free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports, each free now and none handed out before
    in this session (the harness serves on --port and the seven after it: a server of an
    earlier test may hold one of those, so each is tried)."""
    import socket

    while True:
        first = _free_ports(1)[0]
        block = range(first, first + count)
        if block[-1] > 65535 or any(port in _HANDED_OUT for port in block[1:]):
            continue
        try:
            with contextlib.ExitStack() as probes:
                for port in block[1:]:
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.update(block)
        return first


@pytest.fixture()
def unused_port_block() -> int:
    """The first of eight consecutive free ports (``benchmarks.harness --port``)."""
    return _free_port_block(8)


class QuietHandler(BaseHTTPRequestHandler):
    """A scripted HTTP server's handler that keeps the test output clean."""

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler], before_stop=None) -> Iterator[str]:
    """host:port of a threading HTTP server on loopback running ``handler``; stopped (after
    ``before_stop``, which can end the requests it holds) when the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        if before_stop is not None:
            before_stop()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """host:port of a server that takes connections and never says a word (stuck, or
    hostile): a listening socket nobody reads. The kernel completes the TCP handshake
    for the backlog, so a client connects and then waits for an answer."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


ADMIN_KEY = "test-admin-key"


def service(repository: Path, log_dir: Path, replicas: int = 1, supervision=None, **front_door):
    """The service as users run it: Triton (``replicas`` of it) behind the Envoy front door,
    on free ports (``supervision``: Service's arguments of the supervisor, if not its own)."""
    from gpt2_triton.front_door import FrontDoorSettings
    from gpt2_triton.serve import Service
    from gpt2_triton.triton_server import Ports

    http, grpc, gateway, *triton_ports = _free_ports(3 + 3 * replicas)
    replica_ports = [Ports(*triton_ports[3 * i : 3 * i + 3]) for i in range(replicas)]
    settings = FrontDoorSettings(
        http_port=http,
        grpc_port=grpc,
        triton_http_port=replica_ports[0].http,
        triton_grpc_port=replica_ports[0].grpc,
        gateway_port=gateway,
        **{"admin_key": ADMIN_KEY, **front_door},
    )
    return Service(
        repository, settings, log_dir=log_dir, replica_ports=replica_ports, **(supervision or {})
    )


@pytest.fixture(scope="session")
def triton(tiny_export, artifacts):
    """The tiny model (ONNX Runtime engine) served by a real tritonserver behind Envoy."""
    from build_scripts.build_repo import RepoSettings, build

    repository = build(
        RepoSettings("tiny", "onnx", max_sequences=16), repository=artifacts / "model_repository"
    )
    with service(repository, artifacts / "logs") as server:
        yield server


def cut_as_the_next_turn_begins(grpc_url: str, message: str) -> tuple[int, str]:
    """A greedy chat reply's token limit that cuts it as the model begins the next turn
    (its raw text ending "...\\nUser" or the like: the server held that back as a possible
    stop word and let it out at the end), with that raw text. Found on the real server:
    the greedy reply stops at the transcript's stop word after some tokens, and a limit
    a token or two short of it falls inside the stop word."""
    from client import GenerationParams, Gpt2Client
    from gpt2_triton.transcript import STOP_WORDS, chat_prompt, without_a_begun_turn

    prompt = chat_prompt([], message)
    with Gpt2Client(grpc_url) as client:
        params = GenerationParams(temperature=0, max_tokens=120, stop_words=STOP_WORDS)
        whole = client.generate(prompt, params)
        assert whole.finish_reason == "stop", "the greedy reply must end at a next turn"
        for limit in range(whole.num_output_tokens - 1, 0, -1):
            cut = client.generate(prompt, replace(params, max_tokens=limit))
            if without_a_begun_turn(cut.text) != cut.text:
                return limit, cut.text
    raise AssertionError(f"no token limit cuts {message!r}'s reply inside its stop word")
