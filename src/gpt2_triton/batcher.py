"""The generation loop with in-flight batching: the one place that knows the step order.

Per step, for all live sequences at once:
    admit new requests (within a prompt-token budget) -> drop cancelled ones -> engine
    step (prompts of new sequences, last token of the others) -> sample each row ->
    detokenize the new suffix -> send it -> retire finished sequences (EOS, stop word,
    max_tokens) and free their KV caches.

A new request joins at the next step without waiting for the others to finish; a finished
or cancelled one leaves at once. The engine and the response channel are interfaces
(``EngineClient``, ``ResponseSink``), so the loop runs the same in Triton (an engine in
process or by BLS, decoupled response senders) and in tests (an in-process engine, a list
that collects responses).
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gpt2_triton import names
from gpt2_triton.detokenizer import IncrementalDetokenizer
from gpt2_triton.errors import Gpt2TritonError, RequestValidationError
from gpt2_triton.request import GenerationRequest
from gpt2_triton.sampling import TokenSampler
from gpt2_triton.text import TextCodec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOutput:
    text: str  # stream: the new piece; otherwise the whole text
    finish_reason: str  # "" until the last response
    num_input_tokens: int
    num_output_tokens: int


class ResponseSink(Protocol):
    def send(self, output: GenerationOutput, final: bool) -> None: ...

    def send_error(self, message: str) -> None: ...

    def is_cancelled(self) -> bool: ...


class EngineClient(Protocol):
    def step(
        self, tokens: Sequence[Sequence[int]], sequence_ids: Sequence[int], starts: Sequence[bool]
    ) -> np.ndarray: ...

    def release(self, sequence_ids: Sequence[int]) -> None: ...


class QueueFullError(Gpt2TritonError):
    """More requests wait than the queue holds: the client should retry later."""


@dataclass(frozen=True)
class BatcherLimits:
    max_positions: int  # the model's context window
    eos_token_id: int
    max_active: int = 16  # sequences sharing one engine step
    max_queue: int = 1024  # requests waiting to join
    # Prompt tokens prefilled in one step (a longer prompt still goes alone): a burst of
    # new requests joins over several steps, so running streams stall for one budget's
    # prefill at a time, and the engine's activation memory stays bounded.
    max_prefill_tokens: int = 512


@dataclass
class BatcherStats:
    """Counters the Triton adapter exports as metrics."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by reason
    output_tokens: int = 0
    steps: int = 0
    active: int = 0
    waiting: int = 0
    first_token_seconds_total: float = 0.0
    first_tokens: int = 0
    step_seconds_total: float = 0.0  # whole steps, engine call included
    engine_seconds_total: float = 0.0  # the engine call alone (BLS in Triton)


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: ResponseSink
    sequence_id: int
    prompt_ids: list[int]
    max_tokens: int
    sampler: TokenSampler
    detokenizer: IncrementalDetokenizer
    submitted_at: float
    history: list[int] = field(default_factory=list)  # prompt + generated ids
    generated: int = 0
    started: bool = False  # the engine holds its KV cache

    def output(self, text: str, reason: str = "") -> GenerationOutput:
        return GenerationOutput(text, reason, len(self.prompt_ids), self.generated)


