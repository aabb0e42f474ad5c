"""Decoding ahead (``SlotEngine.step_ahead``, ``BatcherLimits.decode_ahead``) on the CPU: the
torch engine's static decode steps, the device sampler on CPU tensors. A step run ahead
must be indistinguishable from the step it stands for (logits, lengths, the cache's zero
tails), and one that does not come must leave no trace. What it buys (the GPU computing
while the host sends) needs a GPU: ``benchmarks/gpu_bench.sh --decode-ahead 0 1``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_batcher import ListSink, run_all
from test_stateful_engine import in_place_engine
from test_torch_engine import assert_zero_tails, static_engine

from gpt2_triton.batcher import BatcherLimits, InflightBatcher
from gpt2_triton.engines.factory import read_shape
from gpt2_triton.engines.slots import SlotEngine
from gpt2_triton.engines.torch_slots import TorchSlotForward
from gpt2_triton.errors import EngineError
from gpt2_triton.request import GenerationRequest
from gpt2_triton.sampling import SamplingParams
from gpt2_triton.text import TextCodec


def ahead_of(engine, ids, tokens):
    """``step_ahead`` with host tokens put on the engine's device (a CPU tensor here)."""
    return engine.step_ahead(ids, torch.tensor(tokens, dtype=torch.int64)).tolist()


def test_a_step_run_ahead_is_the_step_it_stands_for(tiny_export, tiny_hf_model):
    """A random walk of joins, chunks and leaves on two engines, one of which runs the next
    decode step ahead whenever every held sequence decodes; the step then comes as it was
    run (taken), with another token (taken back), or after some of its rows left. Both
    engines give the same logits at every step, and every row's tail stays zeros."""
    plain = static_engine(tiny_export, tiny_hf_model, 4)
    ahead = static_engine(tiny_export, tiny_hf_model, 4)
    rng = np.random.default_rng(11)
    live: list[int] = []  # decoding, in the caller's order
    filling: dict[int, list[int]] = {}  # sid -> prompt tokens still to go in
    next_id, runs, taken, taken_back, beside, joined = 0, 0, 0, 0, 0, 0
    for _ in range(60):
        ids, tokens, starts = [], [], []
        for sid in live:
            ids.append(sid)
            tokens.append([int(rng.integers(0, 500))])
            starts.append(False)
        for sid, rest in list(filling.items()):  # a chunk of 1-5 tokens, maybe its last
            chunk = rest[: int(rng.integers(1, 6))]
            filling[sid] = rest[len(chunk) :]
            ids.append(sid)
            tokens.append(chunk)
            starts.append(False)
        if len(live) + len(filling) < 4 and rng.random() < 0.4:
            prompt = rng.integers(0, 500, int(rng.integers(4, 12))).tolist()
            ids.append(next_id)
            tokens.append(prompt[:3])
            starts.append(True)
            filling[next_id] = prompt[3:]
            next_id += 1
        if not ids:
            continue
        want = plain.step(tokens, ids, starts)
        got = ahead.step(tokens, ids, starts)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
        for sid in [s for s, rest in filling.items() if not rest]:  # its prompt is all in
            del filling[sid]
            live.append(sid)
        gone = [s for s in live if rng.random() < 0.15]
        live = [s for s in live if s not in gone]
        for engine in (plain, ahead):
            engine.release(gone)
        if live and set(ahead._ids[: ahead._decoding]) == set(live):  # others may be filling
            rng.shuffle(live)  # the caller's order need not be the slots'
            chosen = [int(rng.integers(0, 500)) for _ in live]
            assert ahead_of(ahead, live, chosen) == chosen
            token_of = dict(zip(live, chosen, strict=True))
            runs += 1
            assert [ahead.sequence_length(s) for s in live] == [
                plain.sequence_length(s) for s in live
            ]  # the step it stands for has not come yet
            assert ahead.cached_tokens == plain.cached_tokens
            outcome = rng.random()
            if outcome < 0.2:  # another token comes: the step is taken back
                chosen[0] = (chosen[0] + 1) % 500
            elif outcome < 0.35 and len(live) > 1:  # a row leaves before it comes
                gone = [live.pop(int(rng.integers(0, len(live))))]
                for engine in (plain, ahead):
                    engine.release(gone)
                chosen = [token_of[s] for s in live]
            ids, tokens = list(live), [[t] for t in chosen]
            chunks_first = rng.random() < 0.5  # the decoding rows need not lead the step
            joins = False
            for sid, rest in list(filling.items()):  # a filling one's chunk beside it
                if rng.random() < 0.5:  # a 1-token chunk joins the run: taken back too
                    chunk = rest[: int(rng.integers(1, 4))]
                    filling[sid] = rest[len(chunk) :]
                    at = 0 if chunks_first else len(ids)
                    ids.insert(at, sid)
                    tokens.insert(at, chunk)
                    joins = joins or len(chunk) == 1
                    beside += 1
            joined += joins
            if outcome < 0.2 or joins:
                taken_back += 1
            else:
                taken += 1
            want = plain.step(tokens, ids, [False] * len(ids))
            got = ahead.step(tokens, ids, [False] * len(ids))
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
            for sid in [s for s, rest in filling.items() if not rest]:
                del filling[sid]
                live.append(sid)
        assert ahead._ids == plain._ids and ahead._decoding == plain._decoding
        for sid in ahead._ids:
            assert ahead.sequence_length(sid) == plain.sequence_length(sid)
        assert_zero_tails(ahead)
    assert runs >= 10 and taken >= 5 and taken_back >= 2, (runs, taken, taken_back)
    assert beside >= 3 and joined >= 1, (beside, joined)  # chunks beside a step run ahead
    assert ahead.steps_ahead == runs and ahead.steps_ahead_taken_back == taken_back


