"""Drain a pod before Kubernetes stops it: the ``preStop`` hook of ``deploy/k8s/``.

``triton``: a replica being removed (scale-down, rollout, node drain) is marked not ready,
so it leaves the headless Service's DNS answer and the front door sends it no new request.
This waits until the generations it already holds are over, read from its own gauges
(``gpt2_active_sequences`` + ``gpt2_waiting_requests`` on Triton's metrics port): the
SIGTERM the kubelet sends after the hook then cuts no live stream.

``envoy``: the front door's own pods. Its listeners drain first (HTTP/1 answers carry
``Connection: close``, HTTP/2 connections get GOAWAY, so clients reconnect through another
pod), then it waits until no request is in flight.

Both wait for a quiet window, not for one zero: a request routed just before the pod left
the rotation can still arrive for a few seconds (DNS TTL, Envoy's refresh). A read that
fails in any way (late, trickling, cut short, not text, not the gauges) counts as
"unknown", never as idle: the wait goes on, since returning early lets the kubelet's
SIGTERM cut streams. Only a refused connection means the server is gone. Everything,
reads included, ends by ``--timeout``, which the manifests keep below
``terminationGracePeriodSeconds`` with ``--read-timeout`` to spare.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable

from gpt2_triton import names
from gpt2_triton.triton_server import Ports

log = logging.getLogger("gpt2_triton.drain")

IN_FLIGHT_METRICS = (names.ACTIVE_SEQUENCES_METRIC, names.WAITING_REQUESTS_METRIC)
DEFAULT_METRICS_URL = f"http://127.0.0.1:{Ports().metrics}/metrics"
# One read of the gauges, at most: a replica busy with 16 streams answers in milliseconds,
# so a read this late is a stuck server, and the next read is a new chance.
READ_TIMEOUT_S = 5.0

# Called with the seconds the read may take. None: the server is gone (nothing left to
# drain); an exception: unknown, the wait goes on.
InFlight = Callable[[float], float | None]
# name, optional {labels} (label values may hold spaces), value; comments never match
_SAMPLE = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(?P<value>\S+)")


def metric_sums(text: str, metric_names: Iterable[str]) -> dict[str, float]:
    """The sum of every sample of each named metric found in Prometheus' text format
    (a metric without a sample is absent, not 0)."""
    wanted = set(metric_names)
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] in wanted:
            sums[match["name"]] = sums.get(match["name"], 0.0) + float(match["value"])
    return sums


def metric_sum(text: str, metric_names: Iterable[str]) -> float:
    """The sum of every sample of the named metrics in Prometheus' text format."""
    return sum(metric_sums(text, metric_names).values())


