"""The generation loop on the real tiny engine (ONNX Runtime) with in-memory sinks."""

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from gpt2_triton.batcher import (
    BURST_MIN_REQUESTS,
    BURST_PREFILL_TOKENS,
    BURST_STRAGGLER_FACTOR,
    BURST_STRAGGLER_MIN_REQUESTS,
    CPU_PREFILL_TOKENS,
    GPU_PREFILL_TOKENS,
    IDLE_PREFILL_FACTOR,
    BatcherLimits,
    GenerationOutput,
    InflightBatcher,
    QueueFullError,
    ShuttingDownError,
    default_prefill_tokens,
)
from gpt2_triton.engines.factory import build_engine
from gpt2_triton.errors import EngineError, Gpt2TritonError, RequestValidationError
from gpt2_triton.names import SHUTTING_DOWN
from gpt2_triton.request import GenerationRequest
from gpt2_triton.sampling import SamplingParams
from gpt2_triton.sending import (
    CPU_RESPONSE_LANES,
    GPU_RESPONSE_LANES,
    ResponseWorker,
    default_response_lanes,
)
from gpt2_triton.text import TextCodec

GREEDY = SamplingParams(temperature=0)


@dataclass
class ListSink:
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    finals: int = 0  # final responses, errors and bare closes included: must end at 1
    broken_cancel_check: bool = False  # is_cancelled() raises
    broken_final: bool = False  # a final send raises
    cancel_checks: int = 0  # is_cancelled() calls

    def send(self, output: GenerationOutput, final: bool) -> None:
        if final and self.broken_final:
            raise RuntimeError("response could not be sent")
        self.outputs.append(output)
        self.done = final
        self.finals += final

    def send_error(self, message: str) -> None:
        self.errors.append(message)
        self.done = True
        self.finals += 1

    def is_cancelled(self) -> bool:
        self.cancel_checks += 1
        if self.broken_cancel_check:
            raise RuntimeError("cannot tell")
        return self.cancelled

    def close(self) -> None:
        self.done = True
        self.finals += 1

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


@pytest.fixture()
def engine(tiny_export):
    return build_engine("onnx", tiny_export, max_sequences=16)


@pytest.fixture()
def codec(tiny_export):
    return TextCodec(tiny_export / "tokenizer")


def limits(engine, **kwargs):
    return BatcherLimits(engine.shape.max_positions, engine.shape.eos_token_id, **kwargs)


@pytest.fixture()
def batcher(engine, codec):
    return InflightBatcher(engine, codec, limits(engine, max_active=4, max_queue=8))


def run_all(batcher, sinks, limit=500):
    for _ in range(limit):
        if all(s.done for s in sinks):
            return
        batcher.step()
    raise AssertionError("generation did not finish")


def test_greedy_matches_hugging_face_generate(batcher, tiny_hf_model, tiny_tokenizer):
    import torch

    prompt = "The old man"
    sink = ListSink()
    batcher.submit(
        GenerationRequest(prompt, max_tokens=20, sampling=GREEDY, exclude_input_in_output=True),
        sink,
    )
    run_all(batcher, [sink])
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    ref = tiny_hf_model.generate(
        ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    assert sink.text == tiny_tokenizer.decode(ref[0, ids.shape[1] :])
    assert sink.outputs[-1].finish_reason == "length"
    assert sink.outputs[-1].num_output_tokens == 20


def test_more_requests_than_slots_each_equal_their_solo_output(batcher, engine):
    prompts = [
        "The cat",
        "A small bird looks at",
        "The chef at the café",
        "Our neighbour",
        "The teacher writes",
        "My sister dreams of",
    ]

    def request(p):
        return GenerationRequest(p, max_tokens=15, sampling=GREEDY, stream=True)

    solo = []
    for p in prompts:
        sink = ListSink()
        batcher.submit(request(p), sink)
        run_all(batcher, [sink])
        solo.append(sink.text)
    sinks = [ListSink() for _ in prompts]
    for i, (p, s) in enumerate(zip(prompts, sinks, strict=True)):
        batcher.submit(request(p), s)
        if i % 2:
            batcher.step()  # arrivals in the middle of running steps
    run_all(batcher, sinks)
    assert [s.text for s in sinks] == solo
    assert engine.cached_sequences == 0


def test_cancel_frees_the_cache_at_the_next_step(batcher, engine):
    sink = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=100, sampling=GREEDY, stream=True), sink)
    for _ in range(3):
        batcher.step()
    assert engine.cached_sequences == 1
    sink.cancelled = True
    batcher.step()
    assert engine.cached_sequences == 0 and sink.done
    assert sink.outputs[-1].finish_reason == "cancelled"


def test_stop_word_ends_the_text(batcher):
    sink = ListSink()
    batcher.submit(
        GenerationRequest(
            "The cat",
            max_tokens=60,
            sampling=GREEDY,
            stop_words=("."),
            exclude_input_in_output=True,
        ),
        sink,
    )
    run_all(batcher, [sink])
    assert sink.outputs[-1].finish_reason == "stop" and "." not in sink.text
    assert len(sink.outputs) == 1  # not streamed: one response


def test_context_window_and_queue_limits(batcher):
    window = batcher.limits.max_positions
    with pytest.raises(RequestValidationError, match="max_tokens"):
        batcher.submit(GenerationRequest("The cat", max_tokens=window), ListSink())
    with pytest.raises(RequestValidationError, match="context window"):
        batcher.submit(GenerationRequest("cat " * window), ListSink())
    for _ in range(8):
        batcher.submit(GenerationRequest("The cat", max_tokens=1), ListSink())
    with pytest.raises(QueueFullError):
        batcher.submit(GenerationRequest("The cat", max_tokens=1), ListSink())


def test_engine_failure_fails_its_rows_and_the_loop_goes_on(batcher, engine):
    sink = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=5, sampling=GREEDY), sink)
    batcher.step()
    engine.release_all()  # the engine lost the cache: the next step must fail cleanly
    batcher.step()
    assert sink.errors and "unknown sequence" in sink.errors[0]
    ok = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=3, sampling=GREEDY), ok)
    run_all(batcher, [ok])
    assert ok.outputs[-1].finish_reason == "length"


def decoding_stream(batcher, tokens=30):
    """A stream whose prompt is in, decoding: the prefill budget is then the one that
    protects it (with none decoding a step takes IDLE_PREFILL_FACTOR budgets)."""
    sink = ListSink()
    request = GenerationRequest(
        "The", max_tokens=tokens, min_length=tokens, sampling=GREEDY, stream=True
    )
    batcher.submit(request, sink)
    batcher.step()
    return sink


def burst_beside_streams(batcher, engine, prompt, requests=5, streams=5):
    """``streams`` decoding streams, then ``requests`` of ``prompt`` at once; the engine's
    forward calls recorded from then on (``engine.forward.calls``). With as many streams
    decoding as prompts waiting, a step takes one budget (``_prefill_budget``)."""
    running = [decoding_stream(batcher) for _ in range(streams)]
    engine.forward = RecordingForward(engine.forward)
    sinks = [ListSink() for _ in range(requests)]
    for sink in sinks:
        batcher.submit(GenerationRequest(prompt, max_tokens=6, sampling=GREEDY, stream=True), sink)
    return running, sinks


class RecordingForward:
    """The real forward (either layout), noting each call's (rows, new tokens per row,
    cached positions)."""

    def __init__(self, forward):
        self.forward = forward
        self.calls = []

    def __call__(self, input_ids, lengths_or_mask, positions, caches):
        # the first new token's position is the cache's length (0: a prompt on no cache)
        past = int(positions[:, 0].max())
        self.calls.append((input_ids.shape[0], input_ids.shape[1], past))
        return self.forward(input_ids, lengths_or_mask, positions, caches)