def test_a_step_run_ahead_that_never_comes_leaves_no_trace(tiny_export, tiny_hf_model):
    """Run ahead, then a step of other tokens, or atomic() (which a release may undo):
    each takes it back first, lengths and keys as they were."""
    engine = static_engine(tiny_export, tiny_hf_model, 4)
    reference = static_engine(tiny_export, tiny_hf_model, 4)
    for e in (engine, reference):
        e.step([[5, 6, 7], [8, 9]], [1, 2], [True, True])
        e.step([[10], [11]], [1, 2])
    before = [b.clone() for b in engine._buffers]
    ahead_of(engine, [1, 2], [12, 13])
    assert engine.cached_tokens == reference.cached_tokens  # written, but not yet stepped
    assert engine.sequence_length(1) == 4
    with engine.atomic():
        pass
    assert not engine._ahead and engine.cached_tokens == reference.cached_tokens
    assert engine.steps_ahead_taken_back == 1
    for got, want in zip(engine._buffers, before, strict=True):
        assert torch.equal(got, want)
    ahead_of(engine, [2, 1], [14, 15])  # the caller's order need not be the slots'
    got = engine.step([[15], [99]], [1, 2])  # 2 comes with another token
    want = reference.step([[15], [99]], [1, 2])
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    assert_zero_tails(engine)


