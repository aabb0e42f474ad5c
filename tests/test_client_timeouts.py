"""Against a server that takes the connection and never answers (``silent_server``):
every call of the client gives up after its timeout with a DEADLINE_EXCEEDED error that
says what went unanswered, over both transports."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import QuietHandler, http_server

from client import ClientError, GenerationParams, Gpt2Client

CALLS = {
    "model_info": (lambda c: c.model_info(), "asked for the configuration of gpt2"),
    "count_tokens": (lambda c: c.count_tokens(["The cat"]), "asked to count tokens"),
    "check_ready": (lambda c: c.check_ready(), "asked whether it is ready"),
    "stream": (
        lambda c: list(c.stream("The cat", GenerationParams(max_tokens=4))),
        "waiting for the",  # the generation to start (HTTP) / its next piece (gRPC)
    ),
    "generate": (lambda c: c.generate("The cat"), "waiting for the"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("call", CALLS)
def test_every_call_to_a_silent_server_times_out_clearly(silent_server, protocol, call):
    do, what = CALLS[call]
    client = Gpt2Client(silent_server, protocol, timeout_s=1, request_timeout_s=1)
    started = time.monotonic()
    with client, pytest.raises(ClientError) as exc:
        do(client)
    assert exc.value.status == "DEADLINE_EXCEEDED"
    assert f"Triton at {silent_server} did not answer within 1 s ({what}" in str(exc.value)
    # Given up after its own 1 s; without timeouts a unary gRPC call took 20 s and a
    # stream waited 300 s.
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_is_ready_is_false_for_a_silent_server(silent_server, protocol):
    with Gpt2Client(silent_server, protocol, request_timeout_s=1) as client:
        assert client.is_ready() is False


def test_defaults_suit_a_script_and_the_page_passes_shorter_ones():
    """The library waits long for a generation (a busy server queues it) and 30 s for
    anything else; the chat page passes its own, shorter limits (ui.chat.PageLimits)."""
    from ui.chat import ChatService, PageLimits

    client = Gpt2Client()
    assert (client.timeout_s, client.request_timeout_s) == (300.0, 30.0)
    page = ChatService("127.0.0.1:8001", limits=PageLimits()).client()
    assert (page.timeout_s, page.request_timeout_s) == (30.0, 5.0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_waiting_for_a_silent_server_ends_at_its_deadline_not_a_check_s(silent_server, protocol):
    """Each readiness check gets at most the time left: a check of its own 30 s went past
    a 1 s ``--wait`` by 20-30 s."""
    client = Gpt2Client(silent_server, protocol, request_timeout_s=300)
    started = time.monotonic()
    with client, pytest.raises(ClientError, match=r"is not ready after 1 s: .*did not answer"):
        client.wait_until_ready(1)
    assert time.monotonic() - started < 60  # a hang guard: one check alone waited 300 s


@contextmanager
def answering(status: int, error: str) -> Iterator[str]:
    """host:port of an HTTP server that answers every request with ``status`` and
    Triton's JSON error body (a front door without the API key, a restarting server)."""

    class Handler(QuietHandler):
        def answer(self) -> None:
            body = json.dumps({"error": error}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer  # noqa: N815 (http.server's naming)

    with http_server(Handler) as url:
        yield url


def test_waiting_stops_at_an_answer_that_waiting_cannot_change(capsys):
    """A front door that wants the API key answers 401 at once; waiting for it to be
    ready hid that for the whole wait (make chat: 60 s), then said "not ready"."""
    from client import __main__ as cli

    with answering(401, "missing or wrong API key") as url:
        with Gpt2Client(url, "http") as client, pytest.raises(ClientError) as refused:
            client.wait_until_ready(30)  # the first answer ends it, not the deadline
        assert refused.value.status == "UNAUTHENTICATED"
        assert "missing or wrong API key" in str(refused.value)
        code = cli.main(["The cat", "--protocol", "http", "--url", url, "--wait", "30"])
    assert code == 1 and "missing or wrong API key" in capsys.readouterr().err


def test_waiting_for_a_server_that_stays_down_says_its_last_answer():
    with answering(503, "Server is shutting down") as url:
        with Gpt2Client(url, "http") as client, pytest.raises(ClientError) as down:
            client.wait_until_ready(1)
    assert down.value.status == "UNAVAILABLE"
    assert "is not ready after 1 s: Server is shutting down" in str(down.value)


@pytest.mark.parametrize(
    "status, error, words",
    [
        (500, "internal error while queueing the request", "INTERNAL"),
        (503, "1024 requests are already waiting; retry later", "RESOURCE_EXHAUSTED"),
        (503, "no healthy upstream", "UNAVAILABLE"),
        (400, "top_p must be in (0, 1], got 5.0", "INVALID_ARG"),
        (401, "missing or wrong API key", "UNAUTHENTICATED"),
    ],
)
def test_an_http_error_has_the_status_grpc_gives_the_same_message(status, error, words):
    """Triton's HTTP frontend sends 503 for a full queue as for a server going away; its
    message says which, as over gRPC (docs/API.md: a full queue is RESOURCE_EXHAUSTED)."""
    with answering(status, error) as url:
        with Gpt2Client(url, "http") as client, pytest.raises(ClientError) as failed:
            client.generate("The cat")
    assert failed.value.status == words and str(failed.value) == error


def test_the_page_says_what_the_server_answered_when_it_refuses_the_check():
    from ui.chat import ChatService

    with answering(401, "missing or wrong API key") as url:
        line = ChatService(url, protocol="http").status_line()
    assert "missing or wrong API key" in line and "not reachable" not in line
