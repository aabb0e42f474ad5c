import threading

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