def test_a_burst_of_prompts_goes_in_chunks_within_the_prefill_budget(engine, codec):
    prompt = "The old man walks to the river"  # the same length for every request
    size = len(codec.encode(prompt))
    budget = 2 * size + 1  # two prompts and one token of a third per step
    batcher = InflightBatcher(
        engine, codec, limits(engine, max_active=16, max_queue=8, max_prefill_tokens=budget)
    )
    running, sinks = burst_beside_streams(batcher, engine, prompt)
    joined = []
    for _ in range(3):
        calls = len(engine.forward.calls)
        batcher.step()
        joined.append(batcher.active - len(running))
        # the prompts' forwards never compute more positions than the budget, padding
        # included: decode rows and chunks of other widths are never padded to a chunk's
        prompt_calls = [c for c in engine.forward.calls[calls:] if c[1] > 1]
        assert sum(rows * width for rows, width, _ in prompt_calls) <= budget
    assert joined == [3, 5, 5]  # the third prompt starts with one token, then goes on
    run_all(batcher, sinks + running)
    texts = {s.text for s in sinks}
    assert len(texts) == 1 and all(s.outputs[-1].num_output_tokens == 6 for s in sinks)
    assert engine.cached_sequences == 0

    # with no stream decoding there is none to stall: a step takes IDLE_PREFILL_FACTOR
    # budgets, here of one prompt each, with room and requests for more (without a burst
    # window: with one, up to BURST_PREFILL_TOKENS)
    settings = dict(max_active=16, max_queue=16, max_prefill_tokens=size, burst_window_s=0.0)
    idle = InflightBatcher(engine, codec, limits(engine, **settings))
    burst = [ListSink() for _ in range(IDLE_PREFILL_FACTOR + 3)]
    for sink in burst:
        idle.submit(GenerationRequest(prompt, max_tokens=2, sampling=GREEDY), sink)
    idle.step()
    assert idle.active == IDLE_PREFILL_FACTOR
    run_all(idle, burst)

    # the same prompt alone, whole: the same text
    whole = InflightBatcher(engine, codec, limits(engine))
    alone = ListSink()
    whole.submit(GenerationRequest(prompt, max_tokens=6, sampling=GREEDY, stream=True), alone)
    run_all(whole, [alone])
    assert alone.text in texts


def step_in_thread(batcher) -> threading.Thread:
    """``batcher.step()`` on a daemon thread: a window that never ends must not hang the
    run (the caller joins it, and checks that it ended)."""
    thread = threading.Thread(target=batcher.step, daemon=True)
    thread.start()
    return thread


def windowed(engine, codec, window_s=600.0, **kwargs):
    """A batcher whose burst window, unless told, would outlast any test: a step that
    returns waited for something other than the window's quiet time or its bound."""
    settings = dict(burst_window_s=window_s, burst_wait_s=600.0) | kwargs
    return InflightBatcher(engine, codec, limits(engine, **settings))


def window_entered(batcher) -> threading.Event:
    """Set once the batcher waits on its condition: inside a burst window (its loop is
    not running, so nothing else waits there)."""
    entered = threading.Event()
    wait = batcher._wake.wait

    def noted_wait(timeout=None):
        entered.set()
        return wait(timeout)

    batcher._wake.wait = noted_wait
    return entered


def test_a_burst_window_lets_a_burst_arrive_and_takes_it_whole(engine, codec):
    """With a burst window the idle loop's first step waits for the requests still coming
    (here until they fill every slot; the window is long enough never to end first), then
    takes them all in one forward, beyond IDLE_PREFILL_FACTOR budgets; without one the
    first step takes the first request alone."""
    prompt = "The old man walks to the river"
    size = len(codec.encode(prompt))
    slots = IDLE_PREFILL_FACTOR + 2
    assert slots * size <= BURST_PREFILL_TOKENS
    settings = dict(max_active=slots, max_queue=slots, max_prefill_tokens=size)

    def request():
        return GenerationRequest(prompt, max_tokens=2, min_length=2, sampling=GREEDY)

    alone = InflightBatcher(engine, codec, limits(engine, **settings))
    first = [ListSink() for _ in range(slots)]
    alone.submit(request(), first[0])
    alone.step()
    assert alone.active == 1
    for sink in first[1:]:
        alone.submit(request(), sink)
    run_all(alone, first)

    batcher = windowed(engine, codec, **settings)
    in_window = window_entered(batcher)
    engine.forward = RecordingForward(engine.forward)
    sinks = [ListSink() for _ in range(slots)]
    batcher.submit(request(), sinks[0])
    step = step_in_thread(batcher)
    assert in_window.wait(60), "the first step did not wait for the burst"
    for sink in sinks[1:]:
        batcher.submit(request(), sink)
    step.join(60)
    assert not step.is_alive()
    assert batcher.active == slots
    assert engine.forward.calls == [(slots, size, 0)]  # one forward: every prompt, whole
    run_all(batcher, sinks)
    assert [s.text for s in sinks] == [s.text for s in first]
    assert engine.cached_sequences == 0


def test_a_burst_window_ends_when_requests_stop_arriving(engine, codec):
    """A lone request is held only until none has arrived for the window: with a wait
    bound that never comes, the step goes on."""
    batcher = windowed(engine, codec, window_s=0.001)
    sink = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
    step = step_in_thread(batcher)
    step.join(60)
    assert not step.is_alive() and batcher.active == 1
    run_all(batcher, [sink])
    assert sink.finals == 1


def test_a_burst_window_waits_only_for_streams_after_the_loop_ran_out_of_work(engine, codec):
    """A forward streams nothing: it never waits. Nor does a request the loop finds when
    its last step did work (steady load, e.g. one-token requests ending as they start):
    only the first step after a step that found nothing, which here ends once the
    requests fill the two slots."""
    batcher = windowed(engine, codec, max_active=2, max_queue=2)
    in_window = window_entered(batcher)
    reply = Replies()
    batcher.submit_forward([[5, 6]], reply)
    step = step_in_thread(batcher)
    step.join(60)
    assert not step.is_alive() and reply.answers and reply.answers[0][1] is None
    one_token = ListSink()  # the forward's step did work: the next step does not wait
    batcher.submit(GenerationRequest("The cat", max_tokens=1, sampling=GREEDY), one_token)
    step = step_in_thread(batcher)
    step.join(60)
    assert not step.is_alive() and one_token.finals == 1
    assert not in_window.is_set()
    assert not batcher.step()  # no work: the loop ran out of it
    sinks = [ListSink(), ListSink()]
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sinks[0])
    step = step_in_thread(batcher)
    assert in_window.wait(60), "the first step after the loop ran out of work did not wait"
    batcher.submit(GenerationRequest("The dog", max_tokens=2, sampling=GREEDY), sinks[1])
    step.join(60)
    assert not step.is_alive() and batcher.active == 2
    run_all(batcher, sinks)


def test_a_forward_waiting_behind_a_stream_ends_a_burst_window(engine, codec):
    batcher = windowed(engine, codec)
    in_window = window_entered(batcher)
    sink, reply = ListSink(), Replies()
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
    batcher.submit_forward([[5, 6]], reply)
    step = step_in_thread(batcher)
    step.join(60)
    assert not step.is_alive() and not in_window.is_set()
    assert reply.answers and reply.answers[0][1] is None
    run_all(batcher, [sink])


