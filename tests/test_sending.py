import threading

import pytest

from gpt2_triton.batcher import GenerationOutput
from gpt2_triton.sending import ResponseWorker


class RecordingSink:
    def __init__(self, fail_after=None, fail_errors=False):
        self.sent = []
        self.errors = []
        self.threads = set()
        self.fail_after = fail_after
        self.fail_errors = fail_errors
        self.closed = 0

    def send(self, output, final):
        self.threads.add(threading.current_thread().name)
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise RuntimeError("client gone")
        self.sent.append((output.text, final))

    def send_error(self, message):
        if self.fail_errors:
            raise RuntimeError("client gone")
        self.errors.append(message)

    def is_cancelled(self):
        return False

    def close(self):
        self.closed += 1


def _out(text):
    return GenerationOutput(text, "", 3, 1)


def test_responses_go_out_in_order_from_the_worker_thread():
    worker = ResponseWorker(max_pending=4)  # smaller than what is sent: the queue blocks
    a, b = RecordingSink(), RecordingSink()
    qa, qb = worker.wrap(a), worker.wrap(b)
    for i in range(20):
        qa.send(_out(f"a{i}"), final=False)
        qb.send(_out(f"b{i}"), final=i == 19)
    qa.send_error("boom")
    assert worker.flush(timeout=5)
    assert a.sent == [(f"a{i}", False) for i in range(20)]
    assert b.sent == [(f"b{i}", i == 19) for i in range(20)]
    assert a.errors == ["boom"]
    assert a.threads == {"gpt2-responses"}
    worker.close()


def test_a_failed_send_reads_as_cancelled_and_the_worker_keeps_going():
    worker = ResponseWorker()
    gone, fine = RecordingSink(fail_after=1), RecordingSink()
    qgone, qfine = worker.wrap(gone), worker.wrap(fine)
    for i in range(3):
        qgone.send(_out(f"x{i}"), final=False)
        qfine.send(_out(f"y{i}"), final=False)
    assert worker.flush(timeout=5)
    assert qgone.is_cancelled()
    assert not qfine.is_cancelled()
    assert fine.sent == [("y0", False), ("y1", False), ("y2", False)]
    worker.close()


def test_close_sends_what_is_queued():
    worker = ResponseWorker()
    sink = RecordingSink()
    queued = worker.wrap(sink)
    for i in range(50):
        queued.send(_out(str(i)), final=i == 49)
    worker.close()
    assert len(sink.sent) == 50 and sink.sent[-1] == ("49", True)


def test_a_final_or_error_that_cannot_be_sent_ends_the_request_with_a_bare_final_flag():
    worker = ResponseWorker()
    streamed, final, error = RecordingSink(0), RecordingSink(1), RecordingSink(fail_errors=True)
    queued = [worker.wrap(s) for s in (streamed, final, error)]
    queued[0].send(_out("a"), final=False)  # not the end: the loop will cancel it
    queued[1].send(_out("b"), final=False)
    queued[1].send(_out("c"), final=True)
    queued[2].send_error("boom")
    assert worker.flush(timeout=5)
    assert [s.closed for s in (streamed, final, error)] == [0, 1, 1]
    assert all(q.is_cancelled() for q in queued)
    worker.close()


def test_requests_take_lanes_in_turn_and_each_keeps_its_order():
    worker = ResponseWorker(max_pending=2, lanes=3)
    sinks = [RecordingSink() for _ in range(6)]
    queued = [worker.wrap(s) for s in sinks]
    for i in range(30):
        for q in queued:
            q.send(_out(str(i)), final=i == 29)
    assert worker.flush(timeout=10)
    for sink in sinks:
        assert sink.sent == [(str(i), i == 29) for i in range(30)]
        assert len(sink.threads) == 1  # one lane, one thread, per request
    lanes = [next(iter(s.threads)) for s in sinks]
    assert lanes[:3] == lanes[3:] and len(set(lanes)) == 3
    worker.close()


class BlockingSink(RecordingSink):
    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def send(self, output, final):
        self.release.wait()
        super().send(output, final)


class SignallingSink(RecordingSink):
    def __init__(self):
        super().__init__()
        self.sent_one = threading.Event()

    def send(self, output, final):
        super().send(output, final)
        self.sent_one.set()


