import threading

import pytest

from gpt2_triton.batcher import GenerationOutput
from gpt2_triton.sending import MAX_LANES, ResponseWorker


class RecordingSink:
    def __init__(self, fail_after=None, fail_errors=False):
        self.sent = []
        self.outputs = []
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
        self.outputs.append(output)

    def send_error(self, message):
        if self.fail_errors:
            raise RuntimeError("client gone")
        self.errors.append(message)

    def is_cancelled(self):
        return False

    def close(self):
        self.closed += 1

    def text(self):
        return "".join(text for text, _ in self.sent)

    def finals(self):
        return [final for _, final in self.sent]


class BlockingSink(RecordingSink):
    """Holds its lane in its first send until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def send(self, output, final):
        self.entered.set()
        self.release.wait()
        super().send(output, final)


class SignallingSink(RecordingSink):
    def __init__(self):
        super().__init__()
        self.sent_one = threading.Event()

    def send(self, output, final):
        super().send(output, final)
        self.sent_one.set()


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


def _out(text, generated=1, reason=""):
    return GenerationOutput(text, reason, 3, generated)


def _held_lane(worker):
    """A request whose first send holds its lane (bound first: the first lane) until
    ``release`` is set; returns its sink once the lane is held."""
    blocker = BlockingSink()
    worker.wrap(blocker).send(_out("x"), final=False)
    assert blocker.entered.wait(30)  # the bound only fails a broken worker
    return blocker


def test_responses_go_out_in_order_from_the_worker_thread():
    worker = ResponseWorker(max_pending=4)
    a, b = RecordingSink(), RecordingSink()
    qa, qb = worker.wrap(a), worker.wrap(b)
    for i in range(20):
        qa.send(_out(f"a{i}"), final=False)
        qb.send(_out(f"b{i}"), final=i == 19)
    qa.send_error("boom")
    assert worker.flush(timeout=5)
    # pieces may have joined while they waited: the same text, in order, final last
    assert a.text() == "".join(f"a{i}" for i in range(20)) and not any(a.finals())
    assert b.text() == "".join(f"b{i}" for i in range(20))
    assert b.finals()[-1] and not any(b.finals()[:-1])
    assert a.errors == ["boom"]
    assert a.threads == {"gpt2-responses"}
    worker.close()


def test_pieces_that_wait_join_into_one_response_with_the_newest_counts():
    worker = ResponseWorker(lanes=1)
    blocker = _held_lane(worker)
    sink = RecordingSink()
    queued = worker.wrap(sink)
    for i in range(5):
        queued.send(_out(f"t{i} ", generated=i + 1), final=False)
    queued.send(_out("end", generated=6, reason="length"), final=True)
    blocker.release.set()
    assert worker.flush(timeout=10)
    assert sink.sent == [("t0 t1 t2 t3 t4 end", True)]  # one response for the six pieces
    assert sink.outputs[0].num_output_tokens == 6 and sink.outputs[0].finish_reason == "length"
    worker.close()


def test_a_piece_that_comes_while_the_last_is_being_sent_goes_out_after_it():
    worker = ResponseWorker(lanes=1)
    sink = BlockingSink()
    queued = worker.wrap(sink)
    queued.send(_out("a"), final=False)
    assert sink.entered.wait(30)  # "a" is being sent: taken off the queue
    queued.send(_out("b"), final=False)
    queued.send(_out("c"), final=True)
    sink.release.set()
    assert worker.flush(timeout=10)
    assert sink.sent == [("a", False), ("bc", True)]
    worker.close()


def test_a_failed_send_reads_as_cancelled_and_the_worker_keeps_going():
    worker = ResponseWorker()
    gone, fine = RecordingSink(fail_after=1), RecordingSink()
    qgone, qfine = worker.wrap(gone), worker.wrap(fine)
    for i in range(3):
        qgone.send(_out(f"x{i}"), final=False)
        assert worker.flush(timeout=5)  # each piece its own response
        qfine.send(_out(f"y{i}"), final=False)
    assert worker.flush(timeout=5)
    assert qgone.is_cancelled()
    assert not qfine.is_cancelled()
    assert fine.text() == "y0y1y2"
    worker.close()


def test_close_sends_what_is_queued():
    worker = ResponseWorker()
    sink = RecordingSink()
    queued = worker.wrap(sink)
    for i in range(50):
        queued.send(_out(str(i)), final=i == 49)
    worker.close()
    assert sink.text() == "".join(str(i) for i in range(50)) and sink.finals()[-1]


def test_a_final_or_error_that_cannot_be_sent_ends_the_request_with_a_bare_final_flag():
    worker = ResponseWorker()
    streamed, final, error = RecordingSink(0), RecordingSink(1), RecordingSink(fail_errors=True)
    queued = [worker.wrap(s) for s in (streamed, final, error)]
    queued[0].send(_out("a"), final=False)  # not the end: the loop will cancel it
    queued[1].send(_out("b"), final=False)
    assert worker.flush(timeout=5)  # "b" alone, then the final that fails
    queued[1].send(_out("c"), final=True)
    queued[2].send_error("boom")
    assert worker.flush(timeout=5)
    assert [s.closed for s in (streamed, final, error)] == [0, 1, 1]
    assert all(q.is_cancelled() for q in queued)
    worker.close()


def test_requests_are_bound_to_the_lane_with_the_fewest_live_requests():
    worker = ResponseWorker(max_pending=2, lanes=3)
    sinks = [RecordingSink() for _ in range(6)]
    queued = [worker.wrap(s) for s in sinks]
    for i in range(30):
        for q in queued:
            q.send(_out(str(i)), final=False)
    assert worker.flush(timeout=10)
    for sink in sinks:
        assert sink.text() == "".join(str(i) for i in range(30))
        assert len(sink.threads) == 1  # one lane, one thread, per request
    lanes = [next(iter(s.threads)) for s in sinks]
    assert lanes[:3] == lanes[3:] and len(set(lanes)) == 3
    # the first request ends: its lane has the fewest now, the next request goes there
    queued[0].send(_out("", reason="length"), final=True)
    assert worker.flush(timeout=10)
    later = RecordingSink()
    worker.wrap(later).send(_out("z"), final=True)
    assert worker.flush(timeout=10)
    assert later.threads == sinks[0].threads
    worker.close()


def test_a_request_that_never_sends_takes_no_lane():
    """A request refused at submit (its sink wrapped, never used) leaves the balance."""
    worker = ResponseWorker(lanes=2)
    worker.wrap(RecordingSink())  # refused: never used
    first, second = RecordingSink(), RecordingSink()
    worker.wrap(first).send(_out("a"), final=False)
    worker.wrap(second).send(_out("b"), final=False)
    assert worker.flush(timeout=10)
    assert first.threads == {"gpt2-responses-0"} and second.threads == {"gpt2-responses-1"}
    worker.close()


def test_a_send_that_waits_holds_up_only_its_own_lane():
    worker = ResponseWorker(lanes=2)
    slow = _held_lane(worker)
    other = SignallingSink()
    worker.wrap(other).send(_out("b"), final=True)
    try:
        assert other.sent_one.wait(timeout=30)
        assert slow.sent == [] and not worker.flush(timeout=0.05)
    finally:
        slow.release.set()
    assert worker.flush(timeout=10)
    assert slow.sent == [("x", False)]
    worker.close()


def test_flush_and_close_keep_their_timeouts_when_a_lane_is_stuck_and_full():
    worker = ResponseWorker(max_pending=1, lanes=1)
    stuck = _held_lane(worker)
    worker.wrap(RecordingSink()).send_error("fills the queue")
    done = []
    waiter = threading.Thread(target=lambda: done.append((worker.flush(0.05), worker.close(0.05))))
    waiter.start()
    waiter.join(timeout=30)  # only a flush or close that ignores its timeout takes long
    try:
        assert not waiter.is_alive() and done == [(False, None)]
    finally:
        stuck.release.set()
    worker.close()  # its stop was refused while stuck: give it now


def test_close_sends_what_every_lane_holds():
    worker = ResponseWorker(lanes=4)
    sinks = [RecordingSink() for _ in range(8)]
    for sink in sinks:
        queued = worker.wrap(sink)
        for i in range(10):
            queued.send(_out(str(i)), final=i == 9)
    worker.close()
    assert all(s.text() == "0123456789" and s.finals()[-1] for s in sinks)


@pytest.mark.parametrize("lanes", [0, MAX_LANES + 1])
def test_a_worker_takes_a_bounded_number_of_lanes(lanes):
    with pytest.raises(ValueError, match=f"takes 1 to {MAX_LANES} lanes, not {lanes}"):
        ResponseWorker(lanes=lanes)


def test_a_worker_takes_as_many_lanes_as_the_bound():
    worker = ResponseWorker(lanes=MAX_LANES)
    try:
        assert worker.lanes == MAX_LANES
    finally:
        worker.close()


def test_whether_a_request_was_cancelled_is_asked_on_the_callers_thread():
    """Asked from the lanes it crashed tritonserver 2.51 (sending.py): the loop asks."""
    worker = ResponseWorker()
    sink = AskedSink()
    queued = worker.wrap(sink)
    queued.send(_out("a"), final=False)
    assert worker.flush(timeout=10)
    assert not queued.is_cancelled()
    sink.cancelled = True
    assert queued.is_cancelled()
    assert sink.askers == [threading.current_thread().name] * 2
    worker.close()