class _DeadlineSocket(socket.socket):
    """A socket whose every wait ends by one deadline. A per-call timeout alone (what
    urllib gives) restarts at each byte, so a server that trickles one byte a second
    holds the read for ever."""

    deadline = math.inf

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the read's deadline passed")
        self.settimeout(left)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return super().recv(bufsize, flags)

    def sendall(self, data, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over TCP, or over a unix socket (Envoy's admin), within one deadline from
    the connect to the last byte of the body."""

    def __init__(self, host: str, port: int | None, deadline: float, unix_path: str = ""):
        super().__init__(host, port)
        self.deadline = deadline
        self.unix_path = unix_path

    def connect(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the read's deadline passed before it connected")
        if self.unix_path:
            sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(left)
                sock.connect(self.unix_path)
            except BaseException:
                sock.close()
                raise
        else:
            # the name is resolved without a timeout: the manifests give an address
            raw = socket.create_connection((self.host, self.port), left)
            sock = _DeadlineSocket(fileno=raw.detach())
        sock.deadline = self.deadline
        self.sock = sock


def _get(connection: _DeadlineHTTPConnection, method: str, path: str) -> tuple[int, bytes]:
    try:
        connection.request(method, path)
        response = connection.getresponse()
        # read() without a size: a body shorter than its Content-Length (or a chunked one
        # cut off) raises IncompleteRead, where read(n) would return the part silently
        return response.status, response.read()
    finally:
        connection.close()


def triton_in_flight(metrics_url: str, timeout: float = READ_TIMEOUT_S) -> float | None:
    """Sequences running plus requests queued on the replica; None if nothing listens."""
    url = urllib.parse.urlsplit(metrics_url)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    connection = _DeadlineHTTPConnection(url.hostname, url.port, time.monotonic() + timeout)
    try:
        status, body = _get(connection, "GET", path)
    except ConnectionRefusedError:
        return None
    if status != 200:
        raise OSError(f"metrics at {metrics_url}: HTTP {status} {body[:200]!r}")
    sums = metric_sums(body.decode(), IN_FLIGHT_METRICS)
    # Triton opens its metrics port once the model has loaded, and the model publishes both
    # gauges from then on (0 included): a page without them is someone else's, or was cut
    # short (a body without a length ends where the connection does), not an idle replica.
    missing = [name for name in IN_FLIGHT_METRICS if name not in sums]
    if missing:
        raise ValueError(f"metrics at {metrics_url}: no {', '.join(missing)}")
    return sum(sums.values())


def _envoy_admin(admin_socket: str, method: str, path: str, timeout: float) -> bytes:
    connection = _DeadlineHTTPConnection(
        "localhost", None, time.monotonic() + timeout, unix_path=admin_socket
    )
    status, body = _get(connection, method, path)
    if status != 200:
        raise OSError(f"envoy admin {method} {path}: HTTP {status} {body[:200]!r}")
    return body


def envoy_in_flight(admin_socket: str, timeout: float = READ_TIMEOUT_S) -> float | None:
    """Requests in flight on the front door's listeners (the admin interface's own, such
    as this very query, excluded)."""
    try:
        body = _envoy_admin(
            admin_socket, "GET", "/stats?format=json&filter=downstream_rq_active", timeout
        )
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    total = 0.0
    for stat in json.loads(body).get("stats", []):
        name = stat["name"]
        if name.endswith(".downstream_rq_active") and not name.startswith("http.admin."):
            total += stat.get("value", 0)
    return total


def envoy_drain_listeners(admin_socket: str, timeout: float = READ_TIMEOUT_S) -> bool:
    """Tell clients to go elsewhere (Connection: close, GOAWAY); False if Envoy is gone.

    Any other failure is logged and the drain goes on: what is in flight still deserves
    its wait, whether or not Envoy took the hint (a crash here would end the hook, and the
    kubelet's SIGTERM would cut every stream through this pod)."""
    try:
        _envoy_admin(admin_socket, "POST", "/drain_listeners?graceful", timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except Exception as exc:  # any other failure: see the docstring
        log.warning(
            "envoy did not drain its listeners (%s: %s): waiting for what is in flight anyway",
            type(exc).__name__,
            exc,
        )
    return True


def wait_until_idle(
    in_flight: InFlight,
    timeout_s: float,
    quiet_s: float,
    interval_s: float = 1.0,
    read_timeout_s: float = READ_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """True once nothing was in flight for ``quiet_s`` seconds in a row (or the server is
    gone); False when ``timeout_s`` ran out first. Reads and sleeps included, it returns
    by ``timeout_s``: each read may take ``read_timeout_s`` at most, and never more than
    the time left."""
    start = clock()
    deadline = start + timeout_s
    idle_since: float | None = None
    last_report = start
    count: float | None = math.nan
    while (left := deadline - clock()) > 0:
        try:
            count = in_flight(min(read_timeout_s, left))
        except Exception as exc:  # any failure of a read is "unknown" (see the module)
            log.warning(
                "cannot read what is in flight (%s: %s): waiting on", type(exc).__name__, exc
            )
            count = math.nan  # unknown: not idle
        now = clock()
        if count is None:
            log.info("the server is gone: nothing left to drain")
            return True
        if count == 0:
            idle_since = now if idle_since is None else idle_since
            if now - idle_since >= quiet_s:
                log.info("drained after %.0f s", now - start)
                return True
        else:
            idle_since = None
            if now - last_report >= 10:
                log.info("%s in flight, %.0f s left", count, deadline - now)
                last_report = now
        if (left := deadline - now) > 0:
            sleep(min(interval_s, left))
    what = "an unknown number" if count is not None and math.isnan(count) else count
    log.warning("still %s in flight after %.0f s: stopping anyway", what, timeout_s)
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_triton.drain", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=260.0,
        help="seconds, at most, for the whole drain (reads and Envoy's drain call included)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=15.0,
        help="seconds with nothing in flight before the pod may stop (covers the DNS TTL "
        "and Envoy's DNS refresh, during which new requests may still arrive)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads")
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=READ_TIMEOUT_S,
        help="seconds one read may take, from the connect to the body's last byte",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    triton = kinds.add_parser("triton", help="wait until the gpt2 model holds no request")
    triton.add_argument("--metrics-url", default=DEFAULT_METRICS_URL)
    envoy = kinds.add_parser("envoy", help="drain the front door's listeners, then wait")
    envoy.add_argument("--admin-socket", required=True, help="Envoy's admin unix socket")
    args = parser.parse_args(argv)
    if args.read_timeout <= 0:
        parser.error("--read-timeout: more than 0 s (every read would fail: never drained)")
    if args.kind == "triton":
        # checked here: a URL that can never be read would only show as minutes of "unknown"
        url = urllib.parse.urlsplit(args.metrics_url)
        try:
            port = url.port  # raises on a port that is no number or out of range
        except ValueError as exc:
            parser.error(f"--metrics-url: {exc}")
        if url.scheme != "http" or not url.hostname or port == 0:
            parser.error(f"--metrics-url: an http://host:port/path URL, not {args.metrics_url!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drain: %(message)s")
    started = time.monotonic()

    if args.kind == "triton":

        def in_flight(timeout: float) -> float | None:
            return triton_in_flight(args.metrics_url, timeout)
    else:
        # the drain call spends the same budget as the wait that follows it
        if not envoy_drain_listeners(args.admin_socket, min(args.read_timeout, args.timeout)):
            log.info("envoy is gone: nothing left to drain")
            return 0

        def in_flight(timeout: float) -> float | None:
            return envoy_in_flight(args.admin_socket, timeout)

    left = args.timeout - (time.monotonic() - started)
    drained = wait_until_idle(in_flight, left, args.quiet, args.interval, args.read_timeout)
    return 0 if drained else 1


if __name__ == "__main__":
    raise SystemExit(main())
