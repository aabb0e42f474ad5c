"""The service: Triton behind the Envoy front door, restarted when it dies.

    python -m gpt2_triton.serve --model-repository model_repository

Used by ``make serve``, ``make demo`` and the integration tests' session fixture. Clients
reach Envoy only (HTTP 8000, gRPC 8001); Triton listens on loopback ports behind it, and
its metrics port (8002) stays its own. A supervisor thread restarts a Triton that exits
(with a backoff, logged) and ends its whole process group first, so no backend stub
outlives it; Envoy answers 503 with a plain reason meanwhile.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from gpt2_triton import logs
from gpt2_triton.checkpoint import artifacts_root
from gpt2_triton.fingerprint import repository_drift
from gpt2_triton.front_door import EnvoyProxy, FrontDoorError, FrontDoorSettings
from gpt2_triton.liveness import LIVENESS, LivenessRule, SilenceWatch
from gpt2_triton.openai_gateway import GatewayProcess
from gpt2_triton.process import signal_group
from gpt2_triton.triton_server import Ports, ServerError, TritonServer, answers_200

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
# A tritonserver that crashes while starting (2.51's Python backend has aborted on a
# boost::interprocess::lock_exception while loading models on a busy machine) is started
# again, this many times, after the usual backoff. One that exits with a code (a model that
# fails to load, a bad flag) would fail the same way again, and one killed from outside
# (SIGKILL: the OOM killer, an operator) should not be loaded again at once: not retried.
START_CRASH_RETRIES = 2
START_CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)
STABLE_AFTER_S = 60.0  # up this long: the next crash starts the backoff over


@dataclass
class Backoff:
    """How long to wait before a supervised process is started again: the wait doubles
    with each exit, up to ``BACKOFF_MAX_S``, and starts over once the process has stayed
    up ``STABLE_AFTER_S`` (a crash a day must not inherit last week's 30 s)."""

    next_s: float = BACKOFF_FIRST_S

    def wait(self, up_for_s: float | None = None) -> float:
        """The wait before the next start; ``up_for_s``: how long the process that just
        exited had been up (None: it never came up, so it earns no fresh start)."""
        if up_for_s is not None and up_for_s > STABLE_AFTER_S:
            self.next_s = BACKOFF_FIRST_S
        wait, self.next_s = self.next_s, min(self.next_s * 2, BACKOFF_MAX_S)
        return wait


def ports_in_use(ports: list[int], host: str = "127.0.0.1") -> list[int]:
    busy = []
    for port in ports:
        with socket.socket() as s:
            # as the servers bind: connections of a server just stopped (TIME_WAIT) do not
            # hold the port, a listening one does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                s.listen()
            except OSError:
                busy.append(port)
    return busy


REPLICA_PORT_STRIDE = 10  # replica i: Triton's ports (and metrics) + 10 * i
# How long a Triton may take to be ready, at the start and after each restart (its
# models load first; serve --timeout)
READY_TIMEOUT_S = 300.0
MAX_REPLICAS = 32  # on one machine; more is a typo, not a deployment


@dataclass
class Replica:
    """One supervised ``tritonserver`` and where its restart stands."""

    index: int
    server: TritonServer
    liveness: SilenceWatch
    ever_ready: bool = False  # one that exits before it was ever ready is not restarted
    start_crashes: int = 0  # killed by a signal before it was ever ready (retried)
    failure: str = ""  # why the supervisor gave up on it ("" while it has not)
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    up_since: float = 0.0
    restart_due: float | None = None  # when a dead one is started again
    ready_again: bool = True  # since its last restart (False until then seen ready)
    killed_why: str = ""  # why the supervisor killed it, for the restart's log line

    def alive(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None


class Service:
    """Envoy + supervised ``tritonserver`` replicas; ``http_url`` / ``grpc_url`` are the
    front door."""

    def __init__(
        self,
        model_repository: Path,
        front: FrontDoorSettings | None = None,
        metrics_port: int = 8002,
        log_dir: Path = Path("artifacts/logs"),
        extra_triton_args: tuple[str, ...] = (),
        openai: bool = True,
        replicas: int = 1,
        replica_ports: list[Ports] | None = None,
        liveness: LivenessRule | None = LIVENESS,  # None: no liveness checks
        restart_ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        front = front or FrontDoorSettings()
        if replica_ports is None:
            if not 1 <= replicas <= MAX_REPLICAS:
                raise ServerError(f"replicas must be 1 to {MAX_REPLICAS} (got {replicas})")
            stride = REPLICA_PORT_STRIDE
            replica_ports = [
                Ports(
                    front.triton_http_port + stride * i,
                    front.triton_grpc_port + stride * i,
                    metrics_port + stride * i,
                )
                for i in range(replicas)
            ]
        _check_ports(front, replica_ports, openai)
        # the front door balances over exactly the replicas started here
        self.front = front = replace(
            front, replica_ports=tuple((ports.http, ports.grpc) for ports in replica_ports)
        )
        self.log_dir = Path(log_dir)
        self.liveness = liveness
        # a restarted Triton not ready by then (stuck loading, listening nowhere, where no
        # liveness check reaches it) is killed and started again, as at any exit
        self.restart_ready_timeout = restart_ready_timeout
        self.replicas = [
            Replica(
                i,
                TritonServer(
                    model_repository,
                    ports,
                    log_file=self.log_dir
                    / ("tritonserver.log" if i == 0 else f"tritonserver-{i}.log"),
                    extra_args=(*front.triton_restrictions(), *extra_triton_args),
                ),
                SilenceWatch(
                    f"http://127.0.0.1:{ports.http}/v2/health/live", liveness, f"liveness-{i}"
                ),
            )
            for i, ports in enumerate(replica_ports)
        ]
        self.envoy = EnvoyProxy(front, self.log_dir / "envoy.yaml", self.log_dir / "envoy.log")
        # The OpenAI-compatible API, behind the same door at /v1/ (without it, /v1/ is 503):
        # callers' keys, sizes and limits are checked there, on the way in. With several
        # replicas it calls Triton back through the door, so that it is balanced and fails
        # over alike; with one there is nothing to balance, and it calls that Triton on its
        # loopback port: a second pass through Envoy per token costs what the first does
        # (0.7-4.4% of tokens/s at 16 streams across runs, docs/RELIABILITY.md).
        self.gateway = (
            GatewayProcess(
                self.replicas[0].server.grpc_url if len(self.replicas) == 1 else self.grpc_url,
                front.gateway_port,
                self.log_dir / "openai.log",
                api_key=front.api_key,
            )
            if openai
            else None
        )
        self._gateway_liveness = (
            SilenceWatch(f"http://{self.gateway.url}/health/live", liveness, "liveness-openai")
            if self.gateway
            else None
        )
        self._gateway_backoff = Backoff()
        self._gateway_up_since = 0.0
        self._gateway_start_failed = False
        self._stopping = threading.Event()
        self._started = threading.Event()  # the first Triton start was attempted
        self._supervisor: threading.Thread | None = None
        self._start_error: BaseException | None = None

    @property
    def triton(self) -> TritonServer:
        """The first replica (the only one, by default)."""
        return self.replicas[0].server

    @property
    def restarts(self) -> int:
        return sum(replica.restarts for replica in self.replicas)

    # -- addresses ----------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.front.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.front.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return self.triton.metrics_url

    @property
    def _client_host(self) -> str:
        host = self.front.host
        if host in ("0.0.0.0", "::"):
            return "127.0.0.1"  # a wildcard listens on loopback too
        return f"[{host}]" if ":" in host else host

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> Service:
        ports = [
            *([self.front.gateway_port] if self.gateway else []),
            self.front.http_port,
            self.front.grpc_port,
        ]
        for replica in self.replicas:
            ports += [replica.server.ports.http, replica.server.ports.grpc]
            ports.append(replica.server.ports.metrics)
        busy = ports_in_use(ports)
        if busy:
            raise ServerError(
                f"port(s) {', '.join(map(str, busy))} already in use (another server still "
                "running?): stop it or choose other ports"
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.envoy.start()
        self.envoy.wait_live()
        # Triton is started (and restarted) by the supervisor thread: a child started with
        # die_with_parent ends with the thread that started it, and this one lives as long
        # as the service does.
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        self._started.wait()
        if self._start_error:
            self.envoy.stop()
            raise self._start_error
        return self

    def wait_ready(
        self, timeout: float = READY_TIMEOUT_S, stop: threading.Event | None = None
    ) -> bool:
        """Until every replica is ready and the front door sends traffic to each (True), or
        ``stop`` is set (False: Ctrl-C while starting)."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            for replica in self.replicas:
                if replica.failure:  # the supervisor gave up on it (_look_after)
                    raise ServerError(
                        f"tritonserver (replica {replica.index}) {replica.failure} before it "
                        "was ready" + replica.server.log_tail()
                    )
            if not self.supervising():
                raise ServerError("the supervisor of the tritonserver replicas stopped")
            if not self.envoy.alive():
                raise FrontDoorError(f"envoy exited; see {self.envoy.log_file}")
            if (
                all(r.server.answers_ready() for r in self.replicas)
                and answers_200(url)
                and self.replicas_in_rotation() == len(self.replicas)
                and (self.gateway is None or answers_200(f"http://{self.gateway.url}/health"))
            ):
                # seen ready here, so an exit from now on is a restart's business, even if
                # the supervisor's own probe had not seen it ready yet
                for replica in self.replicas:
                    replica.ever_ready = True
                return True
            time.sleep(0.2)
        raise ServerError(f"the service is not ready after {timeout:.0f} s: " + self._not_ready())

    def _not_ready(self) -> str:
        """Which part is not ready, with the replicas' own log tails."""
        parts = []
        in_rotation = {}
        try:
            for cluster in ("triton_http", "triton_grpc"):
                for address, host in self.envoy.hosts().get(cluster, {}).items():
                    in_rotation[address] = in_rotation.get(address, True) and host.healthy
        except (OSError, FrontDoorError, ValueError):
            pass
        for replica in self.replicas:
            server = replica.server
            if not server.answers_ready():
                parts.append(f"replica {replica.index} not ready{server.log_tail()}")
            elif not in_rotation.get(server.http_url, False):
                parts.append(f"replica {replica.index} ready but not in the front door's rotation")
        if self.gateway is not None and not answers_200(f"http://{self.gateway.url}/health"):
            parts.append(f"the OpenAI gateway is not ready (log: {self.gateway.log_file})")
        return "; ".join(parts) or "the front door does not answer ready"

    def replicas_in_rotation(self) -> int:
        """How many replicas the front door now sends requests to (both clusters)."""
        hosts = self.envoy.hosts()
        return min(
            sum(host.healthy for host in hosts.get(cluster, {}).values())
            for cluster in ("triton_http", "triton_grpc")
        )

    def supervising(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    def triton_alive(self) -> bool:
        return all(replica.alive() for replica in self.replicas)

    def stop(self) -> None:
        # The front door first: its connections to Triton would otherwise hold Triton's
        # shutdown for its whole exit timeout (30 s), and the models would not unload in order.
        self.envoy.stop()
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()

    def __enter__(self) -> Service:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the supervisor thread ----------------------------------------------------------
    def _supervise(self) -> None:
        try:
            for replica in self.replicas:
                replica.server.start()
                replica.up_since = time.monotonic()
            if self.gateway:
                self.gateway.start()
                self._gateway_up_since = time.monotonic()
        except BaseException as exc:  # handed to start(), which raises it
            self._start_error = exc
            for replica in self.replicas:
                replica.server.stop()
            return
        finally:
            self._started.set()
        watches = [r.liveness for r in self.replicas]
        watches += [self._gateway_liveness] if self._gateway_liveness else []
        for watch in watches:
            watch.start()
        try:
            self._watch()
        finally:
            for watch in watches:
                watch.stop()
            if self.gateway:
                self.gateway.stop()
            for replica in self.replicas:
                replica.server.stop()

    def _watch(self) -> None:
        gateway_due: float | None = None  # when a dead gateway is started again
        while not self._stopping.wait(0.2):
            if self.gateway and self.gateway.alive() and self._gateway_liveness.silent():
                _kill_group(
                    self.gateway.process,
                    self._gateway_liveness,
                    f"the OpenAI gateway answered none of {self.liveness.describe()}: "
                    f"killing it (log: {self.gateway.log_file})",
                )
            if self.gateway and not self.gateway.alive():
                if gateway_due is None:  # it has just exited
                    gateway_due = time.monotonic() + self._gateway_wait()
                elif time.monotonic() >= gateway_due:
                    gateway_due = None
                    self._restart_gateway()
            for replica in self.replicas:
                if replica.failure:
                    continue
                try:
                    self._look_after(replica)
                except Exception:  # one replica's trouble must not end the others' care
                    log.exception("supervising replica %d failed; trying again", replica.index)

    def _look_after(self, replica: Replica) -> None:
        """One supervisor tick for one replica: note it ready, or restart it once its
        backoff is over. The others keep serving meanwhile (Envoy ejected this one)."""
        server = replica.server
        if replica.alive():
            if not replica.ever_ready:  # the first start: wait_ready's timeout is the limit
                replica.ever_ready = server.answers_ready()
            elif not replica.ready_again:
                replica.ready_again = server.answers_ready()
                waited = time.monotonic() - replica.up_since
                if not replica.ready_again and waited > self.restart_ready_timeout:
                    self._kill(replica, f"not ready {waited:.0f} s after its restart")
            elif replica.liveness.silent():
                self._kill(replica, f"it answered none of {self.liveness.describe()}")
            return
        now = time.monotonic()
        if replica.restart_due is None:  # it has just exited
            code = server.process.returncode
            server.stop()  # whatever of its process group is left (stubs), its /dev/shm
            crashed = code is not None and -code in START_CRASH_SIGNALS
            if not replica.ever_ready and crashed:
                if replica.start_crashes < START_CRASH_RETRIES:
                    replica.start_crashes += 1
                    wait = replica.backoff.wait()
                    log.warning(
                        "tritonserver (replica %d) %s while starting; starting it again in "
                        "%.0f s (%d of %d; log: %s)",
                        replica.index,
                        _describe_exit(code),
                        wait,
                        replica.start_crashes,
                        START_CRASH_RETRIES,
                        server.log_file,
                    )
                    replica.restart_due = now + wait
                    return
            if not replica.ever_ready:
                replica.failure = (
                    f"was {_describe_exit(code)}"
                    if code is not None and code < 0
                    else f"exited (code {code})"
                )
                log.error(
                    "tritonserver (replica %d) %s before it was ready: not restarting it",
                    replica.index,
                    replica.failure,
                )
                return
            wait = replica.backoff.wait(up_for_s=now - replica.up_since)
            log.warning(
                "tritonserver (replica %d) exited (%s); restarting in %.0f s (log: %s)",
                replica.index,
                f"killed: {replica.killed_why}" if replica.killed_why else _describe_exit(code),
                wait,
                server.log_file,
            )
            replica.restart_due = now + wait
            return
        if now < replica.restart_due:
            return
        replica.restart_due = None
        replica.killed_why = ""
        replica.ready_again = False
        replica.liveness.reset()
        try:
            server.start()
        except Exception:
            log.exception("could not restart tritonserver (replica %d)", replica.index)
            if not replica.ever_ready:  # starting it is what fails: wait_ready reports it
                replica.failure = "could not be started again"
                return
            replica.restart_due = now + replica.backoff.wait()
            return
        replica.restarts += 1
        replica.up_since = now

    def _kill(self, replica: Replica, why: str) -> None:
        """Kill a replica that is alive but of no use (stopped, deadlocked, stuck loading);
        its exit is then handled like any other, and it is started again."""
        _kill_group(
            replica.server.process,
            replica.liveness,
            f"tritonserver (replica {replica.index}): {why}; killing it "
            f"(log: {replica.server.log_file})",
        )
        replica.killed_why = why

    def _gateway_wait(self) -> float:
        """The backoff before a gateway that has just exited is started again (logged)."""
        wait = self._gateway_backoff.wait(up_for_s=time.monotonic() - self._gateway_up_since)
        what = (
            "could not be started"
            if self._gateway_start_failed
            else f"exited ({_describe_exit(self.gateway.process.returncode)})"
        )
        log.warning(
            "the OpenAI gateway %s; restarting it in %.0f s (log: %s)",
            what,
            wait,
            self.gateway.log_file,
        )
        return wait

    def _restart_gateway(self) -> None:
        self._gateway_start_failed = False
        try:
            self.gateway.stop()
            self.gateway.start()
            self._gateway_liveness.reset()
        except Exception:  # the supervisor must outlive it: Triton is still served
            log.exception("could not restart the OpenAI gateway")
            self._gateway_start_failed = True  # (its process is still the one that exited)
        self._gateway_up_since = time.monotonic()


def _kill_group(process, liveness: SilenceWatch, message: str) -> None:
    """Kill a supervised process that is alive but of no use, its whole group at once
    (SIGTERM would wait on a stopped or deadlocked one), counting its checks anew."""
    log.error(message)
    signal_group(process.pid, signal.SIGKILL)
    liveness.reset()


def _check_ports(front: FrontDoorSettings, replicas: list[Ports], openai: bool) -> None:
    """Every port this service listens on: in range and used once. Triton's metrics server
    answers 200 to any path, so a metrics port on another replica's HTTP port would pass
    the readiness checks and serve wrong answers."""
    named = [("front door HTTP", front.http_port), ("front door gRPC", front.grpc_port)]
    if openai:
        named.append(("OpenAI gateway", front.gateway_port))
    for i, ports in enumerate(replicas):
        named += [
            (f"replica {i} HTTP", ports.http),
            (f"replica {i} gRPC", ports.grpc),
            (f"replica {i} metrics", ports.metrics),
        ]
    bad = [f"{name} {port}" for name, port in named if not 1 <= port <= 65535]
    if bad:
        raise ServerError(f"port out of range (1-65535): {', '.join(bad[:4])}")
    seen: dict[int, str] = {}
    for name, port in named:
        if port in seen:
            raise ServerError(f"port {port} is both the {seen[port]} and the {name} port")
        seen[port] = name


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name in the enum
            return f"killed by signal {-code} ({signal.strsignal(-code) or 'unknown'})"
    return f"code {code}"


def _settings_from_args(args: argparse.Namespace) -> FrontDoorSettings:
    return replace(
        FrontDoorSettings(
            host=args.host,
            api_key=os.environ.get("API_KEY", ""),
            admin_key=os.environ.get("ADMIN_KEY", ""),
        ),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        gateway_port=args.openai_port,
        triton_http_port=args.triton_http_port,
        triton_grpc_port=args.triton_grpc_port,
        max_request_bytes=args.max_request_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        requests_per_second=args.requests_per_second,
        triton_statistics_open=args.open_triton_statistics,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve the model repository: Triton behind the Envoy front door",
        epilog="API_KEY and ADMIN_KEY come from the environment (never the command line).",
    )
    defaults = FrontDoorSettings()
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--host",
        default=os.environ.get("HOST", "127.0.0.1"),
        help="address the front door binds (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--http-port", type=int, default=defaults.http_port)
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's, on loopback")
    parser.add_argument("--triton-http-port", type=int, default=defaults.triton_http_port)
    parser.add_argument("--triton-grpc-port", type=int, default=defaults.triton_grpc_port)
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help=f"Triton replicas behind the front door; replica i on each port + "
        f"{REPLICA_PORT_STRIDE} * i",
    )
    parser.add_argument(
        "--openai-port", type=int, default=defaults.gateway_port, help="the gateway's, loopback"
    )
    parser.add_argument(
        "--no-openai", action="store_true", help="leave out the OpenAI-compatible API (/v1/)"
    )
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes)
    parser.add_argument(
        "--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests
    )
    parser.add_argument("--requests-per-second", type=int, default=defaults.requests_per_second)
    parser.add_argument(
        "--open-triton-statistics",
        action="store_true",
        help="leave Triton's statistics API open on its loopback ports, for perf_analyzer "
        "and genai-perf (make bench-pa, bench-genai); the front door still needs the admin key",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=artifacts_root() / "logs",
        help=f"default: $GPT2_TRITON_ARTIFACTS/logs, or {artifacts_root() / 'logs'}",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=READY_TIMEOUT_S,
        help="seconds to become ready, at the start and after each restart",
    )
    parser.add_argument(
        "--no-liveness",
        action="store_true",
        help="no liveness checks: a silent Triton is not killed (to attach a debugger to it)",
    )
    parser.add_argument(
        "--allow-stale",
        action="store_true",
        help="serve a repository whose checkpoint changed since make repo (its old weights)",
    )
    args = parser.parse_args(argv)
    logs.setup()
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    drift = repository_drift(args.model_repository)
    if drift and not args.allow_stale:  # its files are links to, or copies of, the old export
        print(
            f"error: {args.model_repository} serves weights made before the checkpoint "
            f"changed ({drift}): render it again with make repo (MODEL=..., ENGINE=...), "
            "or serve the old weights with ALLOW_STALE=1 (--allow-stale)",
            file=sys.stderr,
        )
        return 2
    if drift:
        log.warning("serving the weights of before the checkpoint changed: %s", drift)
    try:
        service = Service(
            args.model_repository,
            _settings_from_args(args),
            args.metrics_port,
            args.log_dir,
            openai=not args.no_openai,
            replicas=args.replicas,
            liveness=None if args.no_liveness else LIVENESS,
            restart_ready_timeout=args.timeout,  # a restart has the first start's time
        )
        service.start()
    except (ServerError, FrontDoorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        ready = service.wait_ready(args.timeout, stop=stopping)
    except (ServerError, FrontDoorError) as exc:
        service.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not ready:  # Ctrl-C or SIGTERM while starting
        service.stop()
        print("The service stopped before it was ready.")
        return 0
    print(
        f"The service is ready (logs: {args.log_dir})\n"
        f"  HTTP     http://{service.http_url}  (POST /v2/models/gpt2/generate, /generate_stream)\n"
        f"  gRPC     {service.grpc_url}\n"
        + (
            f"  OpenAI   http://{service.http_url}/v1  (completions, chat/completions, models)\n"
            if service.gateway
            else ""
        )
        + "".join(
            f"  Triton replica {r.index}: {r.server.http_url} / {r.server.grpc_url}, metrics "
            f"{r.server.metrics_url} (loopback)\n"
            for r in service.replicas
        )
        + "Ctrl-C stops it.",
        flush=True,
    )
    while not stopping.wait(0.5):
        if not service.envoy.alive():
            print(f"error: envoy exited; see {service.envoy.log_file}", file=sys.stderr)
            service.stop()
            return 1
        if not service.supervising():
            print("error: the supervisor thread ended; stopping", file=sys.stderr)
            service.stop()
            return 1
    service.stop()
    print("The service stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
