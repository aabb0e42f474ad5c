"""The engine contract on the real engines of the tiny model, for both KV cache layouts:
the padded batch (``StatefulEngine``, what TensorRT uses) and the slots written in place
(``SlotEngine``): ONNX Runtime's, and PyTorch's static cache on the CPU, eager and through
the decode graphs' static inputs (everything of a CUDA graph step but its capture)."""

import mmap

import numpy as np
import pytest

from gpt2_triton import names
from gpt2_triton.engines import protocol
from gpt2_triton.engines.factory import build_engine
from gpt2_triton.engines.slots import HostCaches
from gpt2_triton.errors import EngineError


def torch_engine(tiny_export, model, max_sequences, static_decode):
    from gpt2_triton.engines.factory import read_shape
    from gpt2_triton.engines.slots import SlotEngine
    from gpt2_triton.engines.torch_slots import TorchSlotForward

    shape = read_shape(tiny_export)
    forward = TorchSlotForward(model, shape, "cpu", static_decode=static_decode)
    return SlotEngine(forward, shape, max_sequences)


def in_place_engine(kind, tiny_export, model, max_sequences):
    if kind == "onnx":
        return build_engine("onnx", tiny_export, max_sequences=max_sequences)
    return torch_engine(tiny_export, model, max_sequences, static_decode=kind == "torch_static")


@pytest.fixture(params=["padded", "in_place", "torch", "torch_static"])
def engine(request, tiny_export):
    if request.param.startswith("torch"):
        model = request.getfixturevalue("tiny_hf_model")
        return torch_engine(tiny_export, model, 8, static_decode=request.param == "torch_static")
    return build_engine("onnx", tiny_export, max_sequences=8, in_place=request.param == "in_place")


def greedy(engine, sid, prompt, n):
    logits = engine.step([prompt], [sid], [True])
    out = [int(logits[0].argmax())]
    for _ in range(n - 1):
        out.append(int(engine.step([[out[-1]]], [sid])[0].argmax()))
    engine.release([sid])
    return out


def test_in_flight_batching_equals_solo(engine, tiny_tokenizer):
    prompts = [
        tiny_tokenizer(p)["input_ids"]
        for p in ["The cat", "A small bird looks at the old", "The chef at the café paints"]
    ]
    solo = [greedy(engine, 1, p, 12) for p in prompts]

    # sequence 0 starts alone; 1 joins at step 3 and 2 at step 6, each with its prompt
    out = {0: [int(engine.step([prompts[0]], [0], [True])[0].argmax())]}
    for step in range(1, 20):
        ids = [s for s in out if len(out[s]) < 12]
        tokens = [[out[s][-1]] for s in ids]
        starts = [False] * len(ids)
        for joiner, at in ((1, 3), (2, 6)):
            if step == at:
                ids.append(joiner)
                tokens.append(prompts[joiner])
                starts.append(True)
                out[joiner] = []
        if not ids:
            break
        logits = engine.step(tokens, ids, starts)
        for row, sid in enumerate(ids):
            out[sid].append(int(logits[row].argmax()))
        engine.release([s for s in ids if len(out[s]) == 12])
    assert [out[i] for i in range(3)] == solo
    assert engine.cached_sequences == 0 and engine.cached_tokens == 0


def test_release_frees_the_cache_and_trims_padding(engine, tiny_tokenizer):
    long = tiny_tokenizer("The old man walks to the river every morning because")["input_ids"]
    engine.step([long, [5]], [1, 2], [True, True])
    assert engine.cached_sequences == 2
    assert engine.release([1, 99]) == 1  # unknown ids are ignored
    assert engine.cached_sequences == 1
    assert engine.cached_tokens == 1  # the short row's left padding went with the long row
    assert engine.sequence_length(2) == 1


