"""Responses sent from their own threads, so that sending overlaps the next engine step.

In Triton each streamed response is a message to the server process and back (~0.5 ms
measured on 2 cores, ~0.2 ms on a 16-core GPU machine), and the sender releases the GIL
while it waits for the server's answer. Sent inline, 16 live streams add ~8 ms to every
step; sent here, they go out while the generation loop waits on the next engine call.

One thread sends ~5,000 responses a second on a 16-core machine, whatever the engine does:
on an H200 the service gave 4,215 tokens/s at 16 streams and 4,429 at 64 while the engine's
step took ~1.2 ms (docs/GPU.md). So the worker has several lanes, each a thread with its
own FIFO; a request keeps the lane it was given, so its responses stay in order and its
final one is last, and the lanes' round trips overlap. A final (or error) send that raises
is followed by the sink's ``close()``, a bare final flag: otherwise the server would hold
the request in flight forever.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

from gpt2_triton.batcher import GenerationOutput, ResponseSink

log = logging.getLogger(__name__)

_STOP = object()
_WAKE = object()  # wakes a lane to run its askings


class ResponseWorker:
    """Owns the sending lanes. ``wrap(sink)`` gives a sink whose sends are queued on one.

    ``max_pending`` bounds each lane's queue: when sends fall behind, the loop blocks on
    the next one instead of piling up responses (and memory) without limit. Requests are
    given lanes in turn.
    """

    def __init__(self, max_pending: int = 256, lanes: int = 1) -> None:
        if lanes < 1:
            raise ValueError("a response worker needs at least one lane")
        self._lanes = [
            _Lane("gpt2-responses" if lanes == 1 else f"gpt2-responses-{i}", max_pending)
            for i in range(lanes)
        ]
        self._turn = itertools.count()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def wrap(self, sink: ResponseSink) -> QueuedSink:
        return QueuedSink(sink, self._lanes[next(self._turn) % len(self._lanes)])

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        marks = [lane.mark() for lane in self._lanes]
        for done in marks:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not done.wait(left):
                return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the threads."""
        deadline = time.monotonic() + timeout
        for lane in self._lanes:
            lane.stop()
        for lane in self._lanes:
            lane.join(max(deadline - time.monotonic(), 0.0))


class _Lane:
    """One sending thread and its FIFO, and the askings (``is_cancelled``) it runs ahead
    of the FIFO: an asking's answer does not depend on the sends before it, and one that
    waited behind a full FIFO (up to ``max_pending`` round trips) would let a cancelled
    stream run on for as long."""

    def __init__(self, name: str, max_pending: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._asks: collections.deque = collections.deque()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], owner: QueuedSink, final: bool = False) -> None:
        self._queue.put((job, owner, final))

    def ask(self, job: Callable[[], None], owner: QueuedSink) -> None:
        """Run ``job`` before the next queued send. Never blocks: a full FIFO means the
        thread is busy and takes the askings before its next send; otherwise a no-op job
        wakes it."""
        self._asks.append((job, owner))
        try:
            self._queue.put_nowait((_WAKE, None, False))
        except queue.Full:
            pass

    def mark(self) -> threading.Event:
        """An event set once everything queued before it is sent."""
        done = threading.Event()
        self._queue.put((done.set, None, False))
        return done

    def stop(self) -> None:
        self._queue.put((_STOP, None, False))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            while self._asks:
                self._do(*self._asks.popleft(), final=False)
            job, owner, final = self._queue.get()
            if job is _STOP:
                return
            if job is not _WAKE:
                self._do(job, owner, final)

    @staticmethod
    def _do(job: Callable[[], None], owner: QueuedSink | None, final: bool) -> None:
        try:
            job()
        except Exception:  # a client gone away: stop generating for it, keep sending
            log.debug("a response could not be sent", exc_info=True)
            if owner is not None:
                owner.failed = True
                if final:
                    _close(owner.sink)


def _close(sink: ResponseSink) -> None:
    try:
        sink.close()
    except Exception:  # nothing more can be done for this request
        log.warning("a request could not be closed", exc_info=True)


class QueuedSink:
    """A ``ResponseSink`` whose sends go through one lane of a ``ResponseWorker``.

    A send that fails on the lane's thread marks the sink failed; the loop then sees it
    as cancelled at the next check and frees the sequence.

    ``is_cancelled()`` is a round trip too (~75 us idle, more under load: the batcher asks
    up to 4 streams a step, a large share of a GPU step of ~1.5 ms). Until the request's
    first piece is queued (it waits, or is being admitted) the question is asked at once,
    so a request cancelled while it waited never takes a prefill. After that it is asked
    on the request's lane, ahead of the sends queued there: the call answers what the
    last asking found and starts a new one (one at a time), so a cancel is seen one check
    later (``cancel_check_interval_s``, 50 ms in the gpt2 model) than if asked inline.
    """

    def __init__(self, sink: ResponseSink, lane: _Lane) -> None:
        self.sink = sink
        self.lane = lane
        self.failed = False  # a send (or an asking) failed on the lane
        self.cancelled = False  # what the last asking on the lane found
        self._sent_any = False
        self._asking = False

    def send(self, output: GenerationOutput, final: bool) -> None:
        self._sent_any = True
        self.lane.submit(lambda: self.sink.send(output, final), self, final)

    def send_error(self, message: str) -> None:
        self._sent_any = True
        self.lane.submit(lambda: self.sink.send_error(message), self, final=True)

    def close(self) -> None:
        self._sent_any = True
        self.lane.submit(self.sink.close, self)

    def is_cancelled(self) -> bool:
        if self.failed or self.cancelled:
            return True
        if not self._sent_any:
            return self.sink.is_cancelled()
        if not self._asking:
            self._asking = True
            self.lane.ask(self._ask, self)
        return False

    def _ask(self) -> None:
        try:
            self.cancelled = bool(self.sink.is_cancelled())
        finally:  # an asking that raises marks the sink failed (the lane's handler)
            self._asking = False