def test_decoding_ahead_refuses_what_it_cannot_stand_for(tiny_export, tiny_hf_model):
    engine = static_engine(tiny_export, tiny_hf_model, 4)
    engine.step([[5, 6, 7], [8, 9], [1, 2, 3, 4]], [1, 2, 3], [True] * 3)
    engine.step([[10], [11]], [1, 2])  # 3 has its prompt in but has not decoded yet
    with pytest.raises(EngineError, match="exactly the decoding sequences"):
        ahead_of(engine, [1], [12])  # not all of them
    with pytest.raises(EngineError, match="exactly the decoding sequences"):
        ahead_of(engine, [1, 2, 3], [12, 13, 14])  # 3 is filling
    with pytest.raises(EngineError, match="1 tokens for 2 sequences"):
        engine.step_ahead([1, 2], torch.tensor([12]))
    with engine.atomic(), pytest.raises(EngineError, match="inside atomic"):
        ahead_of(engine, [1, 2], [12, 13])
    ahead_of(engine, [1, 2], [12, 13])
    with pytest.raises(EngineError, match="still pending"):
        ahead_of(engine, [1, 2], [12, 13])
    shape = read_shape(tiny_export)
    eager = SlotEngine(TorchSlotForward(tiny_hf_model, shape, "cpu"), shape, 2)
    onnx = in_place_engine("onnx", tiny_export, tiny_hf_model, 2)
    for cannot in (eager, onnx):
        assert not cannot.decodes_ahead
        cannot.step([[5, 6]], [1], [True])
        with pytest.raises(EngineError, match="cannot decode ahead"):
            ahead_of(cannot, [1], [7])


def test_no_step_runs_ahead_past_the_context_window(tiny_export, tiny_hf_model):
    engine = static_engine(tiny_export, tiny_hf_model, 2)
    window = engine.shape.max_positions
    engine.step([[t % 500 for t in range(window - 1)]], [1], [True])
    engine.step([[3]], [1])  # decoding, every position written
    with pytest.raises(EngineError, match="fills its context window"):
        ahead_of(engine, [1], [3])
    assert engine.sequence_length(1) == window and not engine._ahead


def loop(tiny_export, tiny_hf_model, decode_ahead: bool, max_active: int = 4):
    engine = static_engine(tiny_export, tiny_hf_model, max_sequences=max_active)
    limits = BatcherLimits(
        engine.shape.max_positions,
        engine.shape.eos_token_id,
        max_active=max_active,
        decode_ahead=decode_ahead,
    )
    return InflightBatcher(engine, TextCodec(tiny_export / "tokenizer"), limits)


class CountingAhead:
    """The real engine, counting the steps it ran ahead and those they stood for."""

    def __init__(self, engine):
        self.engine, self.ran = engine, 0
        self.step_ahead_real = engine.step_ahead
        engine.step_ahead = self.step_ahead

    def step_ahead(self, ids, tokens):
        self.ran += 1
        return self.step_ahead_real(ids, tokens)


def test_the_loop_decoding_ahead_streams_what_it_streams_without(tiny_export, tiny_hf_model):
    """Greedy streams of different lengths (each ending while the others decode), with a
    stop word, a prompt that joins mid-run and a min_length: the same text and finish
    reasons with decoding ahead as without, and most steps ran ahead."""

    def requests():
        greedy = SamplingParams(temperature=0)
        return [
            GenerationRequest("The old man", max_tokens=24, sampling=greedy),
            GenerationRequest("A small bird", max_tokens=5, sampling=greedy),
            GenerationRequest("The chef", max_tokens=17, sampling=greedy, stop_words=("the",)),
            GenerationRequest("Hello", max_tokens=9, min_length=9, sampling=greedy),
        ]

    results = []
    for decode_ahead in (False, True):
        batcher = loop(tiny_export, tiny_hf_model, decode_ahead)
        counting = CountingAhead(batcher.engine)
        first, late = requests()[:3], requests()[3]
        sinks = [ListSink() for _ in range(4)]
        for request, sink in zip(first, sinks, strict=False):
            batcher.submit(request, sink)
        for _ in range(3):  # the fourth joins while the others decode
            batcher.step()
        batcher.submit(late, sinks[3])
        run_all(batcher, sinks)
        results.append([(s.text, s.outputs[-1].finish_reason) for s in sinks])
        assert not batcher.engine.cached_sequences and not batcher.engine._ahead
        if decode_ahead:
            assert counting.ran >= 15, counting.ran
            assert batcher.engine.steps_ahead_taken_back == 0  # every one was the next step
            assert batcher.stats.steps > counting.ran  # not the steps with prompts in them
        else:
            assert counting.ran == 0
    assert results[0] == results[1]
    assert {reason for _, reason in results[1]} >= {"length", "stop"}


