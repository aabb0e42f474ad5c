"""The HTTP transport against a real (tiny, scripted) HTTP server: what the client does
when a ``/generate_stream`` is cut short or carries an error event."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from conftest import QuietHandler, http_server, wait_until

from client import __main__ as cli
from client.core import ClientError, Gpt2Client


def event(text: str, finish_reason: str = "", **extra) -> dict:
    return {
        "text_output": text,
        "finish_reason": finish_reason,
        "num_input_tokens": 2,
        "num_output_tokens": 1,
        "model_name": "gpt2",
        "model_version": "1",
        **extra,
    }


TWO_EVENTS = [event(" walks"), event(" to")]  # no finish_reason: the stream is not over


@dataclass
class Script:
    """What the server answers to every request."""

    events: list[dict | bytes]
    chunked: bool = False  # Transfer-Encoding: chunked (as Triton), cut before the last chunk
    status: int = 200
    then_silent: bool = False  # after the events, keep the connection open and say nothing
    posted: list[bytes] = field(default_factory=list)  # the bodies of the requests it got
    # set: the response waits for it (a queued request: Triton answers with its first piece)
    hold: threading.Event | None = None


@contextmanager
def sse_server(script: Script) -> Iterator[str]:
    released = threading.Event()  # ends a silent response when the test is done

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1" if script.chunked else "HTTP/1.0"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            script.posted.append(self.rfile.read(int(self.headers["Content-Length"])))
            if script.hold is not None:
                script.hold.wait(60)
            self.send_response(script.status)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            if script.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in script.events:  # bytes: sent as they are
                raw = data if isinstance(data, bytes) else json.dumps(data).encode()
                body = b"data: " + raw + b"\n\n"
                if script.chunked:
                    body = f"{len(body):x}\r\n".encode() + body + b"\r\n"
                self.wfile.write(body)
                self.wfile.flush()
            if script.then_silent:
                released.wait()
            self.close_connection = True  # and never the terminating 0-length chunk

    with http_server(Handler, before_stop=released.set) as url:
        yield url


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_stream_cut_short_is_an_unavailable_error_not_a_short_result(chunked):
    with sse_server(Script(TWO_EVENTS, chunked=chunked)) as url:
        stream = Gpt2Client(url, "http", timeout_s=10).stream("The cat")
        pieces = []
        with pytest.raises(ClientError) as exc:
            for piece in stream:
                pieces.append(piece)
    assert exc.value.status == "UNAVAILABLE"
    assert "ended before its final response" in str(exc.value)
    assert pieces == [" walks", " to"] and stream.result is None


def test_cli_exits_non_zero_on_a_cut_stream(capsys):
    with sse_server(Script(TWO_EVENTS)) as url:
        code = cli.main(["The cat", "--protocol", "http", "--url", url, "--stream"])
    captured = capsys.readouterr()
    assert code == 1
    assert " walks to" in captured.out and "ended before its final response" in captured.err


def test_a_cancel_from_another_thread_ends_a_silent_stream_at_once():
    """A Stop cancels from another thread than the one reading. Closing the response
    waited for the reader's lock, held by a read that waited for the server's next
    piece: here the server says nothing more until the test ends, so the cancel and the
    read would both wait for it."""
    with sse_server(Script(TWO_EVENTS, then_silent=True)) as url:
        stream = Gpt2Client(url, "http", timeout_s=120).stream("The cat")
        pieces, rest, errors = iter(stream), [], []
        assert next(pieces) == " walks"

        def read() -> None:
            try:
                rest.extend(pieces)
            except Exception as exc:
                errors.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert wait_until(lambda: rest == [" to"], 60)  # then it waits for a third piece
        canceller = threading.Thread(target=stream.cancel, daemon=True)
        canceller.start()
        canceller.join(60)  # a hang guard: the server stays silent
        reader.join(60)
        assert not canceller.is_alive() and not reader.is_alive()
    assert rest == [" to"] and not errors and stream.result is None  # cancelled: it ends


def test_complete_stream_still_ends_with_a_result():
    events = [*TWO_EVENTS, event(" the", "length", num_output_tokens=3)]
    with sse_server(Script(events, chunked=True)) as url:
        stream = Gpt2Client(url, "http", timeout_s=10).stream("The cat")
        assert "".join(stream) == " walks to the"
    assert stream.result.finish_reason == "length" and stream.result.num_output_tokens == 3


@pytest.mark.parametrize(
    "error, status",
    [
        # Triton 2.51's SSE error event is {"error": "<message>"}: no code in it
        ({"error": "internal error while generating"}, "INTERNAL"),
        ({"error": "the server is shutting down; retry on another one"}, "UNAVAILABLE"),
        ({"error": "8 requests are already waiting; retry later"}, "RESOURCE_EXHAUSTED"),
        ({"error": "max_tokens must be >= 1, got 0"}, "INVALID_ARG"),
        ({"error": "temperature must be in [0, 100] (0 = greedy), got 101"}, "INVALID_ARG"),
        ({"error": "stop_words: at most 16 words, got 17"}, "INVALID_ARG"),
        ({"error": "queue full", "status": "UNAVAILABLE"}, "UNAVAILABLE"),  # a code it carries
    ],
)
def test_mid_stream_error_event_keeps_its_kind(error, status):
    with sse_server(Script([event(" walks"), error], chunked=True)) as url:
        stream = Gpt2Client(url, "http", timeout_s=10).stream("The cat")
        with pytest.raises(ClientError) as exc:
            list(stream)
    assert exc.value.status == status and str(exc.value) == error["error"]


def test_error_in_the_first_event_keeps_the_message_and_http_status():
    # What Triton 2.51 sends when the model fails the request at once: HTTP 400 and the
    # error as an SSE event.
    script = Script([{"error": "max_tokens must be >= 1, got -5"}], status=400)
    with sse_server(script) as url:
        with pytest.raises(ClientError) as exc:
            list(Gpt2Client(url, "http", timeout_s=10).stream("The cat"))
    assert exc.value.status == "INVALID_ARG"
    assert str(exc.value) == "max_tokens must be >= 1, got -5"


def test_a_stream_cancelled_before_it_starts_sends_nothing():
    script = Script([event(" walks"), event(" to", finish_reason="length")])
    with sse_server(script) as url:
        client = Gpt2Client(url, "http", timeout_s=10)
        stream = client.stream("The cat")
        stream.cancel()  # before the first piece is asked for: the request is not sent
        assert list(stream) == [] and stream.result is None
        assert list(client.stream("The cat")) == [" walks", " to"]
    assert len(script.posted) == 1  # the second stream's only


def test_own_cancel_ends_the_stream_quietly():
    with sse_server(Script(TWO_EVENTS)) as url:
        stream = Gpt2Client(url, "http", timeout_s=10).stream("The cat")
        pieces = []
        for piece in stream:
            pieces.append(piece)
            stream.cancel()
    assert pieces == [" walks"] and stream.result is None


@pytest.mark.parametrize("status", [200, 503])
def test_a_cancel_while_the_response_is_on_its_way_ends_the_stream(status):
    """Cancelled once sent but before the server answered (queued behind full slots): when
    the answer comes, the stream ends there, its connection closed (which cancels the
    request on Triton), not read to its end beside the request that replaced it; and an
    error answer (the door's 503) is no error to a caller who had cancelled."""
    from conftest import wait_until

    answer = threading.Event()
    events = [event(" walks"), event(" to", finish_reason="length")]
    script = Script(events, status=status, hold=answer)
    with sse_server(script) as url:
        stream = Gpt2Client(url, "http", timeout_s=30).stream("The cat")
        pieces: list[str] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                pieces.extend(stream)
            except BaseException as exc:  # judged below
                errors.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert wait_until(lambda: script.posted, 30)  # sent, not answered
        stream.cancel()
        answer.set()
        reader.join(30)
    assert not reader.is_alive() and not errors, errors
    assert pieces == [] and stream.result is None


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_a_stream_that_falls_silent_is_a_deadline_error_not_a_hang(chunked):
    with sse_server(Script(TWO_EVENTS, chunked=chunked, then_silent=True)) as url:
        # The timeout also bounds the connection and the first events, which must not
        # hit it on a busy machine: 5 s, not less.
        stream = Gpt2Client(url, "http", timeout_s=5).stream("The cat")
        pieces = []
        with pytest.raises(ClientError) as exc:
            for piece in stream:
                pieces.append(piece)
    assert exc.value.status == "DEADLINE_EXCEEDED"
    assert f"Triton at {url} did not answer within 5 s" in str(exc.value)
    assert "next piece" in str(exc.value)
    assert pieces == [" walks", " to"] and stream.result is None


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["caf\udce9"], "text_input is not valid UTF-8 text: character 3 is U+DCE9"),
        (["x", "--stop", "\udcff"], "stop_words is not valid UTF-8 text"),
        (["x", "--max-tokens", "4294967299"], "max_tokens must be in [-2147483648, 2147483647]"),
        (["x", "--top-k", "-2147483649"], "top_k must be in"),
        (["x", "--seed", "-1"], "seed must be in [0, 18446744073709551615] (UINT64), got -1"),
        (["x", "--seed", "99999999999999999999999"], "seed must be in"),
    ],
)
def test_what_no_request_can_carry_is_refused_before_sending(capsys, protocol, argv, words):
    """A command line's undecodable bytes (lone surrogates) and integers their input's type
    cannot hold (numpy and Triton's JSON parser wrap them round: 4294967299 tokens would be
    3) are errors, not tracebacks or other values; nothing is sent."""
    script = Script([event(" no", "length")])
    with sse_server(script) as url:  # answers HTTP; a gRPC request would not reach it
        code = cli.main([*argv, "--protocol", protocol, "--url", url])
    err = capsys.readouterr().err
    assert code == 1 and words in err and "Traceback" not in err, err
    assert script.posted == []