def test_stateless_step_keeps_nothing(engine, tiny_tokenizer):
    ids = tiny_tokenizer("The cat")["input_ids"]
    a = engine.step([ids])
    b = engine.step([ids], [7], [True])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert engine.cached_sequences == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.step([[1]], [5]), "unknown sequence 5"),
        (lambda e: e.step([[1], [2]], [3, 3], [True, True]), "appears twice"),
        (lambda e: e.step([[]], [2], [True]), "empty"),
        (lambda e: e.step([[10**6]], [2], [True]), "outside the vocabulary"),
        (lambda e: e.step([[1] * 1025], [2], [True]), "context window"),
        (lambda e: e.step([[1] * 1023], [1]), "context window"),
        (lambda e: e.step([[1]] * 8, list(range(10, 18)), [True] * 8), "max_sequences"),
    ],
)
def test_bad_steps_are_clear_errors_and_change_nothing(engine, call, message):
    engine.step([[1, 2]], [1], [True])
    with pytest.raises(EngineError, match=message):
        call(engine)
    assert engine.cached_sequences == 1 and engine.sequence_length(1) == 2


def test_started_twice_is_an_error(engine):
    engine.step([[1]], [1], [True])
    with pytest.raises(EngineError, match="already active"):
        engine.step([[1]], [1], [True])


class FailingForward:
    """The real forward, except that prompts (``prefill``) or single tokens (``decode``) fail,
    alone or paired in one forward (``pair``, where the real one has it)."""

    def __init__(self, forward, fail_on):
        self.forward = forward
        self.fail_on = fail_on
        if hasattr(forward, "pair"):
            self.pair = self._pair

    def _check(self, input_ids):
        if ("prefill" if input_ids.shape[1] > 1 else "decode") == self.fail_on:
            raise RuntimeError(f"{self.fail_on} failed")

    def __call__(self, input_ids, *rest):
        self._check(input_ids)
        return self.forward(input_ids, *rest)

    def _pair(self, a, b):
        for group in (a, b):
            if group is not None:
                self._check(group.input_ids)
        return self.forward.pair(a, b)


class CountingForward:
    """The real forward, counting its forwards; ``paired=False`` hides ``pair``, so the
    engine runs one forward a group."""

    def __init__(self, forward, paired=True):
        self.forward = forward
        self.groups = []  # the groups of each forward: (rows, width) each
        if paired:
            self.pair = self._pair

    def __call__(self, input_ids, *rest):
        self.groups.append([input_ids.shape])
        return self.forward(input_ids, *rest)

    def _pair(self, a, b):
        self.groups.append([g.input_ids.shape for g in (a, b) if g is not None])
        return self.forward.pair(a, b)


@pytest.mark.parametrize("fail_on", ["prefill", "decode"])
def test_a_step_that_fails_part_way_changes_no_cache(engine, fail_on):
    engine.step([[1, 2], [3, 4, 5]], [1, 2], [True, True])
    engine.forward = FailingForward(engine.forward, fail_on)
    with pytest.raises(RuntimeError, match=fail_on):
        engine.step([[6], [7, 8, 9]], [1, 3], [False, True])  # 2 stays put: a gathered decode
    assert engine.cached_sequences == 2
    assert (engine.sequence_length(1), engine.sequence_length(2)) == (2, 3)
    engine.forward = engine.forward.forward
    engine.step([[6], [7, 8, 9]], [1, 3], [False, True])
    assert (engine.sequence_length(1), engine.sequence_length(3)) == (3, 3)


class FailingSecondForward:
    """The real forward, except that a step's second forward fails (the first one ran and
    wrote its keys and values), alone or paired."""

    def __init__(self, forward):
        self.forward = forward
        self.calls = 0
        if hasattr(forward, "pair"):
            self.pair = lambda a, b: self._count() or forward.pair(a, b)

    def _count(self):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("the second forward failed")

    def __call__(self, *inputs):
        self._count()
        return self.forward(*inputs)


