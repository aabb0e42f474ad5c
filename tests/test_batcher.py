"""The generation loop on the real tiny engine (ONNX Runtime) with in-memory sinks."""

from dataclasses import dataclass, field

import pytest

from gpt2_triton.batcher import BatcherLimits, GenerationOutput, InflightBatcher, QueueFullError
from gpt2_triton.engines.factory import build_engine
from gpt2_triton.errors import RequestValidationError
from gpt2_triton.request import GenerationRequest
from gpt2_triton.sampling import SamplingParams
from gpt2_triton.text import TextCodec

GREEDY = SamplingParams(temperature=0)


@dataclass
class ListSink:
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    done: bool = False
    cancelled: bool = False

    def send(self, output: GenerationOutput, final: bool) -> None:
        self.outputs.append(output)
        self.done = final

    def send_error(self, message: str) -> None:
        self.errors.append(message)
        self.done = True

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


@pytest.fixture()
def engine(tiny_export):
    return build_engine("onnx", tiny_export, max_sequences=16)


@pytest.fixture()
def batcher(engine, tiny_export):
    codec = TextCodec(tiny_export / "tokenizer")
    limits = BatcherLimits(
        engine.shape.max_positions, engine.shape.eos_token_id, max_active=4, max_queue=8
    )
    return InflightBatcher(engine, codec, limits)


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


def test_a_burst_of_prompts_joins_within_the_prefill_budget(engine, tiny_export):
    codec = TextCodec(tiny_export / "tokenizer")
    prompt = "The old man walks to the river"  # the same length for every request
    size = len(codec.encode(prompt))
    limits = BatcherLimits(
        engine.shape.max_positions,
        engine.shape.eos_token_id,
        max_active=8,
        max_queue=8,
        max_prefill_tokens=2 * size + 1,  # room for two prompts per step
    )
    batcher = InflightBatcher(engine, codec, limits)
    sinks = [ListSink() for _ in range(5)]
    for sink in sinks:
        request = GenerationRequest(prompt, max_tokens=6, sampling=GREEDY, stream=True)
        batcher.submit(request, sink)
    joined = []
    for _ in range(3):
        batcher.step()
        joined.append(batcher.active)
    assert joined == [2, 4, 5]  # two prompts per step, then the last one
    run_all(batcher, sinks)
    texts = {s.text for s in sinks}
    assert len(texts) == 1 and all(s.outputs[-1].num_output_tokens == 6 for s in sinks)

    # a prompt longer than the budget still runs, alone
    alone = InflightBatcher(
        engine,
        codec,
        BatcherLimits(engine.shape.max_positions, engine.shape.eos_token_id, max_prefill_tokens=2),
    )
    sink = ListSink()
    alone.submit(GenerationRequest(prompt, max_tokens=3, sampling=GREEDY), sink)
    run_all(alone, [sink])
    assert sink.outputs[-1].num_output_tokens == 3