@pytest.mark.parametrize("limit", ["slots", "queue", "budget"])
def test_a_burst_window_ends_once_no_later_request_could_join_the_step(engine, codec, limit):
    """The window (here longer than any test) ends as soon as the waiting requests fill
    every slot, the queue or the step's prompt budget: a later one could not join."""
    prompt, count = "The cat", 2
    settings = {"slots": dict(max_active=2, max_queue=8), "queue": dict(max_active=8, max_queue=2)}
    if limit == "budget":
        prompt = "The old man walks to the river"
        while len(codec.encode(prompt)) < 300:
            prompt += " and the river walks to the old man"
        count = -(-BURST_PREFILL_TOKENS // len(codec.encode(prompt)))  # they reach the budget
        settings[limit] = dict(max_active=count + 4, max_queue=count + 4)
    batcher = windowed(engine, codec, **settings[limit])
    sinks = [ListSink() for _ in range(count)]
    for sink in sinks:
        batcher.submit(GenerationRequest(prompt, max_tokens=2, sampling=GREEDY), sink)
    step = step_in_thread(batcher)
    step.join(60)
    assert not step.is_alive() and batcher.active == count
    run_all(batcher, sinks)


def test_stopping_the_loop_ends_a_burst_window_without_a_step(engine, codec):
    """run()'s stop ends the window at once; the request waiting gets the shutdown error
    and the engine runs nothing."""
    batcher = windowed(engine, codec)
    engine.forward = RecordingForward(engine.forward)
    in_window = window_entered(batcher)
    sink = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
    stop = threading.Event()
    loop = threading.Thread(target=batcher.run, args=(stop,), daemon=True)
    loop.start()
    assert in_window.wait(60), "the loop's first step did not wait"
    stop.set()
    batcher.wake()
    loop.join(60)
    assert not loop.is_alive()
    assert sink.errors == [SHUTTING_DOWN] and engine.forward.calls == []


def idle_start(batcher, sinks, prompt="The cat") -> int:
    """Submit a request for each of ``sinks`` to an idle loop, take its first step, run
    them to the end and let the loop find no work; return how many first steps after an
    idle loop have held the burst window so far."""
    for sink in sinks:
        batcher.submit(GenerationRequest(prompt, max_tokens=2, sampling=GREEDY), sink)
    assert batcher.step()
    held = batcher.stats.burst_windows
    run_all(batcher, sinks)
    assert not batcher.step()  # the loop ran out of work
    return held


def sinks(count):
    return [ListSink() for _ in range(count)]


def test_the_burst_window_waits_only_after_an_idle_start_that_brought_a_burst(engine, codec):
    """A fresh loop's first start waits. A start that waited and got fewer than
    BURST_MIN_REQUESTS turns the wait off; one that did not wait turns it on when it found
    that many, or when that many came in a chain, each within the window of the one before
    (here longer than any test); a start that waited and got that many keeps it on. (The
    waits here end at once: a bound of 0.)"""
    assert BURST_MIN_REQUESTS == 3
    batcher = windowed(engine, codec, burst_wait_s=0.0)
    assert idle_start(batcher, sinks(2)) == 1  # a fresh loop waits: two came, no burst
    assert idle_start(batcher, sinks(1)) == 1  # so the next does not
    first, chain = ListSink(), sinks(2)
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), first)
    assert batcher.step() and batcher.stats.burst_windows == 1  # no wait
    batcher.submit(GenerationRequest("The dog", max_tokens=2, sampling=GREEDY), chain[0])
    batcher.step()
    assert batcher.stats.burst_windows == 1  # the loop is busy: no idle start
    batcher.submit(GenerationRequest("The dog", max_tokens=2, sampling=GREEDY), chain[1])
    run_all(batcher, [first, *chain])
    assert not batcher.step()
    assert idle_start(batcher, sinks(3)) == 2  # three in a chain: a burst, so this waits
    assert idle_start(batcher, sinks(1)) == 3  # that one got three: on
    assert idle_start(batcher, sinks(1)) == 3  # a lone one: off
    assert idle_start(batcher, sinks(3)) == 3  # three found at once: on again
    assert idle_start(batcher, sinks(2)) == 4  # two: off
    assert idle_start(batcher, sinks(2)) == 4  # two found at once are no burst
    assert idle_start(batcher, sinks(1)) == 4


def test_a_chain_broken_by_a_late_request_or_the_loop_running_out_of_work_is_no_burst(
    engine, codec
):
    """The arrivals after a start that did not wait count only within the window of the
    one before (1 ns: no two submits come that close), and only until the loop runs out
    of work."""
    batcher = windowed(engine, codec, window_s=1e-9)
    assert idle_start(batcher, sinks(1)) == 1  # a fresh loop waits: a lone one came
    assert idle_start(batcher, sinks(2)) == 1  # no wait; the third comes late:
    late = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), late)
    run_all(batcher, [late])
    assert not batcher.step()
    assert idle_start(batcher, sinks(1)) == 1  # no burst came: no wait

    batcher = windowed(engine, codec, burst_wait_s=0.0)  # a window longer than any test
    assert idle_start(batcher, sinks(1)) == 1
    assert idle_start(batcher, sinks(2)) == 1  # two, then the loop ran out of work:
    assert idle_start(batcher, sinks(1)) == 1  # this third one is no burst's


WINDOW = 2**-7  # s: times built from it are exact in binary, so the gaps compare exactly


def clocked(engine, codec, **kwargs):
    """A batcher with a WINDOW-long burst window and a wait bound of 0, on a clock the
    test sets (``now[0]``), so that no timing of the machine's comes in."""
    now = [100.0]
    batcher = windowed(engine, codec, window_s=WINDOW, burst_wait_s=0.0, **kwargs)
    batcher._clock = lambda: now[0]
    return batcher, now


def test_a_burst_is_a_chain_of_arrivals_each_within_the_window_of_the_one_before(engine, codec):
    """After a start that did not wait, three arrivals each less than the window after the
    one before are a burst; a gap of the window or more breaks the chain, and later
    arrivals start none."""
    batcher, now = clocked(engine, codec)
    assert idle_start(batcher, sinks(1)) == 1  # a fresh loop waits: a lone one came
    cases = [
        ([200, 200 + 3 * WINDOW, 200 + 3.25 * WINDOW, 200 + 3.5 * WINDOW], False),
        ([300, 300 + WINDOW, 300 + 2 * WINDOW], False),  # a window apart: not within it
        ([400, 400 + WINDOW / 2, 400 + WINDOW], True),
    ]
    for times, burst in cases:
        chain = sinks(len(times))
        for at, sink in zip(times, chain, strict=True):
            now[0] = at
            batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
            if sink is chain[0]:
                assert batcher.step() and batcher.stats.burst_windows == 1  # no wait
        run_all(batcher, chain)
        assert not batcher.step()
        now[0] += 1.0
        assert idle_start(batcher, sinks(1)) == 1 + burst, times


def test_requests_found_waiting_count_as_a_burst_only_by_their_own_gaps(engine, codec):
    """Requests that piled up while the loop was busy elsewhere are a burst only if they
    arrived each within the window of the one before."""
    batcher, now = clocked(engine, codec)
    assert idle_start(batcher, sinks(1)) == 1  # a fresh loop waits: a lone one came
    for times, burst in (
        ([500, 500 + 2 * WINDOW, 500 + 4 * WINDOW], False),
        ([600, 600, 600], True),
    ):
        found = sinks(len(times))
        for at, sink in zip(times, found, strict=True):
            now[0] = at
            batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
        assert batcher.step() and batcher.stats.burst_windows == 1  # found, not waited for
        run_all(batcher, found)
        assert not batcher.step()
        now[0] += 1.0
        assert idle_start(batcher, sinks(1)) == 1 + burst, times


