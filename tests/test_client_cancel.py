"""The client against a real tritonserver behind the front door: a generation the client
gives up on (Ctrl-C, a reader gone from its stdout) is cancelled on the server, over
both transports, and the command line ends as a Unix tool does; and the errors of every
HTTP call (count_tokens included) carry the same statuses."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gpt2_metrics, wait_until, wait_until_idle

from client import ClientError, GenerationParams, Gpt2Client
from client import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent
CANCELLED, RAN_OUT = (
    f'gpt2_requests_total{{finish_reason="{reason}"}}' for reason in ("cancelled", "length")
)
# The tiny model writes 1000 tokens in about a second: long enough to be cut short, and
# --min-tokens keeps end-of-text from ending it sooner.
LONG_ARGS = ["--max-tokens", "1000", "--min-tokens", "1000", "--temperature", "0"]
ATTEMPTS = 6


def counted(triton, baseline: dict[str, float]) -> tuple[int, int]:
    """(cancelled, ran to its end) of the one request sent since ``baseline``, once the
    server counted it: the loop publishes its metrics twice a second."""
    after: dict[str, float] = {}

    def ended() -> bool:
        after.update(gpt2_metrics(triton.metrics_url))
        done = sum(after.get(s, 0) - baseline.get(s, 0) for s in (CANCELLED, RAN_OUT))
        return done >= 1 and after.get("gpt2_active_sequences") == 0

    assert wait_until(ended, timeout=600), f"the request never ended: {after}"
    return tuple(int(after.get(s, 0) - baseline.get(s, 0)) for s in (CANCELLED, RAN_OUT))


def cli_process(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "client", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ctrl_c_on_a_whole_reply_cancels_it_on_the_server_and_exits_130(triton, protocol):
    """Without --stream the command waits for the whole reply; Ctrl-C then closes the
    request's stream (gRPC) or connection (HTTP). Over HTTP that cancelled nothing while
    the client asked /generate: Triton 2.51 ran all 1000 tokens for nobody. Ctrl-C goes
    once the server shows the request running; one it finished first shows nothing and
    another runs."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    attempts = []
    for attempt in range(ATTEMPTS):
        baseline = wait_until_idle(triton.metrics_url)
        child = cli_process(
            f"The cat, take {attempt}", "--url", url, "--protocol", protocol, *LONG_ARGS
        )

        def running_or_over(child=child) -> bool:
            active = gpt2_metrics(triton.metrics_url).get("gpt2_active_sequences", 0)
            return child.poll() is not None or active >= 1

        assert wait_until(running_or_over, timeout=120)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
        counts = counted(triton, baseline)
        attempts.append((child.returncode, counts))
        # Ran to its end: finished before Ctrl-C (the child may then be anywhere on its
        # way out), or, as on /generate, ran on for nobody. Another runs.
        if counts == (0, 1):
            continue
        err = err.decode()
        assert child.returncode == 130, err
        assert "[cancelled]" in err and "Traceback" not in err, err
        assert counts == (1, 0), f"one request, cancelled: {attempts}"
        return
    pytest.fail(f"Ctrl-C cancelled no request on the server: {attempts}")


@pytest.mark.parametrize("with_prompt", [False, True], ids=["completion", "prompt+completion"])
def test_http_and_grpc_generate_give_the_same_result(triton, with_prompt):
    """generate() joins the streamed pieces on both transports: the same result, the
    prompt first when asked (the pieces never carry it). What the model answers to a
    request asked for whole is test_server.py's (whole_reply)."""
    params = GenerationParams(max_tokens=12, temperature=0, exclude_input_in_output=not with_prompt)
    results = {}
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        with Gpt2Client(url, protocol) as client:
            result = client.generate("The cat", params)
        results[protocol] = (
            result.text,
            result.finish_reason,
            result.num_input_tokens,
            result.num_output_tokens,
        )
        assert result.tokens_per_s > 0 and result.time_to_first_token_s == result.total_s
    assert results["http"] == results["grpc"]
    text, reason, prompt_tokens, tokens = results["http"]
    assert text.startswith("The cat") == with_prompt and (reason, prompt_tokens, tokens) == (
        "length",
        2,
        12,
    )