class InflightBatcher:
    def __init__(self, engine: EngineClient, codec: TextCodec, limits: BatcherLimits) -> None:
        self.engine = engine
        self.codec = codec
        self.limits = limits
        self.stats = BatcherStats()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._active: list[_Sequence] = []
        # Random high bits: ids stay unique if this model reloads while the engine lives on.
        self._ids = itertools.count((secrets.randbits(31) << 32) + 1)

    # -- called from the server's request threads ---------------------------------------------
    def submit(self, request: GenerationRequest, sink: ResponseSink) -> None:
        """Tokenize and queue a request; raises RequestValidationError / QueueFullError."""
        prompt_ids = self.codec.encode(request.prompt)
        window = self.limits.max_positions
        room = window - len(prompt_ids)
        if room < 1:
            raise RequestValidationError(
                f"{names.TEXT_INPUT} has {len(prompt_ids)} tokens; the context window is "
                f"{window} tokens, so at most {window - 1} leave room for one new token"
            )
        if request.max_tokens is None:
            max_tokens = min(names.DEFAULT_MAX_TOKENS, room)
        elif request.max_tokens > room:
            raise RequestValidationError(
                f"{names.MAX_TOKENS} ({request.max_tokens}) + {names.TEXT_INPUT} "
                f"({len(prompt_ids)} tokens) exceed the context window of {window} tokens: "
                f"{names.MAX_TOKENS} can be at most {room} for this prompt"
            )
        else:
            max_tokens = request.max_tokens
        if request.min_length > max_tokens:
            raise RequestValidationError(
                f"{names.MIN_LENGTH} ({request.min_length}) is more than {names.MAX_TOKENS} "
                f"({max_tokens})"
            )
        sequence = _Sequence(
            request=request,
            sink=sink,
            sequence_id=next(self._ids),
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampler=TokenSampler(request.sampling),
            detokenizer=IncrementalDetokenizer(self.codec.decode, request.stop_words),
            submitted_at=time.perf_counter(),
            history=list(prompt_ids),
        )
        with self._wake:
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting; retry later"
                )
            self._waiting.append(sequence)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    # -- the loop (one thread) --------------------------------------------------------------
    def wait_for_work(self, timeout: float) -> None:
        """Block until a request arrives (or ``timeout``): the loop's idle state."""
        with self._wake:
            if not self._waiting:
                self._wake.wait(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def step(self) -> bool:
        """One batched step for every live sequence. Returns False when there was none."""
        self._admit()
        self._drop_cancelled()
        if not self._active:
            return False
        batch = list(self._active)
        tokens = [s.history[-1:] if s.started else s.prompt_ids for s in batch]
        step_started = time.perf_counter()
        try:
            logits = self.engine.step(
                tokens, [s.sequence_id for s in batch], [not s.started for s in batch]
            )
        except Exception as exc:  # the engine failed this step: fail its rows, keep serving
            log.exception("engine step failed for %d sequences", len(batch))
            self._fail(batch, f"engine error: {exc}")
            return True
        self.stats.steps += 1
        finished = []
        now = time.perf_counter()
        self.stats.engine_seconds_total += now - step_started
        for row, sequence in enumerate(batch):
            first = not sequence.started
            sequence.started = True
            if first:
                self.stats.first_tokens += 1
                self.stats.first_token_seconds_total += now - sequence.submitted_at
            try:
                if self._advance(sequence, logits[row]):
                    finished.append(sequence)
            except Exception:
                log.exception("sequence %d failed", sequence.sequence_id)
                self._send_error(sequence, "internal error while generating")
                finished.append(sequence)
        self._retire(finished)
        self.stats.step_seconds_total += time.perf_counter() - step_started
        return True

    def shutdown(self) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._fail(self._active + waiting, "the server is shutting down")

    @property
    def active(self) -> int:
        return len(self._active)

    # -- internals --------------------------------------------------------------------------
    def _admit(self) -> None:
        prefill = 0
        with self._wake:
            while self._waiting and len(self._active) < self.limits.max_active:
                cost = len(self._waiting[0].prompt_ids)
                if prefill and prefill + cost > self.limits.max_prefill_tokens:
                    break  # the next step takes it
                prefill += cost
                self._active.append(self._waiting.popleft())
            self.stats.waiting = len(self._waiting)
        self.stats.active = len(self._active)

    def _drop_cancelled(self) -> None:
        cancelled = [s for s in self._active if s.sink.is_cancelled()]
        for sequence in cancelled:
            self._finish(sequence, names.FINISH_CANCELLED, "")
        self._retire(cancelled)

    def _advance(self, sequence: _Sequence, logits: np.ndarray) -> bool:
        """Sample, detokenize, send; True when the sequence is done."""
        if sequence.generated < sequence.request.min_length:
            logits = logits.copy()
            logits[self.limits.eos_token_id] = -np.inf
        token = sequence.sampler(logits, sequence.history)
        if token == self.limits.eos_token_id:
            self._finish(sequence, names.FINISH_STOP, "")
            return True
        sequence.generated += 1
        sequence.history.append(token)
        self.stats.output_tokens += 1
        piece = sequence.detokenizer.add(token)
        if sequence.detokenizer.stopped:
            self._finish(sequence, names.FINISH_STOP, piece)
            return True
        if sequence.generated >= sequence.max_tokens:
            self._finish(sequence, names.FINISH_LENGTH, piece)
            return True
        if sequence.request.stream and piece:
            sequence.sink.send(sequence.output(piece), final=False)
        return False

    def _finish(self, sequence: _Sequence, reason: str, piece: str) -> None:
        detokenizer = sequence.detokenizer
        if reason != names.FINISH_CANCELLED:
            piece += detokenizer.flush()
        if sequence.request.stream:
            text = piece
        elif sequence.request.exclude_input_in_output:
            text = detokenizer.text
        else:
            text = sequence.request.prompt + detokenizer.text
        self.stats.requests[reason] += 1
        try:
            sequence.sink.send(sequence.output(text, reason), final=True)
        except Exception:  # the client may be gone (cancelled); nothing else to do
            log.debug("final response for %d not delivered", sequence.sequence_id)

    def _retire(self, finished: list[_Sequence]) -> None:
        if not finished:
            return
        done = {id(s) for s in finished}
        self._active = [s for s in self._active if id(s) not in done]
        self.stats.active = len(self._active)
        started = [s.sequence_id for s in finished if s.started]
        if started:
            try:
                self.engine.release(started)
            except Exception:
                log.exception("could not release %d sequences", len(started))

    def _fail(self, sequences: list[_Sequence], message: str) -> None:
        for sequence in sequences:
            self._send_error(sequence, message)
            self.stats.requests["error"] += 1
        self._retire(list(sequences))

    @staticmethod
    def _send_error(sequence: _Sequence, message: str) -> None:
        try:
            sequence.sink.send_error(message)
        except Exception:
            log.debug("error response for %d not delivered", sequence.sequence_id)