class HeldWindow:
    """A step in a thread on a clocked batcher whose wait bound never comes: the test
    moves the clock (``at``) and learns whether the window held on at that time (the step
    read it and waited again) or ended (the step returned), by states, not by time."""

    def __init__(self, batcher, now) -> None:
        self.batcher, self.now = batcher, now
        self.read = None  # the time the batcher's clock last gave
        self.waited = queue.SimpleQueue()  # that time, at each of the window's waits
        wait = getattr(batcher._wake, "unnoted_wait", batcher._wake.wait)

        def clock():
            self.read = now[0]
            return self.read

        def noted_wait(timeout=None):
            self.waited.put(self.read)
            return wait(timeout)

        batcher._clock, batcher._wake.wait = clock, noted_wait
        batcher._wake.unnoted_wait = wait  # the next HeldWindow wraps this one, not ours
        self.step = step_in_thread(batcher)
        self._next_wait("the step did not hold the window")

    def at(self, time_s: float) -> bool:
        """Move the clock to ``time_s`` and wake the window: True if it held on."""
        while not self.waited.empty():  # waits before this time
            self.waited.get_nowait()
        self.now[0] = time_s
        with self.batcher._wake:
            self.batcher._wake.notify_all()
        while self.step.is_alive():
            try:
                if self.waited.get(timeout=0.05) == time_s:
                    return True  # it read this time, and waited on
            except queue.Empty:
                pass
        return False

    def _next_wait(self, failure: str) -> None:
        try:
            self.waited.get(timeout=60)  # a bound for a hung step, not a timing
        except queue.Empty:
            raise AssertionError(failure) from None


def end_held_window_with_a_forward(batcher, now, requests, windows) -> None:
    """With ``requests`` (their sinks) submitted to an idle loop, a step holds the window
    and a forward ends it; all run to the end. ``windows``: the burst windows held by
    then."""
    window = HeldWindow(batcher, now)
    reply = Replies()
    batcher.submit_forward([[5, 6]], reply)
    window.step.join(60)
    assert not window.step.is_alive() and batcher.stats.burst_windows == windows
    run_all(batcher, requests)
    assert reply.answers and not batcher.step()


def test_a_held_window_waits_longer_until_as_many_came_as_the_last_big_burst(engine, codec):
    """After a burst of BURST_STRAGGLER_MIN_REQUESTS or more, until as many requests have
    come again, the quiet time that ends a held window is BURST_STRAGGLER_FACTOR windows;
    from then on, or after a smaller burst, one window. A lone request after a big burst
    pays the longer wait once."""
    assert (BURST_STRAGGLER_FACTOR, BURST_STRAGGLER_MIN_REQUESTS) == (3, 6)
    batcher = windowed(engine, codec, window_s=WINDOW, max_active=16, max_queue=16)
    now = [100.0]
    batcher._clock = lambda: now[0]  # HeldWindow notes each reading of it

    def arrive(count):
        burst = sinks(count)
        for sink in burst:
            batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
        return burst

    def held(count, start, gaps, ends):
        """``count`` requests arrive at ``start``: the window holds on at each of ``gaps``
        (in windows after ``start``) and ends at ``ends``, with all of them taken."""
        burst = arrive(count)
        window = HeldWindow(batcher, now)
        for gap in gaps:
            assert window.at(start + gap * WINDOW), (count, gap)
        assert not window.at(start + ends * WINDOW), (count, ends)
        assert batcher.active == count
        run_all(batcher, burst)
        assert not batcher.step()

    held(1, 100.0, [], 1)  # a fresh loop's start: one window (no burst seen yet)
    assert idle_start(batcher, sinks(6)) == 1  # the wait is off; six found at once: on

    now[0] = 200.0
    second = arrive(1)
    window = HeldWindow(batcher, now)
    assert window.at(200 + 2 * WINDOW)  # a gap of two windows: fewer than six came
    second += arrive(6)  # now seven: one window from the last
    assert window.at(200 + 2.5 * WINDOW)
    assert not window.at(200 + 3 * WINDOW)
    assert batcher.active == 7 and batcher.stats.burst_windows == 2
    run_all(batcher, second)
    assert not batcher.step()

    now[0] = 250.0
    held(6, 250.0, [2], 3)  # six: fewer than the seven of the last burst
    now[0] = 260.0
    late = arrive(5)  # the last of six comes two windows after the others: still a burst
    window = HeldWindow(batcher, now)
    assert window.at(260 + 2 * WINDOW)
    late += arrive(1)
    assert not window.at(260 + 3 * WINDOW) and batcher.active == 6
    run_all(batcher, late)
    assert not batcher.step()
    now[0] = 300.0
    held(1, 300.0, [2.75], 3)  # a lone one after a big burst: three windows
    assert batcher.stats.burst_windows == 5  # (the one after the late one held, too)
    assert idle_start(batcher, sinks(1)) == 5  # the lone one turned the wait off

    now[0] = 400.0  # seven in a chain after a start that did not wait: counted to the end
    chain = arrive(1)
    assert batcher.step() and batcher.stats.burst_windows == 5
    for _ in range(6):
        now[0] += WINDOW / 4
        chain += arrive(1)
    run_all(batcher, chain)
    assert not batcher.step()
    now[0] = 500.0
    held(1, 500.0, [2.75], 3)  # fewer than seven: three windows
    assert idle_start(batcher, sinks(3)) == 6  # off again; three found at once: a burst
    now[0] = 600.0
    held(2, 600.0, [], 1)  # after a burst of three (a small one): one window
    assert batcher.stats.burst_windows == 7


def test_a_forward_that_ends_a_held_window_leaves_the_last_bursts_size(engine, codec):
    """A forward ends a held window at once; the requests taken then are no measure of
    the burst, so the next held window still waits longer for a big burst's stragglers."""
    batcher = windowed(engine, codec, window_s=WINDOW, max_active=16, max_queue=16)
    now = [100.0]
    batcher._clock = lambda: now[0]
    lone = sinks(1)  # a fresh loop's start holds the window; then the wait is off
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), lone[0])
    assert not HeldWindow(batcher, now).at(100 + WINDOW)
    run_all(batcher, lone)
    assert not batcher.step()
    assert idle_start(batcher, sinks(8)) == 1  # eight found at once: a burst of eight
    now[0] = 200.0
    first = sinks(3)
    for sink in first:
        batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
    end_held_window_with_a_forward(batcher, now, first, windows=2)  # three came, and a forward
    now[0] = 300.0
    later = sinks(4)
    for sink in later:
        batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
    window = HeldWindow(batcher, now)
    assert window.at(300 + 2 * WINDOW)  # four: fewer than the eight of the last burst
    assert not window.at(300 + 3 * WINDOW)
    run_all(batcher, later)


def test_a_forward_that_ends_a_held_window_leaves_the_wait_on(engine, codec):
    """A forward ends a held window that has one request so far: that is no measure of
    the burst (the rest may be on its way), so the next idle start still holds the
    window, where a held start that got one request alone turns the wait off."""
    batcher = windowed(engine, codec, window_s=WINDOW, max_active=16, max_queue=16)
    now = [100.0]
    batcher._clock = lambda: now[0]
    first = sinks(1)
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), first[0])
    # a fresh loop's start holds the window, and a forward ends it, one request in
    end_held_window_with_a_forward(batcher, now, first, windows=1)
    now[0] = 200.0
    lone = sinks(1)
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), lone[0])
    window = HeldWindow(batcher, now)  # held again (it fails if the step does not wait)
    assert not window.at(200 + WINDOW)  # one came: now the wait is off
    window.step.join(60)
    assert not window.step.is_alive() and batcher.stats.burst_windows == 2
    run_all(batcher, lone)
    assert not batcher.step()
    assert idle_start(batcher, sinks(1)) == 2


def test_a_burst_fills_at_most_the_slots(engine, codec):
    """With two slots a burst is two requests: a held start that fills them keeps the
    wait on."""
    batcher, now = clocked(engine, codec, max_active=2, max_queue=2)
    assert idle_start(batcher, sinks(2)) == 1
    assert idle_start(batcher, sinks(2)) == 2
    assert idle_start(batcher, sinks(1)) == 3  # then a lone one turns it off
    assert idle_start(batcher, sinks(1)) == 3