@pytest.mark.parametrize(
    ("argv", "environment", "words"),
    [
        (["--url", "127.0.0.1:abc"], {}, "the port must be a number from 1 to 65535"),
        (["--url", "127.0.0.1:99999"], {}, "the port must be"),  # gRPC: another port
        (["--url", "http://127.0.0.1:8000"], {}, "without a scheme"),
        (["--url", "[::1:8000"], {}, "an IPv6 host goes in brackets"),
        (["--url", "localhost"], {}, "expected host:port"),
        ([], {"API_KEY": "secret\r"}, "strip its trailing newline"),  # a CRLF key file
        ([], {"API_KEY": "sécret"}, "must be printable ASCII"),
    ],
)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_address_or_key_no_call_can_use_is_a_usage_error(
    capsys, monkeypatch, protocol, argv, environment, words
):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["x", "--protocol", protocol, *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    for good in ("127.0.0.1:8001", "[::1]:8001", "triton.internal:443"):
        Gpt2Client(good, protocol, api_key="k3y-from_a.file")  # no error


@pytest.mark.parametrize(
    "line, words", [(b"<html>bad gateway", "is not JSON"), (b'"walks"', "not an object")]
)
def test_an_event_that_is_not_triton_s_is_a_broken_stream_not_a_traceback(line, words):
    """A proxy's page or a cut line in place of Triton's event."""
    with sse_server(Script([event(" walks"), line])) as url:
        stream = Gpt2Client(url, "http", timeout_s=10).stream("The cat")
        with pytest.raises(ClientError, match=words) as broken:
            list(stream)
    assert broken.value.status == "UNAVAILABLE"
