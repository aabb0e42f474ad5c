"""The generation loop with in-flight batching: the one place that knows the step order.

Per step, for all live sequences at once:
    admit new requests and share out a prompt-token budget (chunked prefill: prompts go in
    a chunk a step, in the order they came, so a long prompt or a burst stalls the running
    streams for one budget's prefill per step, more only while fewer streams decode than
    wait to start; those cancelled while waiting leave uncharged) -> drop cancelled ones
    (each stream asked at most as often as ``BatcherLimits`` allows) -> free the caches
    still to release -> engine step (prompts of new sequences, last token of the others;
    if it fails with new rows in it, the running rows again alone and each new row alone,
    to fail only the rows that cause the error) -> sample all rows at once -> detokenize
    the new suffix -> send it -> retire finished sequences (EOS, stop word, max_tokens,
    error) and free their KV caches. With ``decode_ahead`` (the torch engine on a GPU), a
    step whose rows all decoded hands its tokens, still on the device, to the engine's
    ``step_ahead`` before reading them: the next step runs while this one is detokenized
    and sent, and the next engine call takes its logits.

A new request joins at the next step without waiting for the others to finish; a finished
or cancelled one leaves at once. A stateless forward (``submit_forward``: the ``next_token``
step, so that the server holds its weights once) goes through the same steps: its rows
are prompts that end at their logits. Every admitted request gets exactly one final response:
a step never raises (a failure it did not expect fails that step's rows), and the loop's
own thread fails what is left when it stops (``run``). The engine and the response channel
are interfaces (``EngineClient``, ``ResponseSink``), so the loop runs the same in Triton
(an engine in process or by BLS, decoupled response senders) and in tests (an in-process
engine, a list that collects responses).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gpt2_triton import names
from gpt2_triton.detokenizer import IncrementalDetokenizer
from gpt2_triton.engines.protocol import host_logits
from gpt2_triton.errors import EngineError, Gpt2TritonError, RequestValidationError
from gpt2_triton.request import GenerationRequest, check_forward_rows
from gpt2_triton.sampling import SamplingParams, TokenSampler, sample_batch, sample_batch_ahead
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

    def close(self) -> None:
        """End the request with a bare final flag: its final response could not be sent."""


class EngineClient(Protocol):
    def step(
        self, tokens: Sequence[Sequence[int]], sequence_ids: Sequence[int], starts: Sequence[bool]
    ) -> np.ndarray:
        """Each row's next-token logits. A step that raises must change no cache."""

    def release(self, sequence_ids: Sequence[int]) -> None:
        """Free these caches; ids the engine does not hold are ignored."""


class QueueFullError(Gpt2TritonError):
    """More requests wait than the queue holds: the client should retry later."""


class ShuttingDownError(Gpt2TritonError):
    """The server is shutting down and takes no new request."""


# With no stream decoding a step takes this many budgets of prompt tokens: 512 at the
# CPU's budget, so a burst of 16 prompts of 32 tokens goes in in one step, as it did when
# the budget was 512 and the factor 4 (with 4, such bursts kept 0.80-0.85x of the loop's
# tokens/s in two runs, 0.86-0.95x with 8 in four: few, noisy runs). On a GPU (budget
# 512) an idle step is 4096 tokens: not measured there.
IDLE_PREFILL_FACTOR = 8

# An admission window for bursts (``burst_window_s``, BURST_WINDOW_MS; 0 turns it off): the
# first step after the loop ran out of work, when the previous such start brought a burst
# (BURST_MIN_REQUESTS or more requests, each within the window of the one before), waits
# until requests stop arriving for that long (at most BURST_WAIT_S, or until they fill
# every slot, the queue or the step's budget), then takes the burst whole: up to
# BURST_PREFILL_TOKENS in that step (or IDLE_PREFILL_FACTOR budgets if more). Forwards
# (``submit_forward``) never wait and are no arrivals: they stream nothing. Why: the
# server's request thread hands a burst over one request at a time, so a first step taken
# at the first arrival starts that request alone, and its stream then carries every later
# prompt's prefill in its inter-token latency (16 requests of 128 tokens sent at once on
# two cores: the first stream's ITL 66-68 ms, 48-50 ms for every stream of a burst taken
# whole; hand runs, docs/PERFORMANCE.md, 17:25). Those 16 requests reached the batcher over
# 9-26 ms, with gaps of up to 10 ms; with 2 or 4 ms one wave in three still started with
# one or two requests alone, so 6 ms. Why only after a burst: a lone request would pay the
# whole window in its first token, and most chat traffic comes one request at a time. A
# start that waited and got fewer than BURST_MIN_REQUESTS (or the slots, if fewer) in a
# chain, each within the window of the one before, turns the wait off (unless a forward
# ended the wait: then it judged nothing); one that did not wait turns it on when the
# requests it found, or those arriving after it, make such a chain
# (``_let_burst_arrive``, ``_waiting_chain``, ``submit``). Three, not two:
# two unrelated requests 6 ms apart are common at a few requests a second, three in a row
# are not. So a lone request pays the window at most once after a burst, a fresh loop's
# first start waits, and the first burst after lone traffic is split. After a burst of
# BURST_STRAGGLER_MIN_REQUESTS or more, until as many requests have come again, the quiet
# time that ends the wait is BURST_STRAGGLER_FACTOR windows: a gap of more than one window
# inside a burst split one wave in about ten at 16 streams (each split also turning the
# wait off for the next burst: two waves; PERFORMANCE.md, 23:51), and a lone request after
# such a burst pays that longer wait once. Not after smaller bursts: three requests a few
# ms apart happen in random traffic, whose p99 TTFT the longer wait raised (a fake-engine
# simulation, 20-50 requests/s: 15-18 ms -> 27-34 ms). A GPU's default is off: there a
# first token takes ~10 ms, and the window was not measured there.
CPU_BURST_WINDOW_MS = 6
GPU_BURST_WINDOW_MS = 0
BURST_MIN_REQUESTS = 3
BURST_STRAGGLER_FACTOR = 3
BURST_STRAGGLER_MIN_REQUESTS = 2 * BURST_MIN_REQUESTS
BURST_PREFILL_TOKENS = 2048
BURST_WAIT_S = 0.05
# a longer window would never end the wait (the straggler wait, three windows, reaches the
# bound from 17 ms)
MAX_BURST_WINDOW_MS = round(BURST_WAIT_S * 1000)