def test_an_idle_step_that_finds_nothing_waiting_admits_nothing(engine, codec):
    """A request that arrives after an idle step found the queue empty waits for the next
    step, which holds the window for it, rather than slipping into this one unheld."""
    batcher = windowed(engine, codec, burst_wait_s=0.0)
    check = batcher._let_burst_arrive
    late = ListSink()

    def then_one_arrives():
        found = check()
        batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), late)
        return found

    batcher._let_burst_arrive = then_one_arrives
    assert not batcher.step() and batcher.active == 0
    batcher._let_burst_arrive = check
    assert batcher.step() and batcher.stats.burst_windows == 1 and batcher.active == 1
    run_all(batcher, [late])


def test_forwards_are_no_arrivals_of_a_burst(engine, codec):
    """Forwards after a start that did not wait do not count toward a burst (the window
    here is longer than any test): the next idle start still does not wait."""
    batcher = windowed(engine, codec, burst_wait_s=0.0)
    assert idle_start(batcher, sinks(1)) == 1  # a fresh loop waits: a lone one came
    first, second, replies = ListSink(), ListSink(), [Replies(), Replies()]
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), first)
    assert batcher.step()
    for reply in replies:
        batcher.submit_forward([[5, 6]], reply)
    batcher.submit(GenerationRequest("The dog", max_tokens=2, sampling=GREEDY), second)
    run_all(batcher, [first, second])
    assert all(r.answers for r in replies) and not batcher.step()
    assert idle_start(batcher, sinks(1)) == 1  # two requests and two forwards: no burst


def test_only_a_start_that_held_the_window_takes_the_burst_budget(engine, codec):
    """A start that did not wait takes IDLE_PREFILL_FACTOR budgets, as with no window; the
    one that held it takes up to BURST_PREFILL_TOKENS."""
    prompt = "The old man walks to the river"
    size = len(codec.encode(prompt))
    count = IDLE_PREFILL_FACTOR + 3
    assert count * size <= BURST_PREFILL_TOKENS
    settings = dict(max_active=16, max_queue=16, max_prefill_tokens=size, burst_wait_s=0.0)
    batcher = windowed(engine, codec, **settings)
    assert idle_start(batcher, sinks(1), prompt) == 1  # a lone one: the wait is off
    burst = sinks(count)
    for sink in burst:
        batcher.submit(GenerationRequest(prompt, max_tokens=2, sampling=GREEDY), sink)
    batcher.step()
    assert batcher.stats.burst_windows == 1 and batcher.active == IDLE_PREFILL_FACTOR
    run_all(batcher, burst)
    assert not batcher.step()
    burst = sinks(count)  # that start found a burst: this one holds the window
    for sink in burst:
        batcher.submit(GenerationRequest(prompt, max_tokens=2, sampling=GREEDY), sink)
    batcher.step()
    assert batcher.stats.burst_windows == 2 and batcher.active == count
    run_all(batcher, burst)


@pytest.mark.parametrize(
    ("streams", "waiting", "max_active", "joined"),
    [
        (1, 5, 16, 5),  # five want to start per one decoding: five budgets, all of them
        (2, 5, 16, 2),  # two per decoding stream (5 // 2): two budgets
        (1, 12, 16, IDLE_PREFILL_FACTOR),  # at most an idle step's budgets
        (1, 12, 4, 3),  # only those with room to join count
        (5, 3, 16, 1),  # fewer starting than decoding: one budget
    ],
)
def test_the_prefill_budget_grows_with_the_streams_waiting_per_stream_decoding(
    engine, codec, streams, waiting, max_active, joined
):
    """A step's prefill stalls each decoding stream and brings each starting one nearer its
    first token: one budget (here one prompt) per starting stream per decoding one."""
    prompt = "The old man walks to the river"
    size = len(codec.encode(prompt))
    batcher = InflightBatcher(
        engine, codec, limits(engine, max_active=max_active, max_prefill_tokens=size)
    )
    running, sinks = burst_beside_streams(batcher, engine, prompt, waiting, streams)
    batcher.step()
    assert batcher.active - streams == joined
    run_all(batcher, sinks + running)
    assert len({s.text for s in sinks}) == 1 and all(s.done for s in sinks)