def test_a_step_whose_second_forward_fails_commits_nothing(engine, tiny_tokenizer):
    """Decoding rows, a new prompt and a later chunk: three groups, so at least two
    forwards (ONNX Runtime pairs two of them); the second fails after the first wrote."""
    prompt = tiny_tokenizer("The old man walks to the river every morning")["input_ids"]

    def setup(e):
        e.step([prompt[:4], prompt[:2]], [1, 2], [True, True])

    step = ([[5], prompt[2:5], [7, 8, 9]], [1, 2, 3], [False, False, True])
    setup(engine)
    engine.forward = FailingSecondForward(engine.forward)
    with pytest.raises(RuntimeError, match="second forward"):
        engine.step(*step)
    assert engine.cached_sequences == 2 and not engine.holds(3)
    assert (engine.sequence_length(1), engine.sequence_length(2)) == (4, 2)
    engine.forward = engine.forward.forward
    got = [engine.step(*step), engine.step([[6], [1], [2]], [1, 2, 3])]
    clean = type(engine).__new__(type(engine))  # the same engine's kind, fresh
    clean.__init__(engine.forward, engine.shape, engine.max_sequences)
    setup(clean)
    want = [clean.step(*step), clean.step([[6], [1], [2]], [1, 2, 3])]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "step, message",
    [
        ({names.INPUT_IDS: np.array([[1]]), names.SEQUENCE_IDS: np.array([9], np.uint64)}, "9"),
        (
            {names.INPUT_IDS: np.array([[1]]), names.INPUT_LENGTHS: np.array([2], np.int32)},
            names.INPUT_LENGTHS,
        ),
    ],
)
def test_a_request_that_fails_does_not_release(engine, step, message):
    engine.step([[1, 2]], [1], [True])
    with pytest.raises(EngineError, match=message):
        protocol.serve(engine, {names.RELEASE_IDS: np.array([1], np.uint64), **step})
    assert engine.cached_sequences == 1 and engine.sequence_length(1) == 2
    protocol.serve(engine, {names.RELEASE_IDS: np.array([1], np.uint64)})
    assert engine.cached_sequences == 0


def test_a_prompt_in_chunks_gives_the_logits_of_the_whole_prompt(engine, tiny_tokenizer):
    prompt = tiny_tokenizer("The old man walks to the river every morning because")["input_ids"]
    whole = engine.step([prompt], [1], [True])
    engine.step([[5, 6, 7]], [2], [True])  # another sequence, already decoding
    engine.step([[8]], [2])
    # sequence 3 in chunks of 4, 1 and the rest, beside sequence 2's decode steps
    engine.step([prompt[:4], [9]], [3, 2], [True, False])
    engine.step([prompt[4:5], [10]], [3, 2])  # a one-token chunk joins the decoding rows
    last = engine.step([prompt[5:], [11]], [3, 2])
    np.testing.assert_allclose(last[0], whole[0], atol=1e-4)
    assert engine.sequence_length(3) == len(prompt) == engine.sequence_length(1)
    # they decode on together, in any row order, and agree token for token
    a, b = engine.step([[4], [4]], [3, 1]), engine.step([[5], [5]], [1, 3])
    np.testing.assert_allclose(a[0], a[1], atol=1e-4)
    np.testing.assert_allclose(b[0], b[1], atol=1e-4)


