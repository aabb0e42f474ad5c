"""The supervisor's liveness checks: only silence counts (gpt2_triton/liveness.py).

The whole path (a stopped tritonserver killed and started again) runs on a real server in
test_supervision.py; here, what a check calls silence, against real sockets."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from conftest import wait_until

from gpt2_triton.liveness import LivenessRule, SilenceWatch, answers


@pytest.fixture()
def http_answering() -> Iterator[str]:
    """A server that answers every GET: 200 at /live, 404 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/live" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_only_silence_is_no_answer(http_answering, silent_server, unused_port):
    assert answers(f"http://{http_answering}/live", timeout=5)
    assert answers(f"http://{http_answering}/missing", timeout=5)  # a status is an answer
    assert answers(f"http://127.0.0.1:{unused_port}/live", timeout=5)  # refused: nobody
    assert not answers(f"http://{silent_server}/live", timeout=0.3)


def test_the_watch_counts_silent_checks_in_a_row(http_answering, silent_server):
    rule = LivenessRule(period_s=0.05, timeout_s=0.2, failures=2)
    silent = SilenceWatch(f"http://{silent_server}/live", rule, "test-silent").start()
    talking = SilenceWatch(f"http://{http_answering}/live", rule, "test-talking").start()
    try:
        assert wait_until(silent.silent, 30)
        silent.reset()  # what the supervisor does once it killed the process
        assert not silent.silent()
        assert wait_until(silent.silent, 30)  # still silent: counted again from zero
        assert not talking.silent()
    finally:
        silent.stop()
        talking.stop()


def test_no_rule_no_checks(silent_server):
    """make serve LIVENESS=0: nothing is ever called silent (a debugger may hold it)."""
    watch = SilenceWatch(f"http://{silent_server}/live", None, "test-off").start()
    assert not watch._thread.is_alive() and not watch.silent()


@pytest.mark.parametrize(
    "bad", [{"period_s": 0}, {"timeout_s": -1}, {"failures": 0}], ids=["period", "timeout", "n"]
)
def test_a_rule_needs_positive_times_and_failures(bad):
    with pytest.raises(ValueError, match="positive"):
        LivenessRule(**bad)


def test_an_answer_that_is_not_http_is_an_answer():
    """Something answered (not silence): the watch must count it, not die on it."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def reply_garbage():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"garbage\r\n\r\n")

    threading.Thread(target=reply_garbage, daemon=True).start()
    try:
        assert answers(f"http://127.0.0.1:{port}/live", timeout=5)
    finally:
        listener.close()
