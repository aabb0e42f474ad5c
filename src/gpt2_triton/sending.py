"""Responses sent from their own threads, so that sending overlaps the next engine step.

In Triton each streamed response is a message to the server process and back (~0.5 ms
measured on 2 cores, ~0.2 ms on an idle 16-core GPU machine), and the sender releases the
GIL while it waits for the server's answer. Sent inline, 16 live streams add ~8 ms to
every step; sent here, they go out while the generation loop waits on the next engine call.

Two things keep sending from setting the pace (docs/GPU.md has the H200 runs):
- **Lanes.** One thread sent ~4,400 responses a second on an H200 machine while the
  engine's step took ~1.2 ms. The worker has several lanes, each a thread with its own
  FIFO; a request is bound to the lane with the fewest live requests when it first needs
  one and keeps it, so its responses stay in order and its final one is last.
- **Pieces join while they wait.** With lanes the round trips overlap, but each one still
  grows with the number in flight (4 lanes at 64 streams: ~1 ms each). A stream's piece
  that is still queued when the next one comes takes it in (its text grows, its counts are
  the newer ones) instead of queueing a second response: a stream has at most one piece
  waiting, so a step does not wait for sends (while its lane's queue has room: ends and
  errors still take places there), and when sending falls behind each response
  carries several tokens instead of the stream falling behind (as vLLM's output
  collector merges deltas a slow consumer has not taken yet).

``is_cancelled()`` stays the loop's own round trip (asked of a few streams a step,
batcher.py). Asked from the lanes instead, ahead of their sends, it crashed tritonserver
2.51 with SIGSEGV in ``TRITONBACKEND_ResponseFactoryIsCancelled`` in 2 of 3 one-minute
soaks (0 of 3 asked from the loop); the cause inside the server was not found
(docs/RELIABILITY.md).

A final (or error) send that raises is followed by the sink's ``close()``, a bare final
flag: otherwise the server would hold the request in flight forever.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

from gpt2_triton.batcher import GenerationOutput, ResponseSink, runs_on_gpu

# Each lane is a thread. The GPU runs measured 1, 4 and 8 (docs/GPU.md); far more would be
# threads contending for the GIL, and a typo such as 4000 would start that many.
MAX_LANES = 64
# The default number of lanes, by where the engine runs. On a GPU (H200, 2026-11-28) one
# lane gave 1.2-2.2x the tokens/s of four at 16 and 64 streams in two runs, once a piece
# that waits joins the next (not profiled; one lane sends fewer, fuller pieces, and one
# thread less takes the GIL from the generation loop). On the CPU a step (25-50 ms) dwarfs
# a send, and four lanes are what the CPU's targets were measured with.
CPU_RESPONSE_LANES = 4
GPU_RESPONSE_LANES = 1


def default_response_lanes(engine: str, device: str) -> int:
    """The number of sending threads for an engine kind on a device (``cpu``, ``cuda``...)."""
    return GPU_RESPONSE_LANES if runs_on_gpu(engine, device) else CPU_RESPONSE_LANES


log = logging.getLogger(__name__)

_STOP = object()


class ResponseWorker:
    """Owns the sending lanes. ``wrap(sink)`` gives a sink whose sends go out on one.

    ``max_pending`` bounds the jobs queued on all lanes together (each lane holds its
    share): when sends fall behind further than that, the loop blocks on the next one
    instead of piling up responses without limit. With pieces joining while they wait a
    stream queues at most one piece; the rest are requests' ends and errors and ``flush``
    marks.
    """

    def __init__(self, max_pending: int = 256, lanes: int = 1) -> None:
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"a response worker takes 1 to {MAX_LANES} lanes, not {lanes}")
        share = max(1, math.ceil(max_pending / lanes))
        self._lanes = [
            _Lane("gpt2-responses" if lanes == 1 else f"gpt2-responses-{i}", share)
            for i in range(lanes)
        ]
        self._binding = threading.Lock()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def wrap(self, sink: ResponseSink) -> QueuedSink:
        return QueuedSink(sink, self)

    def bind(self) -> _Lane:
        """The lane with the fewest live requests (the first of those), now one more."""
        with self._binding:
            lane = min(self._lanes, key=lambda lane: lane.live)
            lane.live += 1
            return lane

    def unbind(self, lane: _Lane) -> None:
        """A request on ``lane`` ended."""
        with self._binding:
            lane.live -= 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        marks = []
        for lane in self._lanes:
            done = lane.mark(_left(deadline))
            if done is None:
                return False
            marks.append(done)
        return all(done.wait(_left(deadline)) for done in marks)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the threads; a lane stuck in a send past the
        timeout is left behind (its thread is a daemon)."""
        deadline = time.monotonic() + timeout
        stopping = [lane for lane in self._lanes if lane.stop(_left(deadline))]
        if len(stopping) < len(self._lanes):
            log.warning(
                "%d response lanes did not take their stop", len(self._lanes) - len(stopping)
            )
        for lane in stopping:
            lane.join(_left(deadline))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class _Lane:
    """One sending thread and its FIFO."""

    def __init__(self, name: str, max_pending: int) -> None:
        self.live = 0  # requests bound here and not yet ended (ResponseWorker.bind)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def mark(self, timeout: float | None) -> threading.Event | None:
        """An event set once everything queued before it is sent; None if the FIFO stayed
        full past ``timeout``."""
        done = threading.Event()
        try:
            self._queue.put(done.set, timeout=timeout)
        except queue.Full:
            return None
        return done

    def stop(self, timeout: float | None) -> bool:
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return False
        return True

    def join(self, timeout: float | None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            _run_job(job)


def _run_job(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:  # jobs handle their own failures; this one did not: keep the lane
        log.exception("a response job failed")


def _close(sink: ResponseSink) -> None:
    try:
        sink.close()
    except Exception:  # nothing more can be done for this request
        log.warning("a request could not be closed", exc_info=True)


def _joined(waiting: GenerationOutput, newer: GenerationOutput) -> GenerationOutput:
    """A streamed piece still waiting to be sent, with the next one taken in: the text
    joined, the rest (running totals, the finish reason) the newer piece's. Every field
    is named, so a field added to GenerationOutput must say here how it joins."""
    return GenerationOutput(
        text=waiting.text + newer.text,
        finish_reason=newer.finish_reason,
        num_input_tokens=newer.num_input_tokens,
        num_output_tokens=newer.num_output_tokens,
    )


class QueuedSink:
    """A ``ResponseSink`` whose sends go out on a lane of a ``ResponseWorker``.

    A send that fails on the lane's thread marks the sink failed; the loop then sees it
    as cancelled at the next check and frees the sequence. A piece still waiting when the
    next one comes takes it in (module docstring). ``is_cancelled`` is asked inline, on
    the caller's (the loop's) thread.
    """

    def __init__(self, sink: ResponseSink, worker: ResponseWorker) -> None:
        self.sink = sink
        self.failed = False  # a send failed on the lane
        self._worker = worker
        self._lane: _Lane | None = None  # bound when first needed, kept to the end
        self._ended = False  # its last job ran: the lane has one live request less
        self._piece_lock = threading.Lock()
        self._piece: tuple[GenerationOutput, bool] | None = None  # queued, not sent yet

    @property
    def lane(self) -> _Lane:
        if self._lane is None:  # a request refused at submit never takes one
            self._lane = self._worker.bind()
        return self._lane

    def send(self, output: GenerationOutput, final: bool) -> None:
        with self._piece_lock:
            if self._piece is not None:  # still waiting: it takes this one in
                self._piece = (_joined(self._piece[0], output), final)
                return
            self._piece = (output, final)
        self.lane.submit(self._send_piece)

    def send_error(self, message: str) -> None:
        self.lane.submit(lambda: self._deliver(lambda: self.sink.send_error(message), True))

    def close(self) -> None:
        self.lane.submit(lambda: self._deliver(self.sink.close, True, closes=False))

    def is_cancelled(self) -> bool:
        return self.failed or self.sink.is_cancelled()

    def _send_piece(self) -> None:
        with self._piece_lock:
            output, final = self._piece
            self._piece = None
        self._deliver(lambda: self.sink.send(output, final), final)

    def _deliver(self, send: Callable[[], None], final: bool, closes: bool = True) -> None:
        try:
            send()
        except Exception:  # a client gone away: stop generating for it, keep sending
            log.debug("a response could not be sent", exc_info=True)
            self.failed = True
            if final and closes:
                _close(self.sink)
        finally:
            if final and not self._ended:
                self._ended = True
                self._worker.unbind(self.lane)