def test_a_long_prompt_goes_in_a_chunk_a_step_while_the_others_keep_decoding(engine, codec):
    batcher = InflightBatcher(engine, codec, limits(engine, max_prefill_tokens=4))
    running = ListSink()
    batcher.submit(
        GenerationRequest("The cat", max_tokens=40, min_length=40, sampling=GREEDY, stream=True),
        running,
    )
    for _ in range(3):
        batcher.step()
    long_prompt = "The old man walks to the river every morning because he likes the water"
    size = len(codec.encode(long_prompt))
    long = ListSink()
    batcher.submit(GenerationRequest(long_prompt, max_tokens=5, sampling=GREEDY, stream=True), long)
    engine.forward = RecordingForward(engine.forward)
    before = len(running.outputs)
    steps = -(-size // 4)  # chunks of 4 tokens
    for _ in range(steps):
        batcher.step()
    assert not long.outputs or long.outputs[0].num_output_tokens == 1  # first token at last
    assert len(running.outputs) - before == steps  # a token every step all along
    assert max(width for _, width, _ in engine.forward.calls) <= 4
    run_all(batcher, [running, long])

    solo_batcher = InflightBatcher(engine, codec, limits(engine))
    solo = ListSink()
    solo_batcher.submit(
        GenerationRequest(long_prompt, max_tokens=5, sampling=GREEDY, stream=True), solo
    )
    run_all(solo_batcher, [solo])
    assert long.text == solo.text
    assert long.outputs[-1].num_output_tokens == solo.outputs[-1].num_output_tokens


def test_without_chunks_whole_prompts_join_within_the_budget_and_a_long_one_goes_alone(
    engine, codec
):
    """For engines that take several new tokens only on an empty cache (TensorRT)."""
    prompt = "The old man walks to the river"
    size = len(codec.encode(prompt))
    batcher = InflightBatcher(
        engine,
        codec,
        limits(engine, max_active=16, max_prefill_tokens=2 * size + 1, chunked_prefill=False),
    )
    running, sinks = burst_beside_streams(batcher, engine, prompt)
    joined = []
    for _ in range(3):
        batcher.step()
        joined.append(batcher.active - len(running))
    assert joined == [2, 4, 5]  # two whole prompts per step, then the last one
    run_all(batcher, sinks + running)
    assert len({s.text for s in sinks}) == 1
    # several new tokens only ever on an empty cache
    assert all(past == 0 for _, width, past in engine.forward.calls if width > 1)

    alone = InflightBatcher(
        engine, codec, limits(engine, max_prefill_tokens=2, chunked_prefill=False)
    )
    sink = ListSink()
    alone.submit(GenerationRequest(prompt, max_tokens=3, sampling=GREEDY), sink)
    run_all(alone, [sink])
    assert sink.outputs[-1].num_output_tokens == 3


# -- failure isolation: every admitted request ends exactly once ------------------------------
class EngineWrapper:
    """The real engine; the subclasses below inject one fault each."""

    def __init__(self, engine):
        self.engine = engine

    def step(self, tokens, sequence_ids, starts):
        return self.engine.step(tokens, sequence_ids, starts)

    def release(self, sequence_ids):
        self.engine.release(sequence_ids)


class FlakyRelease(EngineWrapper):
    """The first ``failures`` releases fail (a BLS call that did not go through)."""

    def __init__(self, engine, failures):
        super().__init__(engine)
        self.failures = failures

    def release(self, sequence_ids):
        if self.failures:
            self.failures -= 1
            raise EngineError("release failed")
        super().release(sequence_ids)


class LostResponse(EngineWrapper):
    """The first step with a new row runs, then its answer is lost: the engine holds the row."""

    def step(self, tokens, sequence_ids, starts):
        logits = super().step(tokens, sequence_ids, starts)
        if any(starts) and not getattr(self, "lost", False):
            self.lost = True
            raise EngineError("response lost")
        return logits


class RejectLongPrompts:
    """The real forward, failing any prefill wider than ``longest`` tokens (out of memory)."""

    def __init__(self, forward, longest):
        self.forward = forward
        self.longest = longest

    def __call__(self, input_ids, mask, positions, past):
        if input_ids.shape[1] > self.longest:
            raise EngineError(f"prefill of {input_ids.shape[1]} tokens")
        return self.forward(input_ids, mask, positions, past)


class NanRow(EngineWrapper):
    """The real engine, with NaN logits for the sequence ``bad_id`` (an engine bug)."""

    bad_id = None

    def step(self, tokens, sequence_ids, starts):
        logits = super().step(tokens, sequence_ids, starts)
        for row, sid in enumerate(sequence_ids):
            if sid == self.bad_id:
                logits[row] = np.nan
        return logits


class ScriptedEngine:
    """Greedy decoding from it yields ``script``, whatever the prompt."""

    def __init__(self, script, vocab_size):
        self.script = script
        self.vocab_size = vocab_size
        self.position = {}

    def step(self, tokens, sequence_ids, starts):
        logits = np.zeros((len(tokens), self.vocab_size), np.float32)
        for row, sid in enumerate(sequence_ids):
            n = self.position.get(sid, 0)
            logits[row, self.script[n]] = 1.0
            self.position[sid] = n + 1
        return logits

    def release(self, sequence_ids):
        pass


def test_a_failing_prefill_fails_only_its_request(engine, codec):
    # a budget the poison's 202 tokens fit in: one prefill of it, which the engine rejects
    batcher = InflightBatcher(engine, codec, limits(engine, max_active=8, max_prefill_tokens=512))
    prompts = ["The cat", "A small bird", "Our neighbour", "The teacher writes"]

    def request(prompt):
        return GenerationRequest(prompt, max_tokens=10, sampling=GREEDY, stream=True)

    solo = []
    for prompt in prompts:
        sink = ListSink()
        batcher.submit(request(prompt), sink)
        run_all(batcher, [sink])
        solo.append(sink.text)
    engine.forward = RejectLongPrompts(engine.forward, longest=100)
    running = [ListSink() for _ in prompts[:3]]
    for prompt, sink in zip(prompts, running, strict=False):
        batcher.submit(request(prompt), sink)
    batcher.step()
    batcher.step()
    poison, joiner = ListSink(), ListSink()
    batcher.submit(GenerationRequest("cat " * 200, max_tokens=5), poison)
    batcher.submit(request(prompts[3]), joiner)  # joins in the same step as the poison
    run_all(batcher, [*running, poison, joiner])
    assert poison.errors == ["engine error: prefill of 202 tokens"] and poison.finals == 1
    assert [s.text for s in [*running, joiner]] == solo
    assert all(s.finals == 1 and not s.errors for s in [*running, joiner])
    assert engine.cached_sequences == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_word_completed_by_a_half_character_at_the_end_never_leaks(engine, codec, stream):
    script = codec.encode("Fine. Q: 東")[:-1]  # ends in " " + the first bytes of 東
    assert codec.decode(script).endswith("Q: \ufffd")
    batcher = InflightBatcher(
        ScriptedEngine(script, engine.shape.vocab_size), codec, limits(engine)
    )
    sink = ListSink()
    request = GenerationRequest(
        "Hi",
        max_tokens=len(script),
        sampling=GREEDY,
        stop_words=("Q: ",),
        stream=stream,
        exclude_input_in_output=True,
    )
    batcher.submit(request, sink)
    run_all(batcher, [sink])
    assert (sink.text if stream else sink.outputs[-1].text) == "Fine. "
    assert sink.outputs[-1].finish_reason == "stop" and sink.finals == 1


def test_a_failed_release_is_retried_so_no_cache_leaks(tiny_export, codec):
    engine = build_engine("onnx", tiny_export, max_sequences=2)
    batcher = InflightBatcher(FlakyRelease(engine, failures=2), codec, limits(engine))
    for _ in range(4):  # without the retries, the third fills max_sequences and fails
        sink = ListSink()
        batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
        run_all(batcher, [sink])
        assert not sink.errors and sink.outputs[-1].finish_reason == "length"
    assert engine.cached_sequences == 0


def test_a_new_row_cached_by_a_step_that_then_failed_is_released(engine, codec):
    batcher = InflightBatcher(LostResponse(engine), codec, limits(engine))
    sink = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=3, sampling=GREEDY), sink)
    batcher.step()
    assert sink.errors == ["engine error: response lost"] and sink.finals == 1
    assert engine.cached_sequences == 0