def test_a_send_that_waits_holds_up_only_its_own_lane():
    worker = ResponseWorker(lanes=2)
    slow, other = BlockingSink(), SignallingSink()
    queued_slow, queued_other = worker.wrap(slow), worker.wrap(other)
    queued_slow.send(_out("a"), final=True)
    queued_other.send(_out("b"), final=True)
    try:  # the bound only fails a broken worker; a working one answers at once
        assert other.sent_one.wait(timeout=30)
        assert slow.sent == [] and not worker.flush(timeout=0.05)
    finally:
        slow.release.set()
    assert worker.flush(timeout=10)
    assert slow.sent == [("a", True)]
    worker.close()


def test_close_sends_what_every_lane_holds():
    worker = ResponseWorker(lanes=4)
    sinks = [RecordingSink() for _ in range(8)]
    for sink in sinks:
        queued = worker.wrap(sink)
        for i in range(10):
            queued.send(_out(str(i)), final=i == 9)
    worker.close()
    assert all(len(s.sent) == 10 and s.sent[-1] == ("9", True) for s in sinks)


def test_a_worker_needs_a_lane():
    with pytest.raises(ValueError, match="at least one lane"):
        ResponseWorker(lanes=0)


class AskedSink(RecordingSink):
    """Says it is cancelled once ``cancelled`` is set; notes who asked, and how often."""

    def __init__(self, raises=False):
        super().__init__()
        self.cancelled = False
        self.raises = raises
        self.askers = []

    def is_cancelled(self):
        self.askers.append(threading.current_thread().name)
        if self.raises:
            raise RuntimeError("the server is gone")
        return self.cancelled


def test_before_its_first_piece_a_request_is_asked_at_once():
    """A request cancelled while it waited must never be admitted: asked inline."""
    worker = ResponseWorker()
    sink = AskedSink()
    queued = worker.wrap(sink)
    assert not queued.is_cancelled()
    sink.cancelled = True
    assert queued.is_cancelled()
    assert sink.askers == [threading.current_thread().name] * 2
    worker.close()


def test_after_its_first_piece_a_request_is_asked_on_its_lane_one_asking_at_a_time():
    worker = ResponseWorker(lanes=2)
    blocker, sink = BlockingSink(), AskedSink()
    queued_blocker = worker.wrap(blocker)  # the first lane
    worker.wrap(AskedSink())  # the second
    queued = worker.wrap(sink)  # the first again: behind the blocked request
    queued_blocker.send(_out("x"), final=False)  # holds the lane until released
    queued.send(_out("a"), final=False)
    sink.cancelled = True
    try:
        assert not any(queued.is_cancelled() for _ in range(5))  # the last answer: not yet
        assert sink.askers == []  # nothing asked in the caller's thread
    finally:
        blocker.release.set()
    assert worker.flush(timeout=10)
    assert sink.askers == ["gpt2-responses-0"]  # five calls, one asking, on the lane
    assert queued.is_cancelled()
    worker.close()


def test_an_asking_that_fails_reads_as_cancelled():
    worker = ResponseWorker()
    sink = AskedSink(raises=True)
    queued = worker.wrap(sink)
    queued.send(_out("a"), final=False)
    assert not queued.is_cancelled()  # asked on the lane
    assert worker.flush(timeout=10)
    assert queued.is_cancelled() and sink.closed == 0  # the loop ends it, as a cancel
    worker.close()


def test_an_asking_runs_ahead_of_the_sends_queued_on_its_lane_and_never_blocks():
    """A cancelled stream must not run on while its asking waits behind a full FIFO."""
    worker = ResponseWorker(max_pending=2, lanes=1)
    blocker, sink = BlockingSink(), AskedSink()
    events = []
    sink.send = lambda output, final: events.append(("send", output.text))
    asked = sink.is_cancelled
    sink.is_cancelled = lambda: events.append(("ask",)) or asked()
    queued_blocker, queued = worker.wrap(blocker), worker.wrap(sink)
    queued_blocker.send(_out("x"), final=False)  # the lane is held in this send
    queued.send(_out("a"), final=False)
    queued.send(_out("b"), final=False)  # the FIFO is full now
    answers = []
    caller = threading.Thread(target=lambda: answers.append(queued.is_cancelled()))
    caller.start()
    caller.join(timeout=30)  # only a blocking is_cancelled() would take long
    try:
        assert not caller.is_alive() and answers == [False]
    finally:
        blocker.release.set()
    assert worker.flush(timeout=10)
    assert events == [("ask",), ("send", "a"), ("send", "b")]
    worker.close()
