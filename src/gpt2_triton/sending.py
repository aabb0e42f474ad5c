"""Responses sent from their own thread, so that sending overlaps the next engine step.

In Triton each streamed response is a message to the server process and back (~0.5 ms
measured on 2 cores). Sent inline, 16 live streams add ~8 ms to every step; sent here,
they go out while the generation loop waits on the next engine call. One thread and one
FIFO keep each request's responses in order, its final one last. A final (or error) send
that raises is followed by the sink's ``close()``, a bare final flag: otherwise the server
would hold the request in flight forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from gpt2_triton.batcher import GenerationOutput, ResponseSink

log = logging.getLogger(__name__)

_STOP = object()


class ResponseWorker:
    """Owns the sending thread. ``wrap(sink)`` gives a sink whose sends are queued here.

    ``max_pending`` bounds the queue: when sends fall behind, the loop blocks on the next
    one instead of piling up responses (and memory) without limit.
    """

    def __init__(self, max_pending: int = 256) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="gpt2-responses", daemon=True)
        self._thread.start()

    def wrap(self, sink: ResponseSink) -> QueuedSink:
        return QueuedSink(sink, self)

    def submit(self, job: Callable[[], None], owner: QueuedSink, final: bool = False) -> None:
        self._queue.put((job, owner, final))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent. False on timeout."""
        done = threading.Event()
        self._queue.put((done.set, None, False))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put((_STOP, None, False))
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job, owner, final = self._queue.get()
            if job is _STOP:
                return
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
    """A ``ResponseSink`` whose sends go through a ``ResponseWorker``.

    A send that fails on the worker thread marks the sink failed; the loop then sees it
    as cancelled at the next step and frees the sequence.
    """

    def __init__(self, sink: ResponseSink, worker: ResponseWorker) -> None:
        self.sink = sink
        self.worker = worker
        self.failed = False

    def send(self, output: GenerationOutput, final: bool) -> None:
        self.worker.submit(lambda: self.sink.send(output, final), self, final)

    def send_error(self, message: str) -> None:
        self.worker.submit(lambda: self.sink.send_error(message), self, final=True)

    def close(self) -> None:
        self.worker.submit(self.sink.close, self)

    def is_cancelled(self) -> bool:
        return self.failed or self.sink.is_cancelled()