def test_decoding_rows_and_a_chunk_run_as_one_forward_and_agree_with_forwards_apart(
    tiny_export, tiny_tokenizer
):
    """ONNX Runtime's forward takes two groups of rows at once (one weight read a step):
    the decoding rows with the first prompt or chunk, then the rest two by two. The logits
    are those of one forward a group."""
    prompt = tiny_tokenizer("The old man walks to the river every morning because")["input_ids"]
    engines = [build_engine("onnx", tiny_export, max_sequences=8) for _ in range(2)]
    paired, apart = CountingForward(engines[0].forward), CountingForward(engines[1].forward, False)
    engines[0].forward, engines[1].forward = paired, apart
    steps = [
        ([prompt[:3], [5, 6]], [1, 2], [True, True]),  # two widths: one forward, two groups
        ([prompt[3:7], [7]], [1, 2], [False, False]),  # a chunk beside a decoding row
        ([[8], [9], prompt[7:9], [4, 5, 6]], [2, 1, 3, 4], [False, False, True, True]),
        ([[8], [9], [10], [11]], [4, 3, 2, 1], None),  # decoding rows alone
    ]
    for tokens, ids, starts in steps:
        got, want = (e.step(tokens, ids, starts) for e in engines)
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert paired.groups == [
        [(1, 3), (1, 2)],
        [(1, 1), (1, 4)],  # the decoding rows first
        [(2, 1), (1, 2)],
        [(1, 3)],
        [(4, 1)],
    ]
    assert len(apart.groups) == 2 + 2 + 3 + 1
    assert [e.sequence_length(1) for e in engines] == [9, 9]


def test_a_sequence_released_or_failed_part_way_through_its_prompt(engine, tiny_tokenizer):
    prompt = tiny_tokenizer("The old man walks to the river every morning")["input_ids"]
    engine.step([prompt[:3], [1, 2]], [1, 2], [True, True])
    engine.forward = FailingForward(engine.forward, "prefill")
    with pytest.raises(RuntimeError, match="prefill"):
        engine.step([prompt[3:6], [3]], [1, 2])
    assert (engine.sequence_length(1), engine.sequence_length(2)) == (3, 2)
    engine.forward = engine.forward.forward
    assert engine.release([1]) == 1
    assert engine.cached_sequences == 1 and engine.cached_tokens == 2
    with pytest.raises(EngineError, match="unknown sequence 1"):
        engine.step([prompt[3:6]], [1])
    engine.step([[3]], [2])
    assert engine.release_all() == 1 and engine.cached_tokens == 0


@pytest.mark.parametrize("kind", ["onnx", "torch", "torch_static"])
def test_the_in_place_cache_agrees_with_the_padded_one_under_random_traffic(
    kind, tiny_export, tiny_hf_model
):
    """Joins, leaves, chunks, multi-token steps and stateless steps, at random: the two
    layouts give the same logits step after step and hold the same sequences."""
    slots = in_place_engine(kind, tiny_export, tiny_hf_model, 6)
    padded = build_engine("onnx", tiny_export, max_sequences=6, in_place=False)
    rng = np.random.default_rng(7)
    live, next_id = [], 0
    for _ in range(60):
        ids, tokens, starts = [], [], []
        for sid in live:
            ids.append(sid)
            tokens.append(rng.integers(0, 500, 1 if rng.random() < 0.8 else 3).tolist())
            starts.append(False)
        for _ in range(int(rng.integers(0, 3))):
            if len(live) + sum(starts) < 6:
                ids.append(next_id)
                tokens.append(rng.integers(0, 500, int(rng.integers(1, 9))).tolist())
                starts.append(True)
                next_id += 1
        if ids:
            order = rng.permutation(len(ids))  # any row order
            ids, tokens = [ids[i] for i in order], [tokens[i] for i in order]
            starts = [starts[i] for i in order]
            np.testing.assert_allclose(
                slots.step(tokens, ids, starts), padded.step(tokens, ids, starts), atol=1e-3
            )
            live += [s for s, new in zip(ids, starts, strict=True) if new]
        stateless = [rng.integers(0, 500, 4).tolist(), rng.integers(0, 500, 2).tolist()]
        np.testing.assert_allclose(slots.step(stateless), padded.step(stateless), atol=1e-3)
        gone = [s for s in live if rng.random() < 0.2]
        assert slots.release(gone) == padded.release(gone) == len(gone)
        live = [s for s in live if s not in gone]
        assert slots.cached_sequences == padded.cached_sequences == len(live)
        assert all(slots.sequence_length(s) == padded.sequence_length(s) for s in live)
    assert slots.release_all() == len(live) and slots.cached_tokens == 0