# Prompt tokens a step takes while streams decode, by where the engine runs. On two CPU
# cores 64 is about one decode step's compute at 16 streams: it kept the stalls at about
# 2x the median gap at 16 streams of 128-token prompts, where 512 let them reach 5-9x, for
# 1-14% of the tokens/s of 16 requests sent at once (ONNX Runtime runs the chunk in the
# decoding rows' own forward; docs/PERFORMANCE.md, 2026-11-28), a cost most of which the
# shared budget (_prefill_budget, 15:12 there) took back. A GPU keeps 512, the budget
# its runs were measured with (its stalls were not measured), and a TensorRT plan takes
# whole prompts (one longer than the budget goes alone).
CPU_PREFILL_TOKENS = 64
GPU_PREFILL_TOKENS = 512


def runs_on_gpu(engine: str, device: str) -> bool:
    """Whether an engine kind on a device setting runs on a GPU: a TensorRT plan always,
    the torch engine on ``cuda``; the defaults that differ by device follow this."""
    return engine == "trt" or device.startswith("cuda")


def default_prefill_tokens(engine: str, device: str) -> int:
    """The prefill budget for an engine kind on a device (``cpu``, ``cuda``...)."""
    return GPU_PREFILL_TOKENS if runs_on_gpu(engine, device) else CPU_PREFILL_TOKENS


def default_burst_window_ms(engine: str, device: str) -> int:
    """The burst window for an engine kind on a device: the CPU's, or off on a GPU."""
    return GPU_BURST_WINDOW_MS if runs_on_gpu(engine, device) else CPU_BURST_WINDOW_MS


# Waiting requests asked whether they were cancelled, a step, when the checks are capped
# (``BatcherLimits.cancel_checks_per_step``): a queue of N cancelled requests empties
# within N steps (plus the interval), at one round trip a step.
WAITING_CANCEL_CHECKS_PER_STEP = 1


@dataclass(frozen=True)
class BatcherLimits:
    max_positions: int  # the model's context window
    eos_token_id: int
    max_active: int = 16  # sequences sharing one engine step
    max_queue: int = 1024  # requests waiting to join
    # Prompt tokens prefilled in one step while streams are decoding: a burst of new
    # requests, or a long prompt, goes in over several steps, so running streams stall for
    # one budget's prefill at a time. A step takes one budget per starting stream per
    # decoding one, up to IDLE_PREFILL_FACTOR budgets, which it takes with none decoding
    # (the engine's activation memory stays bounded by that, or by BURST_PREFILL_TOKENS
    # with a burst window): ``_prefill_budget``. The default is the CPU's
    # (``default_prefill_tokens``).
    max_prefill_tokens: int = CPU_PREFILL_TOKENS
    # After the loop ran out of work, and the previous such start brought a burst, how long
    # its first step lets a burst arrive (quiet time since the last request; 0: never) and
    # waits at most (``_let_burst_arrive``).
    burst_window_s: float = CPU_BURST_WINDOW_MS / 1000
    burst_wait_s: float = BURST_WAIT_S
    # Whether a prompt may be split across steps (chunked prefill). An engine that cannot
    # take several new tokens on a non-empty cache (a TensorRT plan: trt_profiles.py) gets
    # whole prompts, and one longer than the budget goes alone.
    chunked_prefill: bool = True
    # Asking a client's request whether it was cancelled can cost a round trip (Triton: a
    # message to the server process and back, per stream). 0 and 0 ask every stream every
    # step. Otherwise a stream is asked at most once per interval, and at most that many
    # streams a step, those asked longest ago first: a cancelled stream leaves within
    # max(interval, ceil(active / per step) steps) plus one step.
    cancel_check_interval_s: float = 0.0
    cancel_checks_per_step: int = 0  # 0: no cap
    vocab_size: int = 0  # the engine's, to check a forward's token ids; 0: the engine checks
    # Whether a step whose rows all decode runs the next one ahead (``step_ahead``): its
    # tokens, sampled on the device, go straight into the next step, queued on the GPU
    # before the host reads, detokenizes and sends them. Only an engine that can
    # (``decodes_ahead``: the torch engine's static decode steps) does.
    decode_ahead: bool = False


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
    idle_hooks: int = 0  # times the loop ran out of work and ran its idle hook
    burst_windows: int = 0  # first steps after the loop ran out of work that held the window
    steps_ahead: int = 0  # steps whose next one was queued before their tokens were read


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
    arrived_at: float = 0.0  # the batcher's clock at submit (a burst's chain of arrivals)
    history: list[int] = field(default_factory=list)  # prompt + generated ids
    generated: int = 0
    prefilled: int = 0  # prompt tokens the engine holds
    chunk: int = 0  # prompt tokens this step gives it
    started: bool = False  # its whole prompt is in: it decodes a token a step
    cancel_checked_at: float = 0.0  # time.monotonic() of the last is_cancelled() asked
    ended: bool = False  # its final response was sent: nothing more goes out

    job: _ForwardJob | None = None  # a row of a stateless forward: it ends at its logits
    job_row: int = 0

    def output(self, text: str, reason: str = "") -> GenerationOutput:
        return GenerationOutput(text, reason, len(self.prompt_ids), self.generated)

    @property
    def holds_cache(self) -> bool:
        return self.started or self.prefilled > 0

    def engine_tokens(self) -> list[int]:
        if self.started:
            return self.history[-1:]
        return self.prompt_ids[self.prefilled : self.prefilled + self.chunk]


