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
the rotation can still arrive for a few seconds (DNS TTL, Envoy's refresh). Both give up
after ``--timeout``, which the manifests keep below ``terminationGracePeriodSeconds``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

from gpt2_triton import names
from gpt2_triton.front_door import _UnixHTTPConnection
from gpt2_triton.triton_server import Ports

log = logging.getLogger("gpt2_triton.drain")

IN_FLIGHT_METRICS = (names.ACTIVE_SEQUENCES_METRIC, names.WAITING_REQUESTS_METRIC)
DEFAULT_METRICS_URL = f"http://127.0.0.1:{Ports().metrics}/metrics"

# None: the server is gone (nothing left to drain). An OSError other than a refused
# connection means "unknown" (a busy server that answered late): the wait goes on.
InFlight = Callable[[], float | None]
# name, optional {labels} (label values may hold spaces), value; comments never match
_SAMPLE = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(?P<value>\S+)")


def metric_sum(text: str, metric_names: Iterable[str]) -> float:
    """The sum of every sample of the named metrics in Prometheus' text format."""
    wanted = set(metric_names)
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] in wanted:
            total += float(match["value"])
    return total


def triton_in_flight(metrics_url: str, timeout: float = 5.0) -> float | None:
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return None
        raise OSError(f"metrics at {metrics_url}: {exc.reason}") from exc
    except ConnectionRefusedError:
        return None
    return metric_sum(text, IN_FLIGHT_METRICS)


def _envoy_admin(admin_socket: str, method: str, path: str, timeout: float = 5.0) -> bytes:
    connection = _UnixHTTPConnection(admin_socket, timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"envoy admin {method} {path}: {response.status} {body[:200]!r}")
        return body
    finally:
        connection.close()


def envoy_in_flight(admin_socket: str) -> float | None:
    """Requests in flight on the front door's listeners (the admin interface's own, such
    as this very query, excluded)."""
    try:
        body = _envoy_admin(admin_socket, "GET", "/stats?format=json&filter=downstream_rq_active")
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    total = 0.0
    for stat in json.loads(body).get("stats", []):
        name = stat["name"]
        if name.endswith(".downstream_rq_active") and not name.startswith("http.admin."):
            total += stat.get("value", 0)
    return total


def envoy_drain_listeners(admin_socket: str) -> bool:
    """Tell clients to go elsewhere (Connection: close, GOAWAY); False if Envoy is gone."""
    try:
        _envoy_admin(admin_socket, "POST", "/drain_listeners?graceful")
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    return True


def wait_until_idle(
    in_flight: InFlight,
    timeout_s: float,
    quiet_s: float,
    interval_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """True once nothing was in flight for ``quiet_s`` seconds in a row (or the server is
    gone); False when ``timeout_s`` ran out first."""
    start = clock()
    idle_since: float | None = None
    last_report = start
    while True:
        now = clock()
        try:
            count = in_flight()
        except OSError as exc:
            log.warning("cannot read what is in flight (%s): waiting on", exc)
            count = float("nan")  # unknown: not idle
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
                log.info("%s in flight, %.0f s left", count, timeout_s - (now - start))
                last_report = now
        if now - start >= timeout_s:
            log.warning("still %s in flight after %.0f s: stopping anyway", count, timeout_s)
            return False
        sleep(interval_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_triton.drain", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--timeout", type=float, default=270.0, help="seconds, at most")
    parser.add_argument(
        "--quiet",
        type=float,
        default=15.0,
        help="seconds with nothing in flight before the pod may stop (covers the DNS TTL "
        "and Envoy's DNS refresh, during which new requests may still arrive)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads")
    kinds = parser.add_subparsers(dest="kind", required=True)
    triton = kinds.add_parser("triton", help="wait until the gpt2 model holds no request")
    triton.add_argument("--metrics-url", default=DEFAULT_METRICS_URL)
    envoy = kinds.add_parser("envoy", help="drain the front door's listeners, then wait")
    envoy.add_argument("--admin-socket", required=True, help="Envoy's admin unix socket")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drain: %(message)s")

    if args.kind == "triton":

        def in_flight() -> float | None:
            return triton_in_flight(args.metrics_url)
    else:
        if not envoy_drain_listeners(args.admin_socket):
            log.info("envoy is gone: nothing left to drain")
            return 0

        def in_flight() -> float | None:
            return envoy_in_flight(args.admin_socket)

    drained = wait_until_idle(in_flight, args.timeout, args.quiet, args.interval)
    return 0 if drained else 1


if __name__ == "__main__":
    raise SystemExit(main())