class KeptHostCaches(HostCaches):
    """Host buffers that stay when the engine empties, as the static cache does on CUDA
    (its graphs replay over it): what leaves must be cleared, not freed."""

    frees_on_release = False

    def __init__(self, shape, dtype):
        super().__init__(shape, dtype)
        self.kept = None

    def allocate(self, rows, persistent, positions=None):
        if not persistent:
            return super().allocate(rows, persistent, positions)
        if self.kept is None:
            self.kept = super().allocate(rows, persistent, positions)
        return self.kept

    def forget(self, row):
        row.fill(0)


@pytest.mark.parametrize("kind", ["onnx", "onnx_kept_buffers", "torch_static"])
def test_releasing_many_at_once_moves_only_rows_that_stay_and_leaves_zeros_behind(
    kind, tiny_export, tiny_hf_model
):
    """Several sequences leave in one release (a step's finishers), decoding and filling
    alike: the rest keep their logits (against the padded layout), no row that leaves is
    copied, and every position at or past a row's length reads as zeros again, also in
    buffers that stay when every sequence has left."""
    slots = in_place_engine(kind.removesuffix("_kept_buffers"), tiny_export, tiny_hf_model, 8)
    if kind.endswith("_kept_buffers"):
        slots.caches = KeptHostCaches(slots.shape, slots.dtype)
    padded = build_engine("onnx", tiny_export, max_sequences=8, in_place=False)
    moved = []
    move = slots._move
    slots._move = lambda src, dst: (moved.append(slots._ids[src]), move(src, dst))
    rng = np.random.default_rng(11)
    live, next_id = [], 0
    for _ in range(40):
        new = [next_id + i for i in range(int(rng.integers(0, 9 - len(live))))]
        next_id += len(new)
        ids = live + new
        tokens = [[int(rng.integers(0, 500))] for _ in live]
        tokens += [rng.integers(0, 500, int(rng.integers(1, 6))).tolist() for _ in new]
        starts = [False] * len(live) + [True] * len(new)
        if ids:
            np.testing.assert_allclose(
                slots.step(tokens, ids, starts), padded.step(tokens, ids, starts), atol=1e-3
            )
        live = ids
        gone = [s for s in live if rng.random() < 0.5]
        moved.clear()
        assert slots.release(gone) == padded.release(gone) == len(gone)
        assert not set(moved) & set(gone), "a row that left was copied"
        live = [s for s in live if s not in gone]
        assert all(slots.sequence_length(s) == padded.sequence_length(s) for s in live)
        for buffer in slots._buffers or getattr(slots.caches, "kept", None) or []:
            rows = np.asarray(buffer.cpu() if hasattr(buffer, "cpu") else buffer)
            for slot in range(rows.shape[0]):
                length = int(slots._lengths[slot]) if slot < len(slots._ids) else 0
                assert not rows[slot, :, length:].any(), f"slot {slot} keeps old values"
    assert slots.release_all() == len(live) and slots.cached_tokens == 0
    for buffer in getattr(slots.caches, "kept", None) or []:  # every row cleared
        assert not buffer.any()


@pytest.mark.parametrize("kind", ["onnx", "padded"])
def test_a_block_that_fails_after_its_step_puts_the_released_back_and_the_started_out(
    kind, tiny_export
):
    """Full engine: release two, start two in their room, then fail (a reply that could not
    be made): the two released come back whole and the two started leave, and the error
    raised is the block's own (it used to be an IndexError from restoring into no room)."""
    engine = build_engine("onnx", tiny_export, max_sequences=2, in_place=kind == "onnx")
    engine.step([[1, 2], [3, 4]], [1, 2], [True, True])
    with pytest.raises(KeyError, match="after the step"):
        with engine.atomic():
            engine.release([1, 2])
            engine.step([[5], [6]], [3, 4], [True, True])
            raise KeyError("after the step")
    assert engine.cached_sequences == 2 and not engine.holds(3) and not engine.holds(4)
    assert engine.sequence_length(1) == engine.sequence_length(2) == 2
    again = build_engine("onnx", tiny_export, max_sequences=2, in_place=kind == "onnx")
    again.step([[1, 2], [3, 4]], [1, 2], [True, True])
    np.testing.assert_allclose(
        engine.step([[7], [8]], [1, 2]), again.step([[7], [8]], [1, 2]), atol=1e-4
    )


