"""Per-sequence KV caches kept between steps, run as one batched forward.

Live sequences are held in two left-padded batches: ``past`` arrays
``(B, heads, P, head_dim)`` and an attention mask ``(B, P)`` whose zeros mark padding.

- ``decoding``: sequences that take one token per step. A decode step for all of them (the
  common case under in-flight batching) feeds the batch as it is, in any row order: no
  gather, no copy beyond what the forward itself produces.
- ``filling``: sequences whose prompt is still going in, whole or in chunks over several
  steps (chunked prefill). Their multi-token steps run in a forward of their own, so the
  decode rows are never padded to a chunk's width; a sequence moves to ``decoding`` (one
  copy, left-padded to its width) at its first one-token step.

A finished sequence is dropped and the all-padding columns on the left are trimmed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gpt2_triton.engines.kv_ops import KVOps, NumpyKV
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import EngineError

# (input_ids, attention_mask, position_ids, past) -> (logits (B, vocab), present)
ForwardFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]
]


class Holder(Protocol):
    """What ``check_step`` reads of an engine."""

    shape: ModelShape
    max_sequences: int
    cached_sequences: int

    def holds(self, sequence_id: int) -> bool: ...

    def sequence_length(self, sequence_id: int) -> int: ...


def check_step(
    engine: Holder,
    tokens: Sequence[Sequence[int]],
    sequence_ids: Sequence[int] | None,
    starts: Sequence[bool] | None,
) -> list[bool]:
    """Refuse a step that breaks the contract (EngineError), before anything runs; the
    step's ``starts`` (all False when not given)."""
    shape = engine.shape
    if not tokens:
        raise EngineError("a step needs at least one row of input_ids")
    for row, toks in enumerate(tokens):
        if len(toks) == 0:
            raise EngineError(f"row {row} of input_ids is empty")
        bad = [t for t in toks if not 0 <= t < shape.vocab_size]
        if bad:
            raise EngineError(
                f"row {row}: token id {bad[0]} outside the vocabulary [0, {shape.vocab_size})"
            )
    if sequence_ids is None:
        if starts is not None:
            raise EngineError("sequence_start needs sequence_ids")
        for toks in tokens:
            _check_length(shape, -1, 0, toks)
        return [True] * len(tokens)
    if len(sequence_ids) != len(tokens):
        raise EngineError("sequence_ids and input_ids have different batch sizes")
    starts = list(starts) if starts is not None else [False] * len(tokens)
    if len(starts) != len(tokens):
        raise EngineError("sequence_start and input_ids have different batch sizes")
    if len(set(sequence_ids)) != len(sequence_ids):
        raise EngineError("a sequence id appears twice in one step")
    for sid, start in zip(sequence_ids, starts, strict=True):
        if start and engine.holds(sid):
            raise EngineError(f"sequence {sid} is already active")
        if not start and not engine.holds(sid):
            raise EngineError(
                f"unknown sequence {sid}: it was never started, has ended or was released"
            )
    new = sum(starts)
    if engine.cached_sequences + new > engine.max_sequences:
        raise EngineError(
            f"too many live sequences: {engine.cached_sequences} cached + {new} new > "
            f"max_sequences {engine.max_sequences}"
        )
    for sid, start, toks in zip(sequence_ids, starts, tokens, strict=True):
        _check_length(shape, sid, 0 if start else engine.sequence_length(sid), toks)
    return starts


def _check_length(shape: ModelShape, sid: int, length: int, tokens) -> None:
    if length + len(tokens) > shape.max_positions:
        raise EngineError(
            f"sequence {sid}: {int(length)} + {len(tokens)} tokens exceed the context "
            f"window of {shape.max_positions}"
        )