class GatedAfterFirstStep(EngineWrapper):
    """The real engine; every step after the first waits until ``gate`` is set, so the
    loop stands still mid-generation for as long as a test needs, however slow it is."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate = threading.Event()
        self.at_gate = threading.Event()  # the second step has begun and waits
        self.steps = 0

    def step(self, tokens, sequence_ids, starts):
        self.steps += 1
        if self.steps > 1:
            self.at_gate.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().step(tokens, sequence_ids, starts)


def test_stopping_the_loop_fails_what_is_left_once_then_refuses_requests(engine, codec):
    gated = GatedAfterFirstStep(engine)
    batcher = InflightBatcher(gated, codec, limits(engine, max_active=4, max_queue=8))
    worker = ResponseWorker()
    sinks = [ListSink() for _ in range(6)]  # four run, two wait
    for sink in sinks:
        request = GenerationRequest(
            "The cat", max_tokens=1000, min_length=1000, sampling=GREEDY, stream=True
        )
        batcher.submit(request, worker.wrap(sink))
    stop = threading.Event()
    loop = threading.Thread(target=batcher.run, args=(stop,))
    loop.start()
    # the first step has run and queued its pieces; the second waits at the gate
    assert gated.at_gate.wait(60) and worker.flush(60) and sinks[0].outputs
    stop.set()
    gated.gate.set()
    batcher.wake()
    loop.join(60)
    assert not loop.is_alive()
    worker.close()  # after the loop: the finals it queued all go out
    assert all(s.errors == ["the server is shutting down"] and s.finals == 1 for s in sinks)
    assert engine.cached_sequences == 0
    with pytest.raises(ShuttingDownError):
        batcher.submit(GenerationRequest("The cat"), ListSink())


def test_a_final_that_cannot_be_sent_ends_the_request_bare(batcher, engine):
    sink = ListSink(broken_final=True)
    batcher.submit(GenerationRequest("The cat", max_tokens=2, sampling=GREEDY), sink)
    run_all(batcher, [sink])
    assert sink.finals == 1 and not sink.outputs and batcher.active == 0
    assert engine.cached_sequences == 0


def test_a_sink_that_cannot_tell_if_cancelled_drops_only_its_row(batcher, engine):
    ok, broken = ListSink(), ListSink()
    for sink in (ok, broken):
        batcher.submit(GenerationRequest("The cat", max_tokens=8, sampling=GREEDY), sink)
    batcher.step()
    broken.broken_cancel_check = True
    run_all(batcher, [ok, broken])
    assert broken.outputs[-1].finish_reason == "cancelled" and broken.finals == 1
    assert ok.outputs[-1].finish_reason == "length" and ok.finals == 1
    assert engine.cached_sequences == 0


def test_an_unexpected_failure_in_a_step_fails_its_rows_once(batcher, engine, monkeypatch):
    done, running = ListSink(), ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=1, sampling=GREEDY), done)
    batcher.submit(GenerationRequest("The cat", max_tokens=50, sampling=GREEDY), running)
    advance_rows = batcher._advance_rows

    def advance_then_fail(*args):  # a bug after the rows were sampled and sent
        advance_rows(*args)
        raise RuntimeError("bug")

    monkeypatch.setattr(batcher, "_advance_rows", advance_then_fail)
    assert batcher.step()
    assert done.outputs[-1].finish_reason == "length" and done.finals == 1
    assert running.errors == ["internal error while generating"] and running.finals == 1
    assert batcher.active == 0 and engine.cached_sequences == 0
    monkeypatch.undo()
    ok = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=3, sampling=GREEDY), ok)
    run_all(batcher, [ok])
    assert ok.outputs[-1].finish_reason == "length"


def test_requests_cancelled_while_waiting_cost_no_prefill_budget(engine, codec):
    prompt = "The old man walks to the river"
    budget = len(codec.encode(prompt))  # one prompt per step
    batcher = InflightBatcher(engine, codec, limits(engine, max_prefill_tokens=budget))
    running = [decoding_stream(batcher) for _ in range(3)]  # as many as wait: one budget
    sinks = [ListSink() for _ in range(3)]
    for sink in sinks:
        batcher.submit(GenerationRequest(prompt, max_tokens=5, sampling=GREEDY), sink)
    sinks[0].cancelled = True
    batcher.step()
    assert sinks[0].outputs[-1].finish_reason == "cancelled" and sinks[0].finals == 1
    assert batcher.stats.requests["cancelled"] == 1
    assert batcher.active == 4  # the next request took the budget in this same step
    run_all(batcher, [*running, *sinks])
    assert [s.outputs[-1].finish_reason for s in sinks[1:]] == ["length", "length"]


def test_requests_cancelled_while_every_slot_is_busy_leave_the_queue_at_the_next_step(
    engine, codec
):
    """A full batch used to keep cancelled requests queued (no final response, their places
    taken: QueueFullError for live ones) until a slot freed, a whole stream later."""
    batcher = InflightBatcher(engine, codec, limits(engine, max_active=1, max_queue=2))
    running = decoding_stream(batcher)
    queued = [ListSink(), ListSink()]
    for sink in queued:
        batcher.submit(GenerationRequest("The cat", max_tokens=5, sampling=GREEDY), sink)
    batcher.step()
    with pytest.raises(QueueFullError):
        batcher.submit(GenerationRequest("The cat", max_tokens=5, sampling=GREEDY), ListSink())
    for sink in queued:
        sink.cancelled = True
    batcher.step()
    assert [s.outputs[-1].finish_reason for s in queued] == ["cancelled", "cancelled"]
    assert [s.finals for s in queued] == [1, 1] and not running.done
    assert batcher.stats.waiting == 0 and batcher.stats.requests["cancelled"] == 2
    late = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=5, sampling=GREEDY), late)
    running.cancelled = True
    run_all(batcher, [running, late])
    assert late.outputs[-1].finish_reason == "length" and [s.finals for s in queued] == [1, 1]


def test_with_capped_checks_one_waiting_request_a_step_is_asked(engine, codec):
    """Each check is a round trip the running streams wait on: the queue is swept one
    request a step, longest unasked first, so three cancelled ones leave in three steps."""
    settings = dict(max_active=1, max_queue=4, cancel_checks_per_step=4)
    batcher = InflightBatcher(engine, codec, limits(engine, **settings))
    running = decoding_stream(batcher)
    queued = [ListSink() for _ in range(3)]
    for sink in queued:
        batcher.submit(GenerationRequest("The cat", max_tokens=5, sampling=GREEDY), sink)
        sink.cancelled = True
    ended = []
    for _ in range(3):
        batcher.step()
        ended.append(sum(s.done for s in queued))
    assert ended == [1, 2, 3] and [s.cancel_checks for s in queued] == [1, 1, 1]
    assert batcher.stats.waiting == 0 and not running.done


def test_a_prompt_longer_than_the_window_can_spell_is_refused_untokenized(batcher, codec):
    class CountingCodec:
        max_token_bytes = codec.max_token_bytes
        calls = 0

        def encode(self, text):
            CountingCodec.calls += 1
            return codec.encode(text)

    batcher.codec = CountingCodec()
    window = batcher.limits.max_positions
    huge = "a" * (window * codec.max_token_bytes + 1)
    with pytest.raises(RequestValidationError, match="characters: more than the context window"):
        batcher.submit(GenerationRequest(huge), ListSink())
    assert CountingCodec.calls == 0
    # every token of the vocabulary fits the bound
    assert all(len(codec.decode([i]).encode()) <= codec.max_token_bytes for i in range(200))


def test_cancel_checks_are_spread_over_steps_and_every_stream_is_asked_in_turn(engine, codec):
    """One is_cancelled() a step (each a round trip in Triton), longest-unasked first: with
    three streams, a cancelled one leaves within three steps."""
    batcher = InflightBatcher(engine, codec, limits(engine, cancel_checks_per_step=1))
    sinks = [ListSink() for _ in range(3)]
    for sink in sinks:
        request = GenerationRequest("The cat", max_tokens=50, min_length=50, sampling=GREEDY)
        batcher.submit(request, sink)
    batcher.step()  # admission asks each once, then the step asks the first again
    assert [s.cancel_checks for s in sinks] == [2, 1, 1]
    for _ in range(6):
        batcher.step()
    assert [s.cancel_checks for s in sinks] == [4, 3, 3]  # one a step, in turn
    sinks[1].cancelled = True
    for _ in range(3):
        batcher.step()
    assert sinks[1].outputs[-1].finish_reason == "cancelled" and batcher.active == 2
    assert engine.cached_sequences == 2


def test_a_stream_is_not_asked_again_within_the_interval(engine, codec):
    batcher = InflightBatcher(engine, codec, limits(engine, cancel_check_interval_s=3600))
    sink = ListSink()
    batcher.submit(GenerationRequest("The cat", max_tokens=10, sampling=GREEDY), sink)
    run_all(batcher, [sink])
    assert sink.cancel_checks == 1  # at admission only
    assert sink.outputs[-1].finish_reason == "length"


def test_a_row_that_cannot_be_sampled_fails_alone_and_the_others_keep_their_seeded_text(
    tiny_export, codec
):
    real = build_engine("onnx", tiny_export, max_sequences=4)
    engine = NanRow(real)

    def request():
        sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
        return GenerationRequest("The cat", max_tokens=8, sampling=sampling, stream=True)

    batcher = InflightBatcher(engine, codec, limits(real))
    alone = ListSink()
    batcher.submit(request(), alone)
    run_all(batcher, [alone])
    ok, bad = ListSink(), ListSink()
    batcher.submit(request(), ok)
    batcher.submit(request(), bad)
    engine.bad_id = batcher._waiting[-1].sequence_id
    run_all(batcher, [ok, bad])
    assert bad.errors == ["internal error while generating"] and bad.finals == 1
    assert ok.text == alone.text and ok.outputs[-1].finish_reason == "length"
    assert real.cached_sequences == 0


def test_min_length_holds_for_sampled_rows(engine, codec):
    """End-of-text holds all the mass at every step; min_length keeps it out until then."""

    class EndOfTextEngine:
        def step(self, tokens, sequence_ids, starts):
            logits = np.zeros((len(tokens), engine.shape.vocab_size), np.float32)
            logits[:, engine.shape.eos_token_id] = 30.0
            return logits

        def release(self, sequence_ids):
            pass

    batcher = InflightBatcher(EndOfTextEngine(), codec, limits(engine))
    sinks = [ListSink() for _ in range(3)]
    for seed, sink in enumerate(sinks, start=1):
        sampling = SamplingParams(temperature=0.5, top_k=5, seed=seed)
        request = GenerationRequest("Hi", max_tokens=10, min_length=6, sampling=sampling)
        batcher.submit(request, sink)
    run_all(batcher, sinks)
    assert [(s.outputs[-1].num_output_tokens, s.outputs[-1].finish_reason) for s in sinks] == [
        (6, "stop")
    ] * 3


# -- stateless forwards (the engine model's steps, run by gpt2's loop) -----------------------
class Replies:
    def __init__(self):
        self.answers = []

    def __call__(self, logits, error):
        self.answers.append((logits, error))


def test_a_forward_runs_in_chunks_beside_a_stream_and_equals_a_stateless_step(engine, codec):
    batcher = InflightBatcher(engine, codec, limits(engine, max_prefill_tokens=4))
    running = [decoding_stream(batcher) for _ in range(2)]  # as many as the rows: one budget
    rows = [codec.encode("The old man walks to the river every day"), [5, 6]]
    expected = engine.step(rows)  # stateless: keeps nothing
    reply = Replies()
    batcher.submit_forward(rows, reply)
    before = [len(stream.outputs) for stream in running]
    steps = 0
    while not reply.answers:
        batcher.step()
        steps += 1
    assert steps >= -(-sum(map(len, rows)) // 4)  # within the budget: several steps
    # the streams got a token every step
    assert [len(s.outputs) - b for s, b in zip(running, before, strict=True)] == [steps] * 2
    logits, error = reply.answers[0]
    assert error is None and logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert engine.cached_sequences == 2  # the forward's rows are freed; the streams' stay
    streamed = sum(len(stream.outputs) for stream in running)
    assert batcher.stats.output_tokens == streamed and not batcher.stats.requests
    run_all(batcher, running)
    assert len(reply.answers) == 1


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "1 to 16 rows"),
        ([[1]] * 17, "1 to 16 rows"),
        ([[]], "row 0 has 0 tokens"),
        ([[1] * 2000], "context window"),
        ([[1], [-3]], "row 1: token id -3"),
    ],
)
def test_a_bad_forward_is_refused_before_it_queues(engine, codec, rows, message):
    batcher = InflightBatcher(
        engine, codec, limits(engine, max_active=16, vocab_size=engine.shape.vocab_size)
    )
    with pytest.raises(RequestValidationError, match=message):
        batcher.submit_forward(rows, Replies())
    assert batcher.stats.waiting == 0


def test_a_forward_that_fails_in_the_engine_or_at_shutdown_is_answered_once(engine, codec):
    batcher = InflightBatcher(engine, codec, limits(engine))
    failing = Replies()
    batcher.submit_forward([[10**6], [5]], failing)  # past the vocabulary: the engine fails
    run_all_forwards(batcher, [failing])
    assert failing.answers[0][0] is None and "vocabulary" in str(failing.answers[0][1])
    assert engine.cached_sequences == 0
    queued = Replies()
    batcher.submit_forward([[5, 6]], queued)
    batcher.shutdown()
    assert len(queued.answers) == 1 and isinstance(queued.answers[0][1], ShuttingDownError)
    with pytest.raises(ShuttingDownError):
        batcher.submit_forward([[5]], Replies())


def test_a_forward_row_the_engine_fails_is_the_servers_error_named_by_its_own_row(engine, codec):
    """An engine failure stays the server's (the adapter's INTERNAL: input is checked on
    the way in, with the model's vocabulary in both placements), and names the forward's
    row 1, not the retried call's row 0."""
    batcher = InflightBatcher(engine, codec, limits(engine))  # vocab_size 0: not checked
    failing = Replies()
    batcher.submit_forward([[5], [10**6]], failing)
    run_all_forwards(batcher, [failing])
    logits, error = failing.answers[0]
    assert logits is None and type(error) is Gpt2TritonError, repr(error)
    assert str(error).startswith("row 1: engine error: token id 1000000 outside"), error