def _request(ids, sequence_ids=None, starts=None, release=None):
    inputs = {names.INPUT_IDS: np.array(ids, np.int64)}
    if sequence_ids is not None:
        inputs[names.SEQUENCE_IDS] = np.array(sequence_ids, np.uint64)
    if starts is not None:
        inputs[names.SEQUENCE_START] = np.array(starts, bool)
    if release is not None:
        inputs[names.RELEASE_IDS] = np.array(release, np.uint64)
    return inputs


@pytest.mark.parametrize("kind", ["onnx", "padded", "torch_static"])
def test_a_request_may_release_an_id_and_start_it_again_or_use_its_room(
    kind, tiny_export, tiny_hf_model
):
    """protocol.serve releases then steps, as one: the released room and id are free to
    the step; if the step fails, the released sequences come back as they were."""
    if kind == "padded":
        engine = build_engine("onnx", tiny_export, max_sequences=2, in_place=False)
    else:
        engine = in_place_engine(kind, tiny_export, tiny_hf_model, 2)
    first = protocol.serve(engine, _request([[1, 2, 3]], [7], [True]))
    restarted = protocol.serve(engine, _request([[1, 2, 3]], [7], [True], release=[7]))
    np.testing.assert_allclose(first, restarted, atol=1e-5)
    assert engine.cached_sequences == 1 and engine.sequence_length(7) == 3
    protocol.serve(engine, _request([[4]], [7]))  # it goes on
    protocol.serve(engine, _request([[5, 6]], [8], [True]))  # full: 7 and 8
    protocol.serve(engine, _request([[9, 9]], [9], [True], release=[8]))  # 8's room
    assert (engine.sequence_length(7), engine.sequence_length(9)) == (4, 2)
    expected = engine.step([[1, 2, 3, 4, 5]])  # stateless: 7's tokens and one more

    engine.forward = FailingForward(engine.forward, "prefill")
    with pytest.raises(RuntimeError, match="prefill"):
        protocol.serve(engine, _request([[3, 3]], [10], [True], release=[7, 9]))
    engine.forward = engine.forward.forward
    assert engine.cached_sequences == 2  # 7 and 9 are back, whole
    assert (engine.sequence_length(7), engine.sequence_length(9)) == (4, 2)
    np.testing.assert_allclose(engine.step([[5]], [7]), expected, atol=1e-4)
    assert engine.release_all() == 2 and engine.cached_sequences == 0


def test_a_vacated_slot_gives_its_memory_back(tiny_export):
    engine = build_engine("onnx", tiny_export, max_sequences=4)
    engine.step([[6] * 20, [5] * 300], [1, 2], [True, True])  # slots 0 and 1
    engine.step([[6], [5]], [1, 2])
    page = mmap.PAGESIZE // 4  # floats; a row's two edge pages may be shared, and kept
    assert all(np.count_nonzero(buffer[1]) > 4 * page for buffer in engine._buffers)
    engine.release([2])  # its row's pages go back to the OS: they read as zeros
    assert all(np.count_nonzero(buffer[1]) <= 2 * page for buffer in engine._buffers)
    assert engine.sequence_length(1) == 21 and engine.cached_tokens == 21
    np.testing.assert_allclose(engine.step([[6]], [1]), engine.step([[6] * 22]), atol=1e-4)