@dataclass
class _Batch:
    ids: list[int]  # row -> sequence id
    past: list  # 2 * layers caches (B, heads, P, head_dim), numpy or torch (see kv_ops)
    mask: np.ndarray  # (B, P) int64, 0 = padding
    lengths: np.ndarray  # (B,) int64, real tokens per row = next position id

    @classmethod
    def empty(cls, shape: ModelShape, ops: KVOps, rows: int = 0) -> _Batch:
        past = [
            ops.empty(rows, shape.num_heads, shape.head_dim) for _ in range(2 * shape.num_layers)
        ]
        return cls([], past, np.zeros((rows, 0), np.int64), np.zeros(rows, np.int64))

    def select(self, rows: np.ndarray, ops: KVOps) -> _Batch:
        return _Batch(
            [self.ids[r] for r in rows],
            [ops.take(p, rows) for p in self.past],
            self.mask[rows],
            self.lengths[rows],
        )

    def trim_left(self, ops: KVOps) -> _Batch:
        """Drop leading columns that are padding in every row."""
        used = np.flatnonzero(self.mask.any(axis=0))
        first = int(used[0]) if used.size else self.mask.shape[1]
        if first == 0:
            return self
        return _Batch(
            self.ids,
            [ops.trim(p, first) for p in self.past],
            np.ascontiguousarray(self.mask[:, first:]),
            self.lengths,
        )


def _merge(a: _Batch, b: _Batch, ops: KVOps) -> _Batch:
    """Stack two batches, left-padding the narrower one to the common width."""
    if not a.ids:
        return b
    width = max(a.mask.shape[1], b.mask.shape[1])
    mask = np.zeros((len(a.ids) + len(b.ids), width), np.int64)
    mask[: len(a.ids), width - a.mask.shape[1] :] = a.mask
    mask[len(a.ids) :, width - b.mask.shape[1] :] = b.mask
    return _Batch(
        a.ids + b.ids,
        [ops.pad_stack(x, y, width) for x, y in zip(a.past, b.past, strict=True)],
        mask,
        np.concatenate([a.lengths, b.lengths]),
    )


