"""Integration: the service survives a dead Triton and leaves no process behind.

Triton is killed here, so these tests never touch the session's shared ``triton``: they
start their own service (or ``python -m gpt2_triton.serve``) on the session's rendered
repository. Only the issue's promises are timed (ready through the front door within 30 s
of a SIGKILL; no process left within 10 s); every other wait is on a state, generously.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

from client import ClientError, GenerationParams, Gpt2Client
from gpt2_triton.process import group_alive, stop_group
from gpt2_triton.serve import BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_AFTER_S, Backoff

GREEDY = GenerationParams(temperature=0, max_tokens=24)
LONG = GenerationParams(temperature=0, max_tokens=1000, min_length=1000)  # seconds of stream
READY_AFTER_KILL_S = 30.0  # the promise
NOTHING_LEFT_S = 10.0  # the promise
# Envoy's own answers while Triton is down: no replica ready, or (a request that went out
# on a connection the kill had just cut) the connection cut before Triton answered
DOWN_BODIES = ("Triton is not ready", "the connection to Triton was cut")
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def supervised(triton, artifacts):
    """A service of its own (Triton gets killed): the session's repository, its own logs."""
    from conftest import service

    with service(triton.triton.model_repository, artifacts / "logs_supervision") as server:
        yield server


def test_the_restart_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run():
    backoff = Backoff()
    quick = [backoff.wait(up_for_s=0.5) for _ in range(8)]  # crash-looping
    assert quick[:3] == [BACKOFF_FIRST_S, 2 * BACKOFF_FIRST_S, 4 * BACKOFF_FIRST_S]
    assert max(quick) == quick[-1] == BACKOFF_MAX_S
    # a process that never came up earns no fresh start; one that stayed up does
    assert backoff.wait() == BACKOFF_MAX_S
    assert backoff.wait(up_for_s=STABLE_AFTER_S + 1) == BACKOFF_FIRST_S
    assert backoff.wait(up_for_s=STABLE_AFTER_S + 1) == BACKOFF_FIRST_S
    assert backoff.wait(up_for_s=STABLE_AFTER_S - 1) == 2 * BACKOFF_FIRST_S


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (PID 1 here never reaps the orphans it inherits)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _left(processes: list[psutil.Process]) -> list[str]:
    """The ones still running, as "pid name" (names are cached by psutil once read)."""
    left = []
    for process in processes:
        if _running(process):
            try:
                left.append(f"{process.pid} {process.name()}")
            except psutil.NoSuchProcess:
                pass
    return left


