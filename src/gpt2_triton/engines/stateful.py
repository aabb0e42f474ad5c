"""Per-sequence KV caches kept between steps, run as one batched forward.

All live sequences share one left-padded batch: ``past`` arrays ``(B, heads, P, head_dim)``
and an attention mask ``(B, P)`` whose zeros mark padding. A decode step for every live
sequence (the common case under in-flight batching) feeds the batch as it is: no gather, no
copy beyond what the forward itself produces. A new sequence is prefilled on its own and
then merged in (left-padded to the batch's width); a finished one is dropped and the
all-padding columns on the left are trimmed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gpt2_triton.engines.kv_ops import KVOps, NumpyKV
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import EngineError

# (input_ids, attention_mask, position_ids, past) -> (logits (B, vocab), present)
ForwardFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]
]


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
    logits. Without ``sequence_ids`` the step is stateless: it runs and keeps nothing. A step
    that raises changes no cache, so the caller may retry it, or a part of it.
    """

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
        self._batch = _Batch.empty(shape, self.ops)
        self._row_of: dict[int, int] = {}

    @property
    def cached_sequences(self) -> int:
        return len(self._batch.ids)

    @property
    def cached_tokens(self) -> int:
        """Cache slots held, padding included: what the memory use follows."""
        return int(self._batch.mask.size)

    def sequence_length(self, sequence_id: int) -> int:
        return int(self._batch.lengths[self._row_of[sequence_id]])

    # -- the contract ----------------------------------------------------------------------
    def step(
        self,
        tokens: Sequence[Sequence[int]],
        sequence_ids: Sequence[int] | None = None,
        starts: Sequence[bool] | None = None,
    ) -> np.ndarray:
        if not tokens:
            raise EngineError("a step needs at least one row of input_ids")
        for row, toks in enumerate(tokens):
            if len(toks) == 0:
                raise EngineError(f"row {row} of input_ids is empty")
            bad = [t for t in toks if not 0 <= t < self.shape.vocab_size]
            if bad:
                raise EngineError(
                    f"row {row}: token id {bad[0]} outside the vocabulary [0, "
                    f"{self.shape.vocab_size})"
                )
        if sequence_ids is None:
            fresh = _Batch.empty(self.shape, self.ops, rows=len(tokens))
            fresh.ids = [-1] * len(tokens)
            self._check_length(fresh.ids, fresh.lengths, tokens)
            logits, _ = self._run(fresh, tokens)
            return logits

        if len(sequence_ids) != len(tokens):
            raise EngineError("sequence_ids and input_ids have different batch sizes")
        starts = list(starts) if starts is not None else [False] * len(tokens)
        if len(set(sequence_ids)) != len(sequence_ids):
            raise EngineError("a sequence id appears twice in one step")
        new_rows = [r for r, s in enumerate(starts) if s]
        old_rows = [r for r, s in enumerate(starts) if not s]
        for r in new_rows:
            if sequence_ids[r] in self._row_of:
                raise EngineError(f"sequence {sequence_ids[r]} is already active")
        for r in old_rows:
            if sequence_ids[r] not in self._row_of:
                raise EngineError(
                    f"unknown sequence {sequence_ids[r]}: it was never started, has ended or "
                    "was released"
                )
        if self.cached_sequences + len(new_rows) > self.max_sequences:
            raise EngineError(
                f"too many live sequences: {self.cached_sequences} cached + {len(new_rows)} "
                f"new > max_sequences {self.max_sequences}"
            )

        # Validated whole, then computed on a copy: the new state is committed only when every
        # row succeeded, so a step that raises (a prefill that fails) changes no cache.
        old_ids = [sequence_ids[r] for r in old_rows]
        old_lengths = self._batch.lengths[self._rows(old_ids)]
        self._check_length(old_ids, old_lengths, [tokens[r] for r in old_rows])
        fresh = _Batch.empty(self.shape, self.ops, rows=len(new_rows))
        fresh.ids = [sequence_ids[r] for r in new_rows]
        self._check_length(fresh.ids, fresh.lengths, [tokens[r] for r in new_rows])

        logits = np.empty((len(tokens), self.shape.vocab_size), np.float32)
        batch = self._batch
        if new_rows:  # first: the likelier to fail, and then no decode work is wasted
            logits[new_rows], fresh = self._run(fresh, [tokens[r] for r in new_rows])
        if old_rows:
            logits[old_rows], batch = self._stepped(old_ids, [tokens[r] for r in old_rows])
        if new_rows:
            batch = _merge(batch, fresh, self.ops)
        self._set_batch(batch)
        return logits

    def release(self, sequence_ids: Sequence[int]) -> int:
        """Free the caches of these sequences; unknown ids are ignored. Returns how many."""
        gone = {s for s in sequence_ids if s in self._row_of}
        if gone:
            keep = np.array([r for r, s in enumerate(self._batch.ids) if s not in gone], np.int64)
            self._set_batch(self._batch.select(keep, self.ops).trim_left(self.ops))
        return len(gone)

    def release_all(self) -> int:
        return self.release(list(self._batch.ids))

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Undo every cache change made inside if it raises: several calls fail as one.

        Cheap, because a batch is never changed in place: each step or release makes a new one.
        """
        saved = self._batch
        try:
            yield
        except BaseException:
            self._set_batch(saved)
            raise

    # -- internals -------------------------------------------------------------------------
    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        return np.array([self._row_of[s] for s in ids], np.int64)

    def _stepped(self, ids: list[int], tokens) -> tuple[np.ndarray, _Batch]:
        """Decode ``ids``: their logits and the batch that results, not yet committed."""
        batch = self._batch
        if ids == batch.ids:  # every live sequence steps, in cache order: no gather
            return self._run(batch, tokens)
        rows = self._rows(ids)
        logits, stepped = self._run(batch.select(rows, self.ops), tokens)
        others = np.setdiff1d(np.arange(len(batch.ids)), rows)
        return logits, _merge(batch.select(others, self.ops), stepped, self.ops).trim_left(self.ops)

    def _check_length(self, ids, lengths, tokens) -> None:
        for sid, length, toks in zip(ids, lengths, tokens, strict=True):
            if length + len(toks) > self.shape.max_positions:
                raise EngineError(
                    f"sequence {sid}: {int(length)} + {len(toks)} tokens exceed the context "
                    f"window of {self.shape.max_positions}"
                )

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

    def _set_batch(self, batch: _Batch) -> None:
        self._batch = batch
        self._row_of = {s: r for r, s in enumerate(batch.ids)}