# logits (rows, vocab) of a forward, or the exception that failed it (ShuttingDownError;
# anything else: internal; a bad input is refused by submit_forward, before it queues)
ForwardReply = Callable[[np.ndarray | None, Exception | None], None]


class _ForwardJob:
    """A stateless forward whose rows run as prompts; it answers once, when every row has
    its logits or the first row fails (the other rows then leave at their next turn)."""

    def __init__(self, rows: int, reply: ForwardReply) -> None:
        self.logits: np.ndarray | None = None
        self.left = rows
        self.reply = reply
        self.answered = False

    def row_done(self, row: int, logits: np.ndarray) -> None:
        if self.answered:
            return
        if self.logits is None:
            self.logits = np.empty((self.left, logits.shape[-1]), np.float32)
        self.logits[row] = logits
        self.left -= 1
        if self.left == 0:
            self._answer(self.logits, None)

    def fail(self, error: Exception) -> None:
        if not self.answered:
            self._answer(None, error)

    def _answer(self, logits, error) -> None:
        self.answered = True
        try:
            self.reply(logits, error)
        except Exception:  # the caller may be gone: nothing more to do for it
            log.warning("a forward's answer could not be delivered", exc_info=True)


class _ForwardRowSink:
    """A forward row's ResponseSink: it sends nothing; a row that ends early fails the job."""

    def __init__(self, job: _ForwardJob) -> None:
        self.job = job

    def send(self, output: GenerationOutput, final: bool) -> None:
        self.job.fail(Gpt2TritonError("the forward was cancelled"))

    def send_error(self, message: str) -> None:
        self.job.fail(Gpt2TritonError(message))

    def is_cancelled(self) -> bool:
        return self.job.answered  # a failed job's other rows leave

    def close(self) -> None:
        pass


_FORWARD_SAMPLING = SamplingParams(temperature=0)  # never used: forward rows are not sampled