def cut_short(triton, protocol: str, cut):
    """Run a long streamed generation from the command line and ``cut(child)`` it (which
    returns what it read), until the server counts the request cancelled: one that ran to
    its end before the cut counts nothing, and another runs. Returns the child and what
    ``cut`` returned."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    attempts = []
    for attempt in range(ATTEMPTS):
        baseline = wait_until_idle(triton.metrics_url)
        child = cli_process(
            f"The cat, take {attempt}", "--url", url, "--protocol", protocol, "--stream", *LONG_ARGS
        )
        seen = cut(child)
        counts = counted(triton, baseline)
        attempts.append((child.returncode, counts))
        if counts != (0, 1):
            assert counts == (1, 0), f"one request, cancelled: {attempts}"
            return child, seen
    pytest.fail(f"every request ran to its end before it was cut: {attempts}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ctrl_c_on_a_stream_cancels_it_and_exits_130(triton, protocol):
    def ctrl_c(child):
        first = child.stdout.read1(1)  # its first piece: the request runs
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
        return first, out, err.decode()

    child, (first, out, err) = cut_short(triton, protocol, ctrl_c)
    assert first and child.returncode == 130, err
    assert "[cancelled]" in err and "Traceback" not in err, err
    assert b"[cancelled]" not in out  # stdout holds the generated text alone


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ctrl_c_while_waiting_for_a_whole_reply_exits_130_without_a_traceback(protocol):
    """Without --stream the command waits for the whole reply: here from a server that
    takes the connection and says nothing, so Ctrl-C surely comes while it waits."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"127.0.0.1:{listener.getsockname()[1]}"
        child = cli_process("The cat", "--url", url, "--protocol", protocol)
        listener.settimeout(120)
        connection, _ = listener.accept()  # the request is on its way
        with connection:
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=120)
    err = err.decode()
    assert child.returncode == 130, err
    assert "[cancelled]" in err and "Traceback" not in err, err
    assert out == b""


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_reader_gone_from_stdout_cancels_quietly_and_exits_141(triton, protocol):
    """`python -m client ... --stream | head -c 20`: the pipe breaks under the stream."""

    def head_c_20(child):
        head = child.stdout.read(20)
        child.stdout.close()  # as head does once it has its 20 bytes
        err = child.stderr.read().decode()
        child.wait(timeout=120)
        return head, err

    child, (head, err) = cut_short(triton, protocol, head_c_20)
    assert len(head) == 20 and child.returncode == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_reply_into_a_closed_pipe_exits_141_quietly(triton, stream):
    """`python -m client "The cat" | true`: the text is written once the reader is gone.
    Python's own buffer took it, and the broken pipe came at exit (code 120 and a
    traceback) unless stdout was unbuffered, as it is here: not for this child."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = ["The cat", "--url", triton.grpc_url, "--max-tokens", "4"]
    child = subprocess.Popen(
        [sys.executable, "-m", "client", *argv, *(["--stream"] if stream else [])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    child.stdout.close()  # the reader is gone before the first byte
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_chat_with_a_prompt_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["The cat", "--chat"])
    assert exc.value.code == 2
    assert "not both" in capsys.readouterr().err


def test_count_tokens_over_http_maps_errors_as_every_other_call(triton, unused_port):
    """A refused connection is UNAVAILABLE and a body over the front door's 1 MiB limit
    RESOURCE_EXHAUSTED, as model_info and generate say them."""
    down = Gpt2Client(f"127.0.0.1:{unused_port}", "http", request_timeout_s=5)
    for call in (lambda c: c.model_info(), lambda c: c.count_tokens(["The cat"])):
        with pytest.raises(ClientError) as exc:
            call(down)
        assert exc.value.status == "UNAVAILABLE" and "cannot reach Triton" in str(exc.value)
    big = "a" * (1 << 20)
    with Gpt2Client(triton.http_url, "http") as client:
        for call in (lambda c: c.generate(big), lambda c: c.count_tokens([big])):
            with pytest.raises(ClientError) as exc:
                call(client)
            assert exc.value.status == "RESOURCE_EXHAUSTED", exc.value
        assert client.count_tokens(["The cat"]) == [2]