def test_the_loop_decoding_ahead_keeps_seeded_streams_and_hf_greedy(
    tiny_export, tiny_hf_model, tiny_tokenizer
):
    """Greedy equals Hugging Face's generate; a seeded sampled stream (top-p, repetition
    penalty) is the one it is without decoding ahead, alone and with requests joining while
    it runs (whose steps cannot run ahead: the sampler must be the same either way)."""
    batcher = loop(tiny_export, tiny_hf_model, decode_ahead=True)
    prompt = "The old man"
    greedy = ListSink()
    batcher.submit(
        GenerationRequest(
            prompt, max_tokens=16, sampling=SamplingParams(temperature=0),
            exclude_input_in_output=True,
        ),
        greedy,
    )  # fmt: skip
    run_all(batcher, [greedy])
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    ref = tiny_hf_model.generate(
        ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    assert greedy.text == tiny_tokenizer.decode(ref[0, ids.shape[1] :])

    def seeded_stream(decode_ahead: bool, joined: bool, seed: int) -> tuple[str, int]:
        batcher = loop(tiny_export, tiny_hf_model, decode_ahead)
        params = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=seed)
        mine = ListSink()
        batcher.submit(
            GenerationRequest("The old man went to", max_tokens=30, sampling=params), mine
        )
        for _ in range(4 if joined else 0):  # three short ones join, one after another
            batcher.step()
        for _ in range(3 if joined else 0):
            other = ListSink()
            batcher.submit(
                GenerationRequest("Hi", max_tokens=3, sampling=SamplingParams(temperature=0)), other
            )
            run_all(batcher, [other])
        run_all(batcher, [mine])
        return mine.text, batcher.stats.steps_ahead

    for seed in (5, 6):
        plain, _ = seeded_stream(False, joined=False, seed=seed)
        for joined in (False, True):
            text, ran = seeded_stream(True, joined, seed)
            assert text == plain and ran >= 10, (seed, joined, ran)


def test_a_step_that_cannot_run_ahead_runs_as_usual(tiny_export, tiny_hf_model):
    """step_ahead failing (here: refused every time) costs nothing but the overlap: the
    tokens are read as usual and the same text comes out."""
    texts, refusals = [], []
    for refuse in (False, True):
        batcher = loop(tiny_export, tiny_hf_model, decode_ahead=True)
        if refuse:

            def refused(ids, tokens):
                refusals.append(len(ids))
                raise EngineError("refused for the test")

            batcher.engine.step_ahead = refused
        sinks = [ListSink(), ListSink()]
        greedy = SamplingParams(temperature=0)
        batcher.submit(GenerationRequest("The cat", max_tokens=12, sampling=greedy), sinks[0])
        batcher.submit(GenerationRequest("Hello", max_tokens=7, sampling=greedy), sinks[1])
        run_all(batcher, sinks)
        texts.append([s.text for s in sinks])
        assert (batcher.stats.steps_ahead == 0) == refuse, batcher.stats.steps_ahead
    assert texts[0] == texts[1] and len(refusals) >= 8


def test_decode_ahead_is_off_on_an_engine_that_cannot(tiny_export, tiny_hf_model):
    shape = read_shape(tiny_export)
    engine = SlotEngine(TorchSlotForward(tiny_hf_model, shape, "cpu"), shape, 2)  # eager
    limits = BatcherLimits(shape.max_positions, shape.eos_token_id, max_active=2, decode_ahead=True)
    batcher = InflightBatcher(engine, TextCodec(tiny_export / "tokenizer"), limits)
    sink = ListSink()
    batcher.submit(
        GenerationRequest("The cat", max_tokens=6, sampling=SamplingParams(temperature=0)), sink
    )
    run_all(batcher, [sink])
    assert sink.outputs[-1].num_output_tokens == 6 and not batcher._decode_ahead
