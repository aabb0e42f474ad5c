"""The serving engine of ``ENGINE=torch`` (``engines/torch_slots.py``) on the CPU: the
static cache's buckets and scratch row, the generation loop with the device sampler, and
the engine served by a real tritonserver. What a GPU adds (fp16, the capture of the decode
graphs) runs in ``benchmarks/gpu_bench.sh``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_batcher import ListSink, run_all

from gpt2_triton.batcher import BatcherLimits, InflightBatcher
from gpt2_triton.engines.factory import build_engine, read_shape
from gpt2_triton.engines.slots import SlotEngine
from gpt2_triton.engines.torch_slots import (
    MIN_WINDOW,
    TorchSlotForward,
    batch_bucket,
    batch_buckets,
    window_bucket,
)
from gpt2_triton.errors import EngineError
from gpt2_triton.request import GenerationRequest
from gpt2_triton.sampling import SamplingParams
from gpt2_triton.text import TextCodec


def static_engine(tiny_export, model, max_sequences=6):
    shape = read_shape(tiny_export)
    return SlotEngine(
        TorchSlotForward(model, shape, "cpu", static_decode=True), shape, max_sequences
    )


def test_buckets():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)  # every step has a graph
    assert batch_buckets(6) == (1, 2, 4, 6) and batch_buckets(1) == (1,)
    buckets = (1, 2, 4, 8)
    assert [batch_bucket(n, buckets) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert window_bucket(1, 1024) == MIN_WINDOW
    assert window_bucket(MIN_WINDOW + 1, 1024) == 2 * MIN_WINDOW
    assert window_bucket(1000, 1024) == 1024 and window_bucket(1024, 1024) == 1024
    assert window_bucket(200, 128) == 128


def test_a_padded_decode_step_writes_no_other_slot(tiny_export, tiny_hf_model):
    """Three decoding rows run as a bucket of four: the fourth row, a sequence still
    filling its prompt, keeps every byte of its cache; the padding wrote into scratch."""
    engine = static_engine(tiny_export, tiny_hf_model)
    engine.step([[1, 2], [3, 4, 5], [6]], [1, 2, 3], [True, True, True])
    engine.step([[7], [8], [9]], [1, 2, 3])  # all three decode: slots 0-2
    engine.step([[10, 11, 12, 13]], [4], [True])  # filling, slot 3
    before = [b[3].clone() for b in engine._buffers]
    replays = engine.forward.graph_replays
    engine.step([[14], [15], [16]], [1, 2, 3])
    assert engine.forward.graph_replays == replays + 1  # the static path ran, in bucket 4
    assert all(torch.equal(b[3], kept) for b, kept in zip(engine._buffers, before, strict=True))
    expected = engine.step([[10, 11, 12, 13, 17]])  # stateless: 4's prompt and one more
    np.testing.assert_allclose(engine.step([[17]], [4]), expected, atol=1e-4)


def test_eager_steps_never_ask_for_cudnn_attention(tiny_export, tiny_hf_model, monkeypatch):
    """cuDNN's attention builds a plan for every new shape: prompts, chunks and eager
    decode steps run with it switched off; the graphs' decode path keeps PyTorch's choice
    (its shapes are fixed at capture). Fresh prompts run causal, without a mask."""
    calls = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((torch.backends.cuda.cudnn_sdp_enabled(), kwargs.get("attn_mask") is None))
        return attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    layers = read_shape(tiny_export).num_layers
    engine = static_engine(tiny_export, tiny_hf_model)
    engine.step([[1, 2, 3]], [1], [True])  # a fresh prompt: causal
    assert calls == [(False, True)] * layers
    calls.clear()
    engine.step([[4]], [1])  # the graphs' path (captured on CUDA)
    assert calls == [(True, False)] * layers
    calls.clear()
    eager = SlotEngine(
        TorchSlotForward(tiny_hf_model, read_shape(tiny_export), "cpu"), read_shape(tiny_export), 2
    )
    eager.step([[1, 2, 3]], [1], [True])
    eager.step([[4]], [1])  # an eager decode step: masked
    assert calls == [(False, True)] * layers + [(False, False)] * layers
    assert torch.backends.cuda.cudnn_sdp_enabled()  # switched back on after each step


def _decode_run(engine, steps=6):
    """Two prompts, then ``steps`` greedy decode steps: every step's logits."""
    out = [engine.step([[1, 2, 3], [4, 5]], [1, 2], [True, True])]
    for _ in range(steps):
        tokens = out[-1].argmax(-1)
        out.append(engine.step([[int(t)] for t in tokens], [1, 2]))
    return out


