"""Against a server that takes the connection and never answers (``silent_server``):
every call of the client gives up after its timeout with a DEADLINE_EXCEEDED error that
says what went unanswered, over both transports."""

from __future__ import annotations

import time

import pytest

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