class InflightBatcher:
    def __init__(self, engine: EngineClient, codec: TextCodec, limits: BatcherLimits) -> None:
        self.engine = engine
        self.codec = codec
        self.limits = limits
        self.stats = BatcherStats()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False  # shut down: submit() refuses
        self._clock = time.monotonic  # of arrivals and the burst window (tests set their own)
        self._last_arrival = 0.0  # self._clock() of the newest submit
        self._idle = True  # the last step found no work: the next may wait for a burst
        # whether the last idle start brought a burst (at first: assume so), so the next one
        # waits; the requests of a start that did not wait so far, while arrivals keep
        # within the window of each other (0: none watched); whether this step holds the
        # window (its budget: BURST_PREFILL_TOKENS; set by _let_burst_arrive, cleared by
        # the next step)
        self._bursty = True
        self._burst_chain = 0
        # the requests the last burst brought (if BURST_STRAGGLER_MIN_REQUESTS or more, a
        # held window's quiet time is BURST_STRAGGLER_FACTOR windows until they have come
        # again); at first: one
        self._burst_seen = 1
        self._taking_burst = False
        self._stop: threading.Event | None = None  # run()'s: a burst window ends on it
        self._active: list[_Sequence] = []
        # Ids of ended sequences whose caches the engine may still hold: kept until a release
        # succeeds (a BLS call can fail), so leaked rows never fill the engine's max_sequences.
        self._to_release: set[int] = set()
        # Random high bits: ids stay unique if this model reloads while the engine lives on.
        self._ids = itertools.count((secrets.randbits(31) << 32) + 1)
        self._decode_ahead = limits.decode_ahead and bool(getattr(engine, "decodes_ahead", False))
        if limits.decode_ahead and not self._decode_ahead:
            log.warning("decode_ahead asked for, but this engine cannot decode ahead: off")

    # -- called from the server's request threads ---------------------------------------------
    def submit(self, request: GenerationRequest, sink: ResponseSink) -> None:
        """Tokenize and queue a request.

        Raises RequestValidationError, QueueFullError, or ShuttingDownError after shutdown.
        """
        window = self.limits.max_positions
        # Tokenizing megabytes takes seconds, in the server's request thread: a prompt longer
        # than any `window` tokens can spell is refused before it is tokenized.
        most = window * self.codec.max_token_bytes
        if len(request.prompt) > most:
            raise RequestValidationError(
                f"{names.TEXT_INPUT} has {len(request.prompt)} characters: more than the "
                f"context window of {window} tokens can hold (at most {most})"
            )
        prompt_ids = self.codec.encode(request.prompt)
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
            sampler=TokenSampler(request.sampling, prompt_ids),
            detokenizer=IncrementalDetokenizer(self.codec.decode, request.stop_words),
            submitted_at=time.perf_counter(),
            history=list(prompt_ids),
        )
        with self._wake:
            if self._closed:  # nothing would ever step it: refuse now rather than hang
                raise ShuttingDownError(f"{names.SHUTTING_DOWN}; retry on another one")
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFullError(f"{len(self._waiting)} {names.QUEUE_FULL}")
            self._waiting.append(sequence)
            now = sequence.arrived_at = self._clock()
            if self._burst_chain:  # counting the arrivals after a start that did not wait
                if now - self._last_arrival < self.limits.burst_window_s:
                    self._burst_chain += 1
                else:
                    self._burst_chain = 0  # the chain broke: it ends here
                if self._burst_chain >= self._burst_size:  # a burst: counted to its end
                    self._saw_burst(self._burst_chain)
            self._last_arrival = now
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    def submit_forward(self, tokens: Sequence[Sequence[int]], reply: ForwardReply) -> None:
        """Queue a stateless forward: ``reply`` gets each row's last-token logits, from the
        loop's thread. Its rows join the step like prompts (in chunks, within the prefill
        budget), so a forward of many long rows stalls the streams no more than prompts do;
        their caches are freed as soon as their logits are out.

        Raises RequestValidationError, QueueFullError, or ShuttingDownError after shutdown.
        """
        check_forward_rows(
            tokens, self.limits.max_active, self.limits.max_positions, self.limits.vocab_size
        )
        job = _ForwardJob(len(tokens), reply)
        now = time.perf_counter()
        rows = [
            _Sequence(
                request=GenerationRequest("", max_tokens=1, sampling=_FORWARD_SAMPLING),
                sink=_ForwardRowSink(job),
                sequence_id=next(self._ids),
                prompt_ids=list(toks),
                max_tokens=1,
                sampler=None,  # type: ignore[arg-type]
                detokenizer=None,  # type: ignore[arg-type]
                submitted_at=now,
                job=job,
                job_row=row,
            )
            for row, toks in enumerate(tokens)
        ]
        with self._wake:
            if self._closed:
                raise ShuttingDownError(f"{names.SHUTTING_DOWN}; retry on another one")
            if len(self._waiting) + len(rows) > self.limits.max_queue:
                raise QueueFullError(f"{len(self._waiting)} {names.QUEUE_FULL}")
            self._waiting.extend(rows)  # not an arrival a burst window waits on
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    # -- the loop (one thread) --------------------------------------------------------------
    def run(
        self,
        stop: threading.Event,
        tick: Callable[[], None] = lambda: None,
        on_idle: Callable[[], None] = lambda: None,
        idle_after_s: float = 0.0,
    ) -> None:
        """Run the loop in this thread until ``stop`` is set (set it, then call ``wake()``).

        Then shut down here, in the one thread that touches the sequences, so the shutdown
        never races a step. ``tick`` runs after every step (metrics); ``on_idle`` once each
        time the loop has had no work for ``idle_after_s`` (the Triton adapter gives freed
        memory back then).
        """
        owed = False  # work was done since on_idle last ran
        last_work = 0.0
        self._stop = stop
        try:
            while not stop.is_set():
                worked = self.step()
                try:
                    tick()
                    now = time.monotonic()
                    if worked:
                        owed, last_work = True, now
                    elif owed and now - last_work >= idle_after_s:
                        owed = False
                        on_idle()
                        self.stats.idle_hooks += 1
                except Exception:
                    log.exception("the loop's tick or idle hook failed")
                if not worked:
                    self.wait_for_work(0.05)
        finally:
            self.shutdown()

    def wait_for_work(self, timeout: float) -> None:
        """Block until a request arrives (or ``timeout``): the loop's idle state."""
        with self._wake:
            if not self._waiting:
                self._wake.wait(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def step(self) -> bool:
        """One batched step for every live sequence. Returns False when there was none.

        Never raises: a failure no other path handles fails the rows of this step, each
        with one error response, and frees their caches; the loop goes on.
        """
        try:
            return self._step()
        except Exception:
            log.exception("step failed unexpectedly for %d sequences", len(self._active))
            self._abort(list(self._active), "internal error while generating")
            return True

    def shutdown(self) -> None:
        """Fail every request still active or waiting; later submits raise ShuttingDownError.

        Only from the loop's thread, between steps (``run`` calls it).
        """
        message = names.SHUTTING_DOWN
        with self._wake:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self.stats.waiting = 0
        for sequence in waiting:
            self._end_with_error(sequence, message)
        self._abort(list(self._active), message)

    @property
    def active(self) -> int:
        return len(self._active)

    # -- the step, in order -----------------------------------------------------------------
    def _step(self) -> bool:
        self._taking_burst = False  # this step's _let_burst_arrive sets it
        if self._idle and not self._let_burst_arrive():
            return False  # nothing waits, or stopping: run() ends, its shutdown fails them
        self._admit()
        self._drop_cancelled()
        self._idle = not self._active
        if not self._active:
            with self._wake:  # that start's requests are over: the next arrival starts anew
                self._burst_chain = 0
            return False
        self._release_pending()
        batch = [s for s in self._active if s.started or s.chunk]
        if not batch:  # every one admitted was cancelled before its first chunk
            return True
        step_started = time.perf_counter()
        outcomes = self._engine_step(batch)
        now = time.perf_counter()
        self.stats.steps += 1
        self.stats.engine_seconds_total += now - step_started
        finished = []
        # every row decoded (none starting, no forward's): the next step can run ahead
        ahead = self._decode_ahead and len(outcomes) == 1 and all(s.started for s in batch)
        for rows, logits in outcomes:
            if isinstance(logits, Exception):
                finished += self._fail_rows(rows, f"engine error: {logits}", logits)
            else:
                finished += self._advance_rows(rows, logits, now, ahead)
        self._retire(finished)
        self.stats.step_seconds_total += time.perf_counter() - step_started
        return True

    def _let_burst_arrive(self) -> bool:
        """The first step after the loop ran out of work, with only generation requests
        waiting (a forward streams nothing: it never waits, nor do those beside it), when
        the previous such start brought a burst: wait until none has arrived for
        ``burst_window_s`` (BURST_STRAGGLER_FACTOR times that while fewer wait than the
        last burst brought, if that was BURST_STRAGGLER_MIN_REQUESTS or more; at most
        ``burst_wait_s``, or until the waiting requests fill every slot, the queue or the
        burst's prompt budget), and let this step take up to
        BURST_PREFILL_TOKENS. The server's request thread hands over a burst one request at
        a time, and a first step taken at the first arrival would start that one alone. A
        start brought a burst when ``_burst_size`` or more came, each within the window of
        the one before (``_waiting_chain``; ``submit`` counts those after a start that did
        not wait). A forward that arrives during the wait ends it at once and judges
        nothing: the wait stays on and the last burst's size stands.
        Returns False when nothing waits (the step admits nothing, so that a request
        arriving now meets the window in the next) or ``run()``'s stop was set meanwhile."""
        quiet = self.limits.burst_window_s
        if not quiet:  # (an idle loop has no stream running)
            return True
        full = self._burst_most
        with self._wake:
            if not self._waiting:
                return False
            if any(s.job for s in self._waiting):
                return True
            if not self._bursty:  # start at once, and count the arrivals that follow
                chain = self._burst_chain = self._waiting_chain()
                if chain >= self._burst_size:
                    self._saw_burst(chain)
                return True
            self._burst_chain = 0
            self._taking_burst = True
            self.stats.burst_windows += 1
            budget = self._prefill_budget()  # the burst's: no stream decodes
            deadline = self._clock() + self.limits.burst_wait_s
            widest = quiet  # the longest quiet time the wait allowed
            while self._waiting and not any(s.job for s in self._waiting):
                if self._stop is not None and self._stop.is_set():
                    return False
                now = self._clock()
                gap = quiet
                seen = self._burst_seen
                if seen >= BURST_STRAGGLER_MIN_REQUESTS and len(self._waiting) < seen:
                    gap = quiet * BURST_STRAGGLER_FACTOR  # more of a big burst may be coming
                widest = max(widest, gap)
                until = min(self._last_arrival + gap, deadline)
                if now >= until or len(self._waiting) >= full:
                    break
                if sum(len(s.prompt_ids) for s in self._waiting) >= budget:
                    break  # no later request would fit in this step
                self._wake.wait(until - now)
            if any(s.job for s in self._waiting):
                # a forward ended the wait early: the requests come so far are no measure
                # of the burst, so the wait stays on and the last burst's size stands
                return True
            # a burst's requests, each within the gap the wait allowed of the one before (a
            # straggler it waited for is one of them)
            chain = self._waiting_chain(widest)
            self._bursty, self._burst_seen = chain >= self._burst_size, chain
        return True

    def _saw_burst(self, chain: int) -> None:
        """A chain of arrivals after a start that did not wait is a burst of ``chain``
        requests: the next idle start waits for a burst, longer while fewer than these
        have come (BURST_STRAGGLER_MIN_REQUESTS or more; the chain counted at most to the
        slots, as it can run on under load)."""
        self._bursty, self._burst_seen = True, min(chain, self._burst_most)

    @property
    def _burst_size(self) -> int:
        """Requests that make a burst: BURST_MIN_REQUESTS, or fewer if the slots or the
        queue hold fewer (a held start could not keep the wait on otherwise)."""
        return min(BURST_MIN_REQUESTS, self._burst_most)

    @property
    def _burst_most(self) -> int:
        """The most requests a held window can take: the slots, or the queue if smaller
        (a chain of arrivals under steady load can run on past them)."""
        return min(self.limits.max_active, self.limits.max_queue)

    def _waiting_chain(self, within: float = 0.0) -> int:
        """How many waiting generation requests, counted back from the newest, arrived
        each within ``within`` (by default the window) of the one before (under
        ``self._wake``): those found at a start may have piled up apart while the loop was
        busy elsewhere."""
        within = within or self.limits.burst_window_s
        chain, later = 0, None
        for sequence in reversed(self._waiting):
            if sequence.job:
                continue
            if later is not None and later - sequence.arrived_at >= within:
                break
            chain, later = chain + 1, sequence.arrived_at
        return chain

    def _admit(self) -> None:
        """Share this step's prompt budget (``_prefill_budget``): first the prompts already
        going in, then new requests while budget and room are left, each in the order they
        came."""
        budget = full = self._prefill_budget()
        for sequence in self._active:
            sequence.chunk = 0
            if not sequence.started:
                budget = self._give_chunk(sequence, budget, full)
        gone = []
        with self._wake:
            while self._waiting and len(self._active) < self.limits.max_active and budget:
                head = self._waiting[0]
                if _is_gone(head):  # cancelled while waiting: costs no budget
                    gone.append(self._waiting.popleft())
                    continue
                budget = self._give_chunk(head, budget, full)
                if not head.chunk:
                    break  # the next step takes it
                head.cancel_checked_at = time.monotonic()  # just asked
                self._active.append(self._waiting.popleft())
            self.stats.waiting = len(self._waiting)
        self.stats.active = len(self._active)
        for sequence in gone:
            self._finish(sequence, names.FINISH_CANCELLED, "")

    def _prefill_budget(self) -> int:
        """This step's prompt tokens: one ``max_prefill_tokens`` for each stream that wants
        to start (prompts going in, requests waiting with room to join) per stream that
        decodes, at least one and at most IDLE_PREFILL_FACTOR (that many with none
        decoding, or BURST_PREFILL_TOKENS if more in the step that holds the burst window).
        A step's prefill stalls every decoding stream by its compute and brings every
        starting stream a step nearer its first token: in a burst's first steps, when a few
        streams decode and many wait, the few stall longer so that the many start sooner;
        once as many decode as start, each stall is one budget's compute."""
        budget = self.limits.max_prefill_tokens
        idle = budget * IDLE_PREFILL_FACTOR  # no stream to stall
        if self._taking_burst:
            idle = max(idle, BURST_PREFILL_TOKENS)
        decoding = sum(s.started for s in self._active)
        if not decoding:
            return idle
        filling = len(self._active) - decoding
        with self._wake:
            room = max(self.limits.max_active - len(self._active), 0)
            queued = min(len(self._waiting), room)
        factor = min(IDLE_PREFILL_FACTOR, max(1, (filling + queued) // decoding))
        return budget * factor

    def _give_chunk(self, sequence: _Sequence, budget: int, full: int) -> int:
        """Set the prompt tokens ``sequence`` takes this step out of ``budget`` (of ``full``
        this step); return the rest."""
        remaining = len(sequence.prompt_ids) - sequence.prefilled
        if self.limits.chunked_prefill:
            sequence.chunk = min(remaining, budget)
        elif remaining <= budget or budget == full:
            sequence.chunk = remaining  # whole prompts; a longer one than the budget alone
        else:
            sequence.chunk = 0
        return max(budget - sequence.chunk, 0)

    def _drop_cancelled(self) -> None:
        """End the cancelled requests: the running ones, and the waiting ones too, so that
        a full batch does not leave a client's cancel unanswered (and its place in the
        queue taken, where live requests get QueueFullError) until a slot frees."""
        per_step = self.limits.cancel_checks_per_step
        cancelled = [s for s in self._due_for_cancel_check(self._active, per_step) if _is_gone(s)]
        for sequence in cancelled:
            self._finish(sequence, names.FINISH_CANCELLED, "")
        self._retire(cancelled)
        if not self._waiting:  # (only this thread empties it; an arrival waits a step)
            return
        # One waiting request a step, where the checks are capped: each is a round trip
        # that the running streams wait on, and a full queue is when they matter most.
        waiting_per_step = min(per_step, WAITING_CANCEL_CHECKS_PER_STEP)
        with self._wake:  # picked in one pass over the queue, not a copy of it
            due = self._due_for_cancel_check(self._waiting, waiting_per_step)
        left = [s for s in due if _is_gone(s)]  # (the round trips outside the lock)
        if left:
            with self._wake:  # only this thread takes requests out of the queue
                for sequence in left:
                    self._waiting.remove(sequence)
                self.stats.waiting = len(self._waiting)
            for sequence in left:
                self._finish(sequence, names.FINISH_CANCELLED, "")

    def _due_for_cancel_check(
        self, sequences: Iterable[_Sequence], per_step: int
    ) -> list[_Sequence]:
        """Those of ``sequences`` to ask this step: not asked within the limits' interval,
        at most ``per_step`` (0: no cap), those asked longest ago first."""
        interval = self.limits.cancel_check_interval_s
        if not interval and not per_step:
            return list(sequences)
        now = time.monotonic()
        if per_step:
            # the ones asked longest ago, then those of them due: the due ones are the first
            # in that order (sorted()[:per_step] without sorting: the queue may hold 1000s)
            sequences = heapq.nsmallest(per_step, sequences, key=lambda s: s.cancel_checked_at)
        due = [s for s in sequences if now - s.cancel_checked_at >= interval]
        for sequence in due:
            sequence.cancel_checked_at = now
        return due

    def _engine_step(
        self, batch: list[_Sequence]
    ) -> list[tuple[list[_Sequence], np.ndarray | Exception]]:
        """``[(rows, their logits or the exception that failed them)]`` covering ``batch``.

        One engine call for the whole batch. When it fails with new rows in it, the running
        rows go again alone and each new row alone (a failed step changes no cache), so a
        prompt the engine rejects fails alone and the running streams carry on.
        """
        try:
            return [(batch, self._call_engine(batch))]
        except Exception as exc:
            log.exception("engine step failed for %d sequences", len(batch))
            error = exc
        running = [s for s in batch if s.started]
        groups = ([running] if running else []) + [[s] for s in batch if not s.started]
        if len(groups) == 1:
            return [(batch, error)]
        outcomes = []
        for rows in groups:
            try:
                outcomes.append((rows, self._call_engine(rows)))
            except Exception as exc:
                log.exception("engine step failed again for %d of them", len(rows))
                outcomes.append((rows, exc))
        return outcomes

    def _call_engine(self, rows: list[_Sequence]) -> np.ndarray:
        tokens = [s.engine_tokens() for s in rows]
        logits = self.engine.step(
            tokens, [s.sequence_id for s in rows], [not s.holds_cache for s in rows]
        )
        if len(logits) != len(rows):
            raise EngineError(f"the engine returned {len(logits)} rows of logits for {len(rows)}")
        return logits

    def _advance_rows(
        self, rows: list[_Sequence], logits: np.ndarray, now: float, ahead: bool = False
    ) -> list[_Sequence]:
        finished = []
        ready = []  # rows that decoded, or whose last prompt chunk went in: they sample
        for row, sequence in enumerate(rows):
            if not sequence.started:
                sequence.prefilled += sequence.chunk
                if sequence.prefilled < len(sequence.prompt_ids):
                    continue  # more of its prompt next step
            ready.append(row)
        for row in [r for r in ready if rows[r].job]:  # a forward's row: its logits, done
            sequence = rows[row]
            sequence.ended = True
            sequence.job.row_done(sequence.job_row, host_logits(logits[row]))
            finished.append(sequence)
        ready = [r for r in ready if not rows[r].job]
        if len(ready) < len(rows):
            rows, logits = [rows[r] for r in ready], logits[ready]
        if not rows:
            return finished
        tokens = self._sample_ahead(rows, logits) if ahead else self._sample(rows, logits)
        for sequence, token in zip(rows, tokens, strict=True):
            if not sequence.started:
                sequence.started = True
                self.stats.first_tokens += 1
                self.stats.first_token_seconds_total += now - sequence.submitted_at
            if token is None:  # its row could not be sampled (logged)
                self._end_with_error(sequence, "internal error while generating")
                finished.append(sequence)
                continue
            try:
                if self._advance(sequence, token):
                    finished.append(sequence)
            except Exception:
                log.exception("sequence %d failed", sequence.sequence_id)
                self._end_with_error(sequence, "internal error while generating")
                finished.append(sequence)
        return finished

    def _sample(self, rows: list[_Sequence], logits: np.ndarray) -> list[int | None]:
        """Each row's next token, all rows in one call; None for a row that failed.

        When the call fails, each row alone, so that only the rows that cause the failure
        fail. A call that fails has taken no draw from any generator (sampling.py), so the
        rows sampled again keep their seeded streams.
        """
        suppressed = self._suppressed(rows)
        try:
            return sample_batch(logits, [s.sampler for s in rows], suppressed).tolist()
        except Exception:
            log.exception("sampling failed for %d rows; sampling them one by one", len(rows))
        tokens: list[int | None] = []
        for row, sequence in enumerate(rows):
            try:
                tokens.append(sequence.sampler(logits[row], suppressed[row]))
            except Exception:
                log.exception("sequence %d could not be sampled", sequence.sequence_id)
                tokens.append(None)
        return tokens

    def _suppressed(self, rows: list[_Sequence]) -> list[int | None]:
        """Each row's token it must not produce: end-of-text before its min_length."""
        eos = self.limits.eos_token_id
        return [eos if s.generated < s.request.min_length else None for s in rows]

    def _sample_ahead(self, rows: list[_Sequence], logits) -> list[int | None]:
        """``_sample``, with the engine's next step queued behind the tokens before they
        are read (``BatcherLimits.decode_ahead``)."""
        ids, suppressed = [s.sequence_id for s in rows], self._suppressed(rows)
        try:
            tokens, launched = sample_batch_ahead(
                logits, [s.sampler for s in rows], suppressed,
                lambda tokens: self.engine.step_ahead(ids, tokens),
            )  # fmt: skip
            self.stats.steps_ahead += launched
            return tokens
        except Exception:  # raised before anything ran ahead: every generator as it was
            log.exception("sampling %d rows ahead failed; sampling them as usual", len(rows))
        return self._sample(rows, logits)

    def _advance(self, sequence: _Sequence, token: int) -> bool:
        """Detokenize, send; True when the sequence is done."""
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
        if sequence.ended:
            return
        sequence.ended = True
        if sequence.job:  # cancelled: its job failed first, or is failed now
            sequence.job.fail(Gpt2TritonError("the forward was cancelled"))
            return
        detokenizer = sequence.detokenizer
        if reason != names.FINISH_CANCELLED:
            piece += detokenizer.flush()
            if detokenizer.stopped:  # the stop word was only complete with the last token
                reason = names.FINISH_STOP
        if sequence.request.stream:
            text = piece
        elif sequence.request.exclude_input_in_output:
            text = detokenizer.text
        else:
            text = sequence.request.prompt + detokenizer.text
        self.stats.requests[reason] += 1
        try:
            sequence.sink.send(sequence.output(text, reason), final=True)
        except Exception:  # the client may be gone (cancelled): end the request bare
            log.debug("final response for %d not delivered", sequence.sequence_id)
            _close(sequence)

    # -- failures and freeing caches ----------------------------------------------------------
    def _fail_rows(
        self, rows: list[_Sequence], message: str, cause: Exception | None = None
    ) -> list[_Sequence]:
        """Rows an engine step failed: each gets the error, and their caches are freed.

        The engine may hold a new row's cache all the same (a BLS call that failed after the
        step ran), so new rows are released too.
        """
        for sequence in rows:
            self._end_with_error(sequence, message, cause)
        self._to_release.update(s.sequence_id for s in rows if not s.started)
        return rows

    def _abort(self, sequences: list[_Sequence], message: str) -> None:
        """End active ``sequences`` with an error (those without a final yet), free caches.

        Whatever state an unexpected failure left them in: started or not, all are released.
        """
        for sequence in sequences:
            self._end_with_error(sequence, message)
        self._to_release.update(s.sequence_id for s in sequences)
        self._retire(sequences)

    def _retire(self, finished: list[_Sequence]) -> None:
        if not finished:
            return
        done = {id(s) for s in finished}
        self._active = [s for s in self._active if id(s) not in done]
        self.stats.active = len(self._active)
        self._to_release.update(s.sequence_id for s in finished if s.holds_cache)
        self._release_pending()

    def _release_pending(self) -> None:
        """Free the caches of ended sequences; a release that fails is tried again.

        At the next step (the engine ignores ids it does not hold), so no cache leaks.
        """
        if not self._to_release:
            return
        ids = sorted(self._to_release)
        try:
            self.engine.release(ids)
        except Exception:
            log.exception("could not release %d sequences; will retry", len(ids))
            return
        self._to_release.difference_update(ids)

    def _end_with_error(
        self, sequence: _Sequence, message: str, cause: Exception | None = None
    ) -> None:
        """``cause``: the engine's exception, where it failed the step."""
        if sequence.ended:
            return
        sequence.ended = True
        if sequence.job:
            sequence.job.fail(_forward_failure(sequence, message, cause))
            return
        self.stats.requests["error"] += 1
        try:
            sequence.sink.send_error(message)
        except Exception:
            log.debug("error response for %d not delivered", sequence.sequence_id)
            _close(sequence)


def _forward_failure(sequence: _Sequence, message: str, cause: Exception | None) -> Exception:
    """What a forward's row failed with, named by the forward's own row. The engine numbers
    the rows of its call, and a row that fails goes to the engine alone (``_engine_step``),
    so its "row 0" is that row. Still the server's failure (the adapter's INTERNAL): the
    input was checked on the way in (``check_forward_rows``), and an EngineError here may
    be anything from the engine's state to an engine model that is gone."""
    if message == names.SHUTTING_DOWN:
        return ShuttingDownError(message)
    if cause is not None:
        detail = re.sub(r"^row \d+: ", "", str(cause))
        return Gpt2TritonError(f"row {sequence.job_row}: engine error: {detail}")
    return Gpt2TritonError(message)


def _is_gone(sequence: _Sequence) -> bool:
    """Cancelled by its client; a sink that cannot even tell is treated as gone."""
    try:
        return bool(sequence.sink.is_cancelled())
    except Exception:
        log.warning("is_cancelled failed for %d: dropping it", sequence.sequence_id, exc_info=True)
        return True


def _close(sequence: _Sequence) -> None:
    try:
        sequence.sink.close()
    except Exception:  # nothing more can be done for this request
        log.warning("request %d could not be closed", sequence.sequence_id, exc_info=True)