class StatefulEngine:
    """Run batched forward steps for many sequences, keeping their KV caches in memory.

    ``step(tokens, sequence_ids, starts)`` appends ``tokens[i]`` to sequence
    ``sequence_ids[i]`` (a new one when ``starts[i]``) and returns each row's next-token
    logits. A sequence may take any number of tokens at any step: a prompt can go in whole
    or in chunks, one step each. Without ``sequence_ids`` the step is stateless: it runs and
    keeps nothing. A step that raises changes no cache, so the caller may retry it, or a
    part of it.
    """

    kv_cache = "padded"  # the layout, as the Triton models' load logs name it

    def __init__(self, forward: ForwardFn, shape: ModelShape, max_sequences: int = 64) -> None:
        # A forward built for a largest batch (a TensorRT plan's profiles) says so: every
        # live sequence may be in one step, so more of them than that would fail mid-service.
        limit = getattr(forward, "max_batch", None)
        if limit is not None and max_sequences > limit:
            raise EngineError(
                f"max_sequences {max_sequences} exceeds the largest batch the "
                f"{getattr(forward, 'name', 'engine')} engine was built for ({limit}): rebuild "
                f"it for {max_sequences} (make engine MAX_SEQUENCES={max_sequences}) or serve "
                f"at most {limit} (MAX_SEQUENCES={limit})"
            )
        self.forward = forward
        self.shape = shape
        self.max_sequences = max_sequences
        # The forward says where its cache lives (``kv_ops``); host numpy by default.
        self.ops: KVOps = getattr(forward, "kv_ops", None) or NumpyKV()
        self._batch = _Batch.empty(shape, self.ops)  # decoding
        self._filling = _Batch.empty(shape, self.ops)
        self._row_of: dict[int, int] = {}
        self._filling_row_of: dict[int, int] = {}

    @property
    def cached_sequences(self) -> int:
        return len(self._batch.ids) + len(self._filling.ids)

    @property
    def cached_tokens(self) -> int:
        """Cache slots held, padding included: what the memory use follows."""
        return int(self._batch.mask.size + self._filling.mask.size)

    def sequence_length(self, sequence_id: int) -> int:
        if sequence_id in self._filling_row_of:
            return int(self._filling.lengths[self._filling_row_of[sequence_id]])
        return int(self._batch.lengths[self._row_of[sequence_id]])

    def holds(self, sequence_id: int) -> bool:
        return sequence_id in self._row_of or sequence_id in self._filling_row_of

    # -- the contract ----------------------------------------------------------------------
    def step(
        self,
        tokens: Sequence[Sequence[int]],
        sequence_ids: Sequence[int] | None = None,
        starts: Sequence[bool] | None = None,
    ) -> np.ndarray:
        starts = check_step(self, tokens, sequence_ids, starts)
        if sequence_ids is None:
            fresh = _Batch.empty(self.shape, self.ops, rows=len(tokens))
            fresh.ids = [-1] * len(tokens)
            logits, _ = self._run(fresh, tokens)
            return logits

        # Each row's part: a prompt or a chunk of one (new, or a filling sequence taking
        # several tokens) runs with the filling rows; every other row decodes. A filling
        # sequence's first one-token step moves it to the decoding batch.
        fill_rows = [
            r
            for r in range(len(tokens))
            if starts[r] or (sequence_ids[r] in self._filling_row_of and len(tokens[r]) > 1)
        ]
        filled = set(fill_rows)
        decode_rows = [r for r in range(len(tokens)) if r not in filled]
        joining = [sequence_ids[r] for r in decode_rows if sequence_ids[r] in self._filling_row_of]

        # Computed on copies: the new state is committed only when every row succeeded, so a
        # step that raises (a prefill that fails) changes no cache.
        logits = np.empty((len(tokens), self.shape.vocab_size), np.float32)
        filling, decoding = self._filling, self._batch
        if fill_rows:  # first: the likelier to fail, and then no decode work is wasted
            logits[fill_rows], filling = self._filled(
                [sequence_ids[r] for r in fill_rows],
                [tokens[r] for r in fill_rows],
                [starts[r] for r in fill_rows],
            )
        if joining:
            if len(joining) == len(filling.ids):  # all of them (a burst's first step): no copy
                joined, filling = filling, _Batch.empty(self.shape, self.ops)
            else:
                joined = filling.select(_rows_of(filling, joining), self.ops).trim_left(self.ops)
                filling = self._without(filling, set(joining))
            decoding = _merge(decoding, joined, self.ops)
        if decode_rows:
            logits[decode_rows], decoding = self._stepped(
                decoding, [sequence_ids[r] for r in decode_rows], [tokens[r] for r in decode_rows]
            )
        self._set_state(decoding, filling)
        return logits

    def release(self, sequence_ids: Sequence[int]) -> int:
        """Free the caches of these sequences; unknown ids are ignored. Returns how many."""
        gone = {s for s in sequence_ids if self.holds(s)}
        if gone:
            self._set_state(self._without(self._batch, gone), self._without(self._filling, gone))
        return len(gone)

    def release_all(self) -> int:
        return self.release(list(self._batch.ids) + list(self._filling.ids))

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Undo every cache change made inside if it raises: several calls fail as one.

        Cheap, because a batch is never changed in place: each step or release makes a new one.
        """
        saved = self._batch, self._filling
        try:
            yield
        except BaseException:
            self._set_state(*saved)
            raise

    # -- internals -------------------------------------------------------------------------
    def _without(self, batch: _Batch, gone: set[int]) -> _Batch:
        if not gone.intersection(batch.ids):
            return batch
        keep = np.array([r for r, s in enumerate(batch.ids) if s not in gone], np.int64)
        return batch.select(keep, self.ops).trim_left(self.ops)

    def _filled(self, ids: list[int], tokens, starts) -> tuple[np.ndarray, _Batch]:
        """Prompts and chunks of ``ids`` (new ones where ``starts``): their logits and the
        filling batch that results, not yet committed.

        One forward per width: rows of one forward are padded to its widest, and prefill is
        compute-bound, so a one-token tail beside a 128-token chunk would cost 128.
        """
        logits = np.empty((len(ids), self.shape.vocab_size), np.float32)
        filling = self._filling
        stepped = []
        for width in sorted({len(t) for t in tokens}):
            rows = [r for r, t in enumerate(tokens) if len(t) == width]
            going_on = [ids[r] for r in rows if not starts[r]]
            fresh = _Batch.empty(self.shape, self.ops, rows=len(rows) - len(going_on))
            fresh.ids = [ids[r] for r in rows if starts[r]]
            batch = _merge(filling.select(_rows_of(filling, going_on), self.ops), fresh, self.ops)
            order = {s: i for i, s in enumerate(batch.ids)}
            in_order = [None] * len(rows)
            for r in rows:
                in_order[order[ids[r]]] = tokens[r]
            batch_logits, result = self._run(batch, in_order)
            logits[rows] = batch_logits[[order[ids[r]] for r in rows]]
            stepped.append(result)
        filling = self._without(filling, {s for s, new in zip(ids, starts, strict=True) if not new})
        for result in stepped:
            filling = _merge(filling, result, self.ops)
        return logits, filling.trim_left(self.ops)

    def _stepped(self, batch: _Batch, ids: list[int], tokens) -> tuple[np.ndarray, _Batch]:
        """Step ``ids`` of ``batch``: their logits and the batch that results, not yet
        committed."""
        if len(ids) == len(batch.ids) and set(ids) == set(batch.ids):
            # every row steps (in any order): the batch as it is, no gather
            order = {s: r for r, s in enumerate(batch.ids)}
            tokens_in_order = [None] * len(ids)
            for sid, toks in zip(ids, tokens, strict=True):
                tokens_in_order[order[sid]] = toks
            logits, stepped = self._run(batch, tokens_in_order)
            return logits[[order[s] for s in ids]], stepped
        rows = _rows_of(batch, ids)
        logits, stepped = self._run(batch.select(rows, self.ops), tokens)
        others = np.setdiff1d(np.arange(len(batch.ids)), rows)
        return logits, _merge(batch.select(others, self.ops), stepped, self.ops).trim_left(self.ops)

    def _run(self, batch: _Batch, tokens) -> tuple[np.ndarray, _Batch]:
        rows = len(tokens)
        width = max(len(t) for t in tokens)
        if width == 1:  # decode step: vectorised, no per-row Python work
            input_ids = np.array([t[0] for t in tokens], np.int64).reshape(rows, 1)
            new_mask = np.ones((rows, 1), np.int64)
            positions = batch.lengths.reshape(rows, 1).copy()
            added = np.ones(rows, np.int64)
        else:  # right-align each row's new tokens; padding sits between past and new
            input_ids = np.zeros((rows, width), np.int64)
            new_mask = np.zeros((rows, width), np.int64)
            positions = np.zeros((rows, width), np.int64)
            added = np.array([len(t) for t in tokens], np.int64)
            for r, toks in enumerate(tokens):
                n = len(toks)
                input_ids[r, width - n :] = toks
                new_mask[r, width - n :] = 1
                positions[r, width - n :] = batch.lengths[r] + np.arange(n)
        mask = np.concatenate([batch.mask, new_mask], axis=1)
        logits, present = self.forward(input_ids, mask, positions, batch.past)
        return logits, _Batch(batch.ids, list(present), mask, batch.lengths + added)

    def _set_state(self, decoding: _Batch, filling: _Batch) -> None:
        self._batch, self._filling = decoding, filling
        self._row_of = {s: r for r, s in enumerate(decoding.ids)}
        self._filling_row_of = {s: r for r, s in enumerate(filling.ids)}


def _rows_of(batch: _Batch, ids: Sequence[int]) -> np.ndarray:
    row_of = {s: r for r, s in enumerate(batch.ids)}
    return np.array([row_of[s] for s in ids], np.int64)