def test_compiled_decode_steps_compute_what_the_plain_ones_do(tiny_export, tiny_hf_model):
    """compile_decode: torch.compile fuses the layers' code outside attention; on the CPU
    (inductor's C++ backend) it must give the plain code's logits. Every bucket is compiled
    when the engine loads."""
    shape = read_shape(tiny_export)
    plain = SlotEngine(TorchSlotForward(tiny_hf_model, shape, "cpu", static_decode=True), shape, 2)
    forward = TorchSlotForward(tiny_hf_model, shape, "cpu", static_decode=True, compile_decode=True)
    assert forward.capture_graphs(2) == 0  # the CPU captures nothing; it compiled
    assert "; compiled: on (" in forward.describe()  # with the seconds it took
    compiled = SlotEngine(forward, shape, 2)
    for want, got in zip(_decode_run(plain), _decode_run(compiled), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert forward.graph_replays == 6  # the decode steps went through the compiled path
    with pytest.raises(EngineError, match="need CUDA graphs or static_decode"):
        TorchSlotForward(tiny_hf_model, shape, "cpu", compile_decode=True)


def test_every_bucket_compiles_past_dynamos_default_limit(tiny_export, tiny_hf_model, monkeypatch):
    """Dynamo keeps 8 compiled versions of a function by default, across engines; 200
    slots are 9 buckets: the engine raises the limit. (Traced only: the eager backend.)"""
    compile_for_real = torch.compile

    def traced_only(piece, **options):
        return compile_for_real(piece, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", traced_only)
    torch._dynamo.reset()
    shape = read_shape(tiny_export)
    forward = TorchSlotForward(tiny_hf_model, shape, "cpu", static_decode=True, compile_decode=True)
    assert len(batch_buckets(200)) == 9
    forward.capture_graphs(200)
    assert forward.compile_failed is None and "compiled: on" in forward.describe()
    torch._dynamo.reset()


def test_a_compile_that_fails_leaves_the_plain_code_running(
    tiny_export, tiny_hf_model, monkeypatch
):
    def broken(piece, **options):
        def call(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    shape = read_shape(tiny_export)
    forward = TorchSlotForward(tiny_hf_model, shape, "cpu", static_decode=True, compile_decode=True)
    forward.capture_graphs(2)
    assert forward.describe().endswith("compiled: failed: RuntimeError: no compiler here")
    plain = SlotEngine(TorchSlotForward(tiny_hf_model, shape, "cpu", static_decode=True), shape, 2)
    for want, got in zip(
        _decode_run(plain), _decode_run(SlotEngine(forward, shape, 2)), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["onnx", "torch_static"])
def test_positions_past_each_rows_length_read_as_zeros(kind, tiny_export, tiny_hf_model):
    """A graph's decode reads a whole window, where a stale NaN would survive the mask:
    leaves, joins and trades leave zeros behind them in every row."""
    from test_stateful_engine import in_place_engine

    engine = in_place_engine(kind, tiny_export, tiny_hf_model, 4)
    rng = np.random.default_rng(5)
    live, next_id = [], 0
    for _ in range(25):
        ids = list(live) + [next_id] * (len(live) < 4)
        tokens = [[int(rng.integers(0, 500))] for _ in live]
        tokens += [rng.integers(0, 500, int(rng.integers(1, 30))).tolist()] * (len(ids) > len(live))
        engine.step(tokens, ids, [False] * len(live) + [True] * (len(ids) - len(live)))
        if len(ids) > len(live):
            live.append(next_id)
            next_id += 1
        gone = [s for s in live if rng.random() < 0.3]
        engine.release(gone)
        live = [s for s in live if s not in gone]
        assert_zero_tails(engine)
        for slot in range(len(engine._ids), engine.max_sequences):  # vacated rows
            assert all(not np.asarray(b[slot]).any() for b in engine._buffers)


def assert_zero_tails(engine):
    for slot, sid in enumerate(engine._ids):
        length = engine.sequence_length(sid)
        assert all(not np.asarray(b[slot, :, length:]).any() for b in engine._buffers), sid


@pytest.mark.parametrize("kind", ["onnx", "torch_static"])
def test_a_shorter_sequence_joining_the_decode_run_leaves_zeros(kind, tiny_export, tiny_hf_model):
    """Two prompts filling, the longer in the first row: the shorter's first decode step
    trades the two rows, and the row it takes keeps no trace of the longer one."""
    from test_stateful_engine import in_place_engine

    engine = in_place_engine(kind, tiny_export, tiny_hf_model, 4)
    engine.step([list(range(1, 21)), [7, 8, 9, 10, 11]], [1, 2], [True, True])
    assert engine._ids == [1, 2] and engine._decoding == 0  # both filling, 1 in row 0
    engine.step([[21, 22, 23], [12]], [1, 2])  # 1's next chunk; 2 joins the decode run
    assert engine._ids[0] == 2 and engine.sequence_length(2) == 6
    assert_zero_tails(engine)


def test_fp16_compute_gives_fp32_logits(tiny_export, tiny_hf_model):
    """The GPU's precision path (fp16 matmuls, fp32 residual and LayerNorm) run on the
    CPU: its logits leave in fp32 (fp16's rounding would tie close candidates) and its
    greedy tokens agree with fp32's."""
    shape = read_shape(tiny_export)
    fp16 = TorchSlotForward(tiny_hf_model, shape, "cpu", dtype=torch.float16)
    assert fp16.dtype == torch.float16 and fp16.weights.lm_head.dtype == torch.float32
    engines = [SlotEngine(fp16, shape, 2), static_engine(tiny_export, tiny_hf_model, 2)]
    prompt = [46, 146, 58, 11, 290, 262]
    rows = [e.step([prompt], [1], [True])[0] for e in engines]
    assert rows[0].dtype == torch.float32
    assert not torch.equal(rows[0], rows[0].half().float())  # not fp16 values
    np.testing.assert_allclose(rows[0], rows[1], atol=0.05)
    tokens = [[int(r.argmax())] for r in rows]
    for _ in range(8):
        rows = [e.step([t], [1])[0] for e, t in zip(engines, tokens, strict=True)]
        tokens = [[int(r.argmax())] for r in rows]
        assert tokens[0] == tokens[1]


def test_cuda_graphs_need_cuda(tiny_export, tiny_hf_model):
    with pytest.raises(EngineError, match="CUDA graphs need DEVICE=cuda"):
        build_engine("torch", tiny_export, model=tiny_hf_model, cuda_graphs=True)


@pytest.fixture()
def batcher(tiny_export, tiny_hf_model):
    engine = static_engine(tiny_export, tiny_hf_model, max_sequences=4)
    limits = BatcherLimits(engine.shape.max_positions, engine.shape.eos_token_id, max_active=4)
    return InflightBatcher(engine, TextCodec(tiny_export / "tokenizer"), limits)


def test_the_loop_on_the_torch_engine_greedy_and_seeded(batcher, tiny_hf_model, tiny_tokenizer):
    """Greedy equals Hugging Face's generate; a seeded sampled stream is the same alone and
    beside others (the device sampler on the engine's tensors)."""
    prompt = "The old man"
    greedy = ListSink()
    request = GenerationRequest(
        prompt, max_tokens=16, sampling=SamplingParams(temperature=0), exclude_input_in_output=True
    )
    batcher.submit(request, greedy)
    run_all(batcher, [greedy])
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    ref = tiny_hf_model.generate(
        ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    assert greedy.text == tiny_tokenizer.decode(ref[0, ids.shape[1] :])

    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=77)

    def sampled(prompt_text):
        return GenerationRequest(prompt_text, max_tokens=16, sampling=seeded)

    alone = ListSink()
    batcher.submit(sampled("A small bird"), alone)
    run_all(batcher, [alone])
    sinks = [ListSink() for _ in range(3)]
    batcher.submit(sampled("The chef"), sinks[0])
    batcher.submit(sampled("A small bird"), sinks[1])
    batcher.submit(
        GenerationRequest("Hello", max_tokens=10, sampling=SamplingParams(seed=3)), sinks[2]
    )
    run_all(batcher, sinks)
    assert sinks[1].text == alone.text and alone.outputs[-1].num_output_tokens == 16


@pytest.mark.parametrize("decode_ahead", [False, True], ids=["plain", "decode_ahead"])
def test_the_torch_engine_through_triton(
    decode_ahead, tiny_export, artifacts, tiny_hf_model, tiny_tokenizer, tmp_path
):
    """ENGINE=torch DEVICE=cpu served by a real tritonserver: greedy streams agree with
    Hugging Face, concurrent seeded streams equal their solo runs, next_token answers;
    the same with DECODE_AHEAD=1 (the static decode steps, each run ahead)."""
    from conftest import service, wait_until_idle

    from build_scripts.build_repo import RepoSettings, build
    from client import GenerationParams, Gpt2Client
    from gpt2_triton.reference import greedy_text

    settings = RepoSettings("tiny", "torch", max_sequences=4, decode_ahead=decode_ahead)
    repository = build(settings, repository=tmp_path / "repo")
    logs = tmp_path / "logs"
    with service(repository, logs) as server, Gpt2Client(server.grpc_url) as client:
        prompts = ["The cat", "A small bird looks at the old", "The chef", "Hello, my name is"]
        greedy = GenerationParams(temperature=0, max_tokens=12)
        for prompt in prompts[:2]:
            expected = greedy_text(tiny_hf_model, tiny_tokenizer, prompt, 12)
            assert client.generate(prompt, greedy).text == expected
        seeded = [
            GenerationParams(temperature=0.8, top_p=0.9, seed=i + 1, max_tokens=12)
            for i in range(4)
        ]
        solo = [client.generate(p, s).text for p, s in zip(prompts, seeded, strict=True)]
        together = [None] * 4

        def run(i):
            with Gpt2Client(server.grpc_url) as own:
                together[i] = "".join(own.stream(prompts[i], seeded[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == solo
        assert next_token(server.grpc_url, "The cat") == top1(
            tiny_hf_model, tiny_tokenizer, "The cat"
        )
        ran_ahead = wait_until_idle(server.metrics_url).get("gpt2_steps_ahead_total", 0.0)
        assert (ran_ahead > 0) == decode_ahead, ran_ahead


def next_token(url, prompt):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        temperature = grpcclient.InferInput("temperature", [1], "FP32")
        temperature.set_data_from_numpy(np.array([0.0], np.float32))
        return client.infer("next_token", [text, temperature]).as_numpy("output_ids").tolist()


def top1(model, tokenizer, prompt):
    with torch.no_grad():
        return [
            int(model(tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0, -1].argmax())
        ]