def run_all_forwards(batcher, replies, limit=100):
    for _ in range(limit):
        if all(r.answers for r in replies):
            for _ in range(3):  # rows of a failed job leave at their next turn
                batcher.step()
            assert all(len(r.answers) == 1 for r in replies)
            return
        batcher.step()
    raise AssertionError("the forward was not answered")


def test_the_loop_calls_its_idle_hook_once_each_time_it_runs_out_of_work(batcher, engine):
    """The Triton adapter gives freed memory back there (heap.release_free_heap)."""
    from gpt2_triton import heap

    idle, ticks = [], []

    def on_idle():
        heap.release_free_heap()  # the real hook: harmless here, glibc or not
        idle.append(batcher.active)

    def wait_for(condition):
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert condition()

    stop = threading.Event()
    loop = threading.Thread(target=batcher.run, args=(stop, lambda: ticks.append(1), on_idle))
    loop.start()
    try:
        for round_ in (1, 2):
            sink = ListSink()
            batcher.submit(GenerationRequest("The cat", max_tokens=3, sampling=GREEDY), sink)
            wait_for(lambda r=round_: len(idle) >= r)
            seen = len(ticks)
            wait_for(lambda s=seen: len(ticks) >= s + 5)  # five idle turns of the loop later
            assert sink.finals == 1 and idle == [0] * round_  # once, with nothing active
            assert batcher.stats.idle_hooks == round_  # counted for the metric
    finally:
        stop.set()
        batcher.wake()
        loop.join(60)
    assert not loop.is_alive()


def test_the_idle_hook_waits_for_the_idle_time_it_is_given(batcher, engine):
    idle, ticks = [], []
    stop = threading.Event()
    loop = threading.Thread(
        target=batcher.run, args=(stop, lambda: ticks.append(1), lambda: idle.append(1), 3600)
    )
    loop.start()
    try:
        sink = ListSink()
        batcher.submit(GenerationRequest("The cat", max_tokens=3, sampling=GREEDY), sink)
        deadline = time.monotonic() + 60
        while (sink.finals == 0 or len(ticks) < 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.finals == 1 and len(ticks) >= 20 and not idle  # idle, not for an hour
    finally:
        stop.set()
        batcher.wake()
        loop.join(60)


@pytest.mark.parametrize(
    ("default", "setting", "on_cpu", "on_gpu"),
    [
        (default_prefill_tokens, "max_prefill_tokens", CPU_PREFILL_TOKENS, GPU_PREFILL_TOKENS),
        (default_response_lanes, "response_lanes", CPU_RESPONSE_LANES, GPU_RESPONSE_LANES),
    ],
)
def test_the_defaults_by_device_follow_where_the_engine_runs(default, setting, on_cpu, on_gpu):
    """The prefill budget (64 / 512) and the response lanes (4 / 1): the CPU's, or a GPU's
    (a TensorRT plan, or torch on CUDA), unless given; the repository builder takes the
    same default."""
    from build_scripts.build_repo import RepoSettings

    cases = [("onnx", "cpu"), ("onnx-int8", "cpu"), ("torch", "cpu"), ("torch", "cuda")]
    cases.append(("trt", "cpu"))  # the plan runs on the GPU whatever the setting says
    want = [on_cpu] * 3 + [on_gpu] * 2
    assert [default(e, d) for e, d in cases] == want
    assert [getattr(RepoSettings("m", engine=e, device=d), setting) for e, d in cases] == want
    assert getattr(RepoSettings("m", engine="trt", **{setting: 3}), setting) == 3
    assert (CPU_PREFILL_TOKENS, GPU_PREFILL_TOKENS, CPU_RESPONSE_LANES, GPU_RESPONSE_LANES) == (
        64, 512, 4, 1,
    )  # fmt: skip