def _http_get(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """(status, body); None when nothing answered at all."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, ""


def _http_generate(http_url: str) -> tuple[int | None, str]:
    body = {"text_input": "The cat", "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(
        f"http://{http_url}/v2/models/gpt2/generate", data=json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, ""


def _generate_when_possible(url: str, protocol: str, timeout: float = 60.0) -> str:
    """Greedy text once a request goes through: after a restart, Envoy's health checks of
    its HTTP and gRPC clusters turn healthy up to an interval apart."""
    deadline = time.monotonic() + timeout
    with Gpt2Client(url, protocol=protocol, timeout_s=60) as client:
        while True:
            try:
                return client.generate("The cat", GREEDY).text
            except ClientError as exc:
                if exc.status != "UNAVAILABLE" or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def _complete_when_possible(url: str, timeout: float = 60.0) -> str:
    """The gateway's greedy completion once it answers 200 (503 while it reconnects)."""
    body = {"model": "any", "prompt": "The cat", "max_tokens": GREEDY.max_tokens}
    deadline = time.monotonic() + timeout
    while True:
        try:
            models = urllib.request.urlopen(f"http://{url}/v1/models", timeout=10)
            body = {**body, "model": json.loads(models.read())["data"][0]["id"], "temperature": 0}
            request = urllib.request.Request(
                f"http://{url}/v1/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
            return reply["choices"][0]["text"]
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


class Consumer(threading.Thread):
    """Reads one long stream; records the text, and how it ended."""

    def __init__(self, url: str, protocol: str) -> None:
        super().__init__(name=f"consumer-{protocol}", daemon=True)
        self.url, self.protocol = url, protocol
        self.first_text = threading.Event()
        self.pieces: list[str] = []
        self.error: BaseException | None = None
        self.completed = False  # the iteration ended without an error
        self.result = None  # set by a stream that got its final response

    def run(self) -> None:
        try:
            # its own timeout well above the join below: a hang shows as "still running"
            with Gpt2Client(self.url, protocol=self.protocol, timeout_s=300) as client:
                stream = client.stream("Once upon a time", LONG)
                for piece in stream:
                    self.pieces.append(piece)
                    self.first_text.set()
                self.result = stream.result
            self.completed = True
        except BaseException as exc:  # judged by the test
            self.error = exc
        finally:
            self.first_text.set()  # a stream that failed at once must not block the test


def _live_streams(service, attempts: int = 3) -> list[Consumer]:
    """Long streams over both protocols, all generating. On a busy machine the first ones
    can finish before the last one starts: then the attempt is let run out and repeated
    with more streams (the server then takes longer per token)."""
    for attempt in range(attempts):
        consumers = [
            Consumer(url, protocol)
            for _ in range(2 + 2 * attempt)
            for url, protocol in ((service.grpc_url, "grpc"), (service.http_url, "http"))
        ]
        for consumer in consumers:
            consumer.start()
        for consumer in consumers:
            assert consumer.first_text.wait(120), f"{consumer.name} got no text"
        early = [(c.name, c.error) for c in consumers if c.error or c.completed]
        if not early:
            return consumers
        for consumer in consumers:
            consumer.join(120)
    pytest.fail(f"in {attempts} attempts a stream always ended before the kill: {early}")


@pytest.mark.integration
def test_sigkill_mid_stream_errors_clients_and_the_supervisor_restarts_triton(supervised):
    service = supervised
    before_text = _generate_when_possible(service.grpc_url, "grpc")
    old_pid = service.triton.process.pid  # start_new_session: also its process group id
    old_restarts = service.restarts
    old_process = psutil.Process(old_pid)
    stubs = old_process.children(recursive=True)
    assert stubs, "the Python backend stubs should be children of tritonserver"

    consumers = _live_streams(service)

    regions = set(Path("/dev/shm").glob(f"{service.triton.shm_prefix}*"))
    assert regions, "the Python backend keeps its shared memory in /dev/shm, named by port"
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    # Poll the front door quickly: ready again, and the old group gone, each timed from the
    # kill. On the way, a request while Triton is down shows what clients get then.
    ready_after = gone_after = None
    down: dict[str, object] = {}
    while time.monotonic() - killed_at < 120 and (ready_after is None or gone_after is None):
        if gone_after is None and not group_alive(old_pid):
            gone_after = time.monotonic() - killed_at
        if ready_after is None and not _running(old_process):
            if not down:
                down["http"] = _http_generate(service.http_url)
                try:
                    with Gpt2Client(service.grpc_url) as client:
                        client.generate("The cat", GREEDY)
                except ClientError as exc:
                    down["grpc"] = (exc.status, str(exc))
            status, _ = _http_get(f"http://{service.http_url}/v2/health/ready", timeout=1)
            if status == 200:
                ready_after = time.monotonic() - killed_at
        time.sleep(0.05)
    print(
        f"\nafter SIGKILL: ready through the front door in {ready_after} s, "
        f"old process group gone in {gone_after} s; while down: {down}"
    )

    for consumer in consumers:
        consumer.join(60)
    assert all(not c.is_alive() for c in consumers), "a client hangs after the kill"

    # Restarted within the promise, as a new process, and gives the same greedy text.
    assert ready_after is not None and ready_after <= READY_AFTER_KILL_S, ready_after
    assert service.restarts > old_restarts
    assert service.triton.process.pid != old_pid
    assert _generate_when_possible(service.grpc_url, "grpc") == before_text
    assert _generate_when_possible(service.http_url, "http") == before_text
    # ... and through the OpenAI gateway, which with one replica reaches Triton on its own
    # gRPC channel (not through Envoy): that channel reconnects to the new process.
    assert _complete_when_possible(service.http_url) == before_text

    # Nothing of the killed group left (zombies excluded: nothing here reaps orphans).
    assert gone_after is not None and gone_after <= NOTHING_LEFT_S, gone_after
    assert not _left(stubs)
    # ... nor its shared memory: the regions of the killed server were removed
    assert not {path for path in regions if path.exists()}

    # What clients saw, all reported together. The down state is racy to catch: judged only
    # when a request saw it.
    problems = []
    status, body = down.get("http", (None, ""))
    if status == 503 and not json.loads(body)["error"].startswith(DOWN_BODIES):
        problems.append(f"HTTP request while Triton was down got: {body.strip()}")
    if "grpc" in down and (
        down["grpc"][0] != "UNAVAILABLE" or not any(b in down["grpc"][1] for b in DOWN_BODIES)
    ):
        problems.append(f"gRPC request while Triton was down got: {down['grpc']}")
    # Every streaming client ended (none hangs: joined above) with a clear error, or with
    # its whole text: on a busy machine a client may still be reading a stream the server
    # had finished before the kill. Never a stream that just stops short.
    cut = [c for c in consumers if isinstance(c.error, ClientError) and str(c.error)]
    whole = [
        c
        for c in consumers
        if c.completed and c.result and c.result.num_output_tokens == LONG.max_tokens
    ]
    for consumer in consumers:
        if consumer not in cut and consumer not in whole:
            problems.append(
                f"{consumer.protocol} stream: error {consumer.error!r}, completed "
                f"{consumer.completed}, result {consumer.result}, {len(consumer.pieces)} pieces"
            )
    assert cut, "the kill cut no stream: every one had been generated in full before it"
    assert not problems, "\n".join(problems)


def _stop_triton_until_restarted(service, before_text: str) -> int:
    """SIGSTOP the Triton of ``service`` while long streams run; it must be killed and
    started again, its group gone, every stream ended (cut with an error, or whole), and
    the same greedy text served again. Returns how many streams the stop cut."""
    old_pid = service.triton.process.pid
    old_restarts = service.restarts
    stubs = psutil.Process(old_pid).children(recursive=True)
    consumers = _live_streams(service)
    os.kill(old_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        assert wait_until(lambda: service.restarts > old_restarts, 120), (
            "the stopped tritonserver was not started again"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGCONT)  # if it was not killed: let it stop
    restarted_after = time.monotonic() - stopped_at
    assert service.triton.process.pid != old_pid
    assert wait_until(lambda: not group_alive(old_pid), NOTHING_LEFT_S)
    assert not _left(stubs)
    for consumer in consumers:
        consumer.join(60)
    assert all(not c.is_alive() for c in consumers), "a stream waits on the stopped Triton"
    cut = [c for c in consumers if isinstance(c.error, ClientError) and str(c.error)]
    whole = [c for c in consumers if c.completed and c.result]
    assert len(cut) + len(whole) == len(consumers), [(c.error, c.completed) for c in consumers]
    assert _generate_when_possible(service.grpc_url, "grpc") == before_text
    print(
        f"\nSIGSTOP: started again {restarted_after:.1f} s after, serving again "
        f"{time.monotonic() - stopped_at:.1f} s after; {len(cut)} of {len(consumers)} "
        "streams cut"
    )
    return len(cut)


@pytest.mark.integration
def test_a_silent_triton_or_gateway_is_killed_and_started_again(triton, artifacts, caplog):
    """A tritonserver stopped (SIGSTOP: alive, its sockets open, silent, as a deadlock would
    leave it) is killed by the supervisor once its liveness checks go unanswered, and
    started again: its streams end instead of waiting for the front door's 10-minute idle
    timeout, and the service serves again. The OpenAI gateway alike. A rule faster than
    the default (10 s x 3) keeps the test short; each check still waits its whole timeout."""
    from conftest import service as make_service

    from gpt2_triton.liveness import LivenessRule

    rule = LivenessRule(period_s=0.5, timeout_s=3.0, failures=2)
    repository = triton.triton.model_repository
    logs = artifacts / "logs_liveness"
    with make_service(repository, logs, supervision={"liveness": rule}) as service:
        before_text = _generate_when_possible(service.grpc_url, "grpc")
        # On a busy machine the streams may all be generated in full between the check
        # that they run and the stop: that stop cut nothing, and another is made.
        for _ in range(3):
            cut = _stop_triton_until_restarted(service, before_text)
            if cut:
                break
        assert cut, "in 3 stops, the stop cut no stream: each was generated in full before it"
        assert "tritonserver (replica 0): it answered none of 2 liveness checks" in caplog.text

        gateway_pid = service.gateway.process.pid
        assert _complete_when_possible(service.http_url) == before_text
        os.kill(gateway_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert wait_until(
                lambda: service.gateway.process.pid != gateway_pid and service.gateway.alive(),
                60,
            ), "the stopped OpenAI gateway was not started again"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(gateway_pid, signal.SIGCONT)
        assert _complete_when_possible(service.http_url) == before_text
        print(f"gateway SIGSTOP: serving /v1 again {time.monotonic() - stopped_at:.1f} s after")
        assert "the OpenAI gateway answered none of 2 liveness checks" in caplog.text


@pytest.mark.integration
def test_stopping_the_service_leaves_no_process(triton, artifacts):
    from conftest import service

    server = service(triton.triton.model_repository, artifacts / "logs_stop")
    with server:
        triton_process = psutil.Process(server.triton.process.pid)
        processes = [triton_process, *triton_process.children(recursive=True)]
        processes.append(psutil.Process(server.envoy.process.pid))
        for process in processes:
            process.name()  # read while it runs: psutil keeps it for the messages
        groups = [server.triton.process.pid, server.envoy.process.pid]
        stopping_at = time.monotonic()
    # __exit__ stops it, as Ctrl-C does in `python -m gpt2_triton.serve`
    groups_gone = lambda: not any(group_alive(g) for g in groups)  # noqa: E731
    assert wait_until(groups_gone, stopping_at + NOTHING_LEFT_S - time.monotonic()), _left(
        processes
    )
    assert not _left(processes)


# A leader that starts a child which ignores SIGTERM (as a stub stuck on a dead server does),
# says so, then waits.
LEADER = """
import subprocess, sys, time
child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
subprocess.Popen([sys.executable, "-c", child])
print("started", flush=True)
time.sleep(120)
"""


def test_the_orphans_of_a_killed_leader_are_killed_at_once():
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert leader.stdout.readline().strip() == "started"
        os.kill(leader.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: leader.poll() is not None, 30)
        stop_group(leader, signal.SIGTERM, timeout=60)  # no orderly stop to wait for
        assert not group_alive(leader.pid)
        assert time.monotonic() - killed_at <= NOTHING_LEFT_S
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        leader.wait(10)


# -- the launcher: python -m gpt2_triton.serve ------------------------------------------------
def _serve_command(repository: Path, log_dir: Path, ports: list[int]) -> list[str]:
    http, grpc, metrics, triton_http, triton_grpc, openai = ports
    return [
        sys.executable,
        "-m",
        "gpt2_triton.serve",
        f"--model-repository={repository}",
        f"--log-dir={log_dir}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        f"--triton-http-port={triton_http}",
        f"--triton-grpc-port={triton_grpc}",
        f"--openai-port={openai}",  # the gateway is a child too: it must go with the rest
    ]


@contextmanager
def _launched(repository: Path, tmp_path: Path):
    """``python -m gpt2_triton.serve`` on free ports, ready through its front door; yields
    the launcher and every process it started. Whatever is left is killed on the way out."""
    from conftest import _free_ports

    ports = _free_ports(6)
    output = tmp_path / "serve.out"
    with open(output, "wb") as out:
        launcher = subprocess.Popen(
            _serve_command(repository, tmp_path / "logs", ports),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    started: list[psutil.Process] = []
    try:
        # its own word: it also waits for the OpenAI gateway before it says so
        deadline = time.monotonic() + 300
        while "The service is ready" not in output.read_text():
            if launcher.poll() is not None:
                pytest.fail(f"serve exited ({launcher.returncode}):\n{output.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve not ready after 300 s:\n{output.read_text()}")
            time.sleep(0.2)
        started = psutil.Process(launcher.pid).children(recursive=True)
        names = {p.name() for p in started}
        assert {"envoy", "tritonserver"} <= names, names
        assert any(name.startswith("triton_python") for name in names), names
        yield launcher, started
    finally:
        launcher.kill()
        launcher.wait(30)
        for process in started:
            if _running(process):
                process.kill()


@pytest.mark.integration
def test_sigkill_of_the_launcher_leaves_no_process(triton, tmp_path):
    with _launched(triton.triton.model_repository, tmp_path) as (launcher, started):
        launcher.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.wait(30)
        gone = lambda: not _left(started)  # noqa: E731
        assert wait_until(gone, killed_at + NOTHING_LEFT_S - time.monotonic()), _left(started)


@pytest.mark.integration
def test_sigterm_of_the_launcher_exits_0_and_leaves_no_process(triton, tmp_path):
    with _launched(triton.triton.model_repository, tmp_path) as (launcher, started):
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0, (tmp_path / "serve.out").read_text()
        assert wait_until(lambda: not _left(started), NOTHING_LEFT_S), _left(started)
        assert "The service stopped." in (tmp_path / "serve.out").read_text()


@pytest.mark.integration
def test_a_port_in_use_fails_at_once_naming_it(triton, tmp_path):
    from conftest import _free_ports

    ports = _free_ports(6)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[1]))  # the gRPC front door's port
        taken.listen()
        result = subprocess.run(
            _serve_command(triton.triton.model_repository, tmp_path / "logs", ports),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    assert result.returncode != 0
    assert str(ports[1]) in result.stderr and "in use" in result.stderr, result.stderr
    assert not (tmp_path / "logs" / "tritonserver.log").exists()  # nothing was started


# A Python-backend model beside the service's own, for the tests below. Each load adds a
# line to ``loads`` in its folder; it then kills the tritonserver loading it (its parent)
# with SIGABRT as long as ``crashes_left`` counts above 0, or fails to load when ``fail``
# is there.
_SABOTEUR = """
import os
import resource
import signal
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"])
        with open(folder / "loads", "a") as loads:
            loads.write("load\\n")
        if (folder / "fail").exists():
            raise pb_utils.TritonModelException("this model refuses to load")
        while (folder / "hang").exists():  # stuck loading (the stub's own timeout is 30 s)
            time.sleep(0.1)
        counter = folder / "crashes_left"
        left = int(counter.read_text())
        if left > 0:
            counter.write_text(str(left - 1))
            # Triton raises SIGABRT again for a core dump: none of a test's making
            resource.prlimit(os.getppid(), resource.RLIMIT_CORE, (0, 0))
            os.kill(os.getppid(), signal.SIGABRT)

    def execute(self, requests):
        return []
"""
_SABOTEUR_CONFIG = """
name: "saboteur"
backend: "python"
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


def _repository_with_saboteur(triton, tmp_path: Path, crashes: int, fail: bool) -> Path:
    import shutil

    repository = tmp_path / "repository"
    shutil.copytree(triton.triton.model_repository, repository)
    model = repository / "saboteur"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(_SABOTEUR)
    (model / "config.pbtxt").write_text(_SABOTEUR_CONFIG)
    (model / "crashes_left").write_text(str(crashes))
    if fail:
        (model / "fail").write_text("")
    return repository


@pytest.mark.integration
def test_a_triton_killed_while_starting_is_started_again(triton, tmp_path):
    """2.51's Python backend has aborted while loading models on a busy machine; that
    is no fault of the repository, so the supervisor starts it again (a bounded number of
    times) and the service comes up."""
    from conftest import service

    from gpt2_triton.serve import START_CRASH_RETRIES

    repository = _repository_with_saboteur(triton, tmp_path, START_CRASH_RETRIES, fail=False)
    with service(repository, tmp_path / "logs") as server:
        replica = server.replicas[0]
        assert (replica.start_crashes, replica.restarts) == (START_CRASH_RETRIES,) * 2
        assert (repository / "saboteur" / "crashes_left").read_text() == "0"
        assert _generate_when_possible(server.grpc_url, "grpc")
    assert _loads(repository) == START_CRASH_RETRIES + 1


@pytest.mark.integration
def test_a_restarted_triton_stuck_loading_is_killed_and_started_again(triton, tmp_path, caplog):
    """A restarted Triton listens nowhere until its models load: no liveness check reaches
    one stuck there. Not ready by the restart's deadline, it is killed and started again."""
    from conftest import service

    repository = _repository_with_saboteur(triton, tmp_path, 0, fail=False)
    supervision = {"restart_ready_timeout": 3.0}
    with service(repository, tmp_path / "logs", supervision=supervision) as server:
        hang = repository / "saboteur" / "hang"
        hang.write_text("")
        os.kill(server.triton.process.pid, signal.SIGKILL)
        assert wait_until(lambda: "not ready" in caplog.text, 120), caplog.text
        assert "after its restart; killing it" in caplog.text
        hang.unlink()
        # a load takes longer than 3 s on a busy machine: from now on, the default's room
        server.restart_ready_timeout = 300.0
        assert wait_until(lambda: server.replicas[0].ready_again, 300)
        assert server.restarts >= 2  # after the SIGKILL, and after the deadline
        assert _generate_when_possible(server.grpc_url, "grpc")
    assert _loads(repository) >= 3


def _loads(repository: Path) -> int:
    """How many times a tritonserver began to load the saboteur."""
    return len((repository / "saboteur" / "loads").read_text().splitlines())


@pytest.mark.integration
def test_a_triton_killed_while_starting_once_too_often_fails_with_the_cause(triton, tmp_path):
    from conftest import service

    from gpt2_triton.serve import START_CRASH_RETRIES
    from gpt2_triton.triton_server import ServerError

    repository = _repository_with_saboteur(triton, tmp_path, START_CRASH_RETRIES + 1, fail=False)
    with pytest.raises(ServerError, match=r"replica 0\) was killed by SIGABRT before it was"):
        with service(repository, tmp_path / "logs"):
            pass
    assert _loads(repository) == START_CRASH_RETRIES + 1  # no start after the last crash


@pytest.mark.integration
def test_a_repository_that_fails_to_load_fails_at_once_without_a_restart(triton, tmp_path):
    """A model that fails to load would fail the same way again: no restart."""
    from conftest import service

    from gpt2_triton.triton_server import ServerError

    repository = _repository_with_saboteur(triton, tmp_path, 0, fail=True)
    with pytest.raises(ServerError, match=r"replica 0\) exited \(code 1\) before it was"):
        with service(repository, tmp_path / "logs"):
            pass
    assert "this model refuses to load" in (tmp_path / "logs" / "tritonserver.log").read_text()
    assert _loads(repository) == 1  # started once
