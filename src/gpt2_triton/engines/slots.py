"""Per-sequence KV caches in slots of preallocated buffers, written in place.

Each live sequence owns one row ("slot") of 2 x layers buffers ``(max_sequences, heads,
context window, head_dim)``; its keys and values sit at positions ``[0, length)`` of its
row, and the forward (``onnx_slots.OnnxSlotForward``) writes a step's new ones at each
row's own position. Nothing is ever concatenated or padded:

- the slots hold two runs, decoding ``[0, D)`` then filling ``[D, n)`` (sequences whose
  prompt is still going in, whole or in chunks). A decode step for every decoding
  sequence is one forward on the rows ``[0, D)``: a view, nothing copied;
- a prompt, or a chunk of one, runs on its own row(s): new prompts of one width together
  on fresh rows after the filling run, later chunks a row at a time (ONNX Runtime's
  kernel takes several new tokens on a non-empty cache for one row only);
- each of these groups of rows is one forward, or, with a forward that takes two at once
  (``pair``: ONNX Runtime's), the decoding rows and the first prompt or chunk share one
  forward, and the rest go two by two: a step of decoding rows and one chunk (or one
  width of new prompts) reads the weights once, not twice; a step with more groups (a
  prompt's last chunk and the next one's first, of other widths) reads them once a pair;
- a sequence joins the decoding run at its first one-token step by trading rows with
  the first filling one; a finished one's row is refilled with the run's last. Either
  moves one or two sequences' keys and values, never the batch's.

The buffers are allocated zeroed and untouched, so the operating system gives them memory
only where positions are written; they are freed when no sequence is left (host memory;
the torch engine's static cache on a GPU stays, its graphs replay over it). Positions at
or past a row's length hold zeros: a move or a leave clears what it leaves behind, as a
reader of a whole window (the CUDA graphs' decode) needs. A step that raises commits
nothing: it may have written keys and values past a row's length, which the next step
there overwrites, and rows it traded hold the same sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from gpt2_triton import heap
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.stateful import check_step
from gpt2_triton.errors import EngineError

# (input_ids (B, S), lengths before the step (B,), position_ids (B, S), caches: 2 x layers
# views (B, heads, window, head_dim) written in place) -> logits (B, vocab)
SlotForwardFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], np.ndarray]


class Group(NamedTuple):
    """Rows of one width for one forward: ``input_ids`` and ``position_ids`` (rows, width),
    ``lengths`` (rows,) each row's length before the step, ``caches`` the 2 x layers views
    ``(rows, heads, capacity, head_dim)`` written in place."""

    input_ids: np.ndarray
    lengths: np.ndarray
    position_ids: np.ndarray
    caches: list


class HostCaches:
    """Slots in host memory (numpy), the ONNX Runtime forward's: allocated zeroed when the
    first sequence comes and freed when the last leaves. A forward that keeps its cache
    elsewhere brings its own (``torch_slots.TorchCaches``: the static cache on the GPU)."""

    def __init__(self, shape: ModelShape, dtype) -> None:
        self.shape = shape
        self.dtype = dtype

    def allocate(
        self, rows: int, persistent: bool, positions: int | None = None
    ) -> list[np.ndarray]:
        """Buffers of ``rows`` slots: the engine's own (``persistent``, the whole window)
        or scratch rows of ``positions`` for a stateless step."""
        s = self.shape
        size = (rows, s.num_heads, positions or s.max_positions, s.head_dim)
        return [np.zeros(size, self.dtype) for _ in range(2 * s.num_layers)]

    frees_on_release = True  # release() gives the memory back: no row needs clearing first

    def release(self, buffers: list[np.ndarray]) -> None:
        """No sequence is left: the buffers go (the engine drops its references)."""

    def copy(self, view: np.ndarray) -> np.ndarray:
        return view.copy()

    def forget(self, row: np.ndarray) -> None:
        """A vacated row's pages: the OS takes them back, they read as zeros again."""
        heap.forget_pages(row)

    def clear(self, positions: np.ndarray) -> None:
        positions.fill(0)

    def logits(self, rows: int, vocab: int) -> np.ndarray:
        return np.empty((rows, vocab), np.float32)


class SlotEngine:
    """``StatefulEngine``'s contract (``step``, ``release``, ``atomic``...) on slots."""

    kv_cache = "in place"

    def __init__(self, forward: SlotForwardFn, shape: ModelShape, max_sequences: int = 64):
        self.forward = forward
        self.shape = shape
        self.max_sequences = max_sequences
        self.dtype = getattr(forward, "dtype", np.float32)
        self.caches = getattr(forward, "caches", None) or HostCaches(shape, self.dtype)
        self._buffers: list[np.ndarray] = []
        self._ids: list[int] = []  # slot -> sequence id, slots [0, n)
        self._slot: dict[int, int] = {}
        self._lengths = np.zeros(max_sequences, np.int64)
        self._decoding = 0  # D: slots [0, D) decode, [D, n) are filling
        # inside atomic(): what each release took away, to put back if the block fails
        self._journal: list[tuple[int, bool, int, list[np.ndarray]]] | None = None
        # a decode step run ahead (step_ahead): sequence id -> (its slot then, its token),
        # and that step's logits (slot order), until the step that it stands for comes
        self._ahead: dict[int, tuple[int, int]] = {}
        self._ahead_logits = None
        self.steps_ahead = 0  # steps run ahead; of which taken back (the step did not come)
        self.steps_ahead_taken_back = 0

    # -- what the gauges and the batcher read ------------------------------------------------
    @property
    def cached_sequences(self) -> int:
        return len(self._ids)

    @property
    def cached_tokens(self) -> int:
        """Positions held: the keys and values the callers have stepped, no padding (a step
        decoded ahead counts once it is taken, as in ``sequence_length``)."""
        return int(self._lengths[: len(self._ids)].sum()) - len(self._ahead)

    def holds(self, sequence_id: int) -> bool:
        return sequence_id in self._slot

    def sequence_length(self, sequence_id: int) -> int:
        """Positions the caller has stepped (a step decoded ahead counts once it is taken)."""
        pending = sequence_id in self._ahead
        return int(self._lengths[self._slot[sequence_id]]) - pending

    @property
    def decodes_ahead(self) -> bool:
        """Whether ``step_ahead`` can run: a forward with static decode steps (torch's)."""
        return getattr(self.forward, "ahead", None) is not None and bool(
            getattr(self.forward, "static_decode", False)
        )

    # -- the contract ----------------------------------------------------------------------
    def step(
        self,
        tokens: Sequence[Sequence[int]],
        sequence_ids: Sequence[int] | None = None,
        starts: Sequence[bool] | None = None,
    ) -> np.ndarray:
        starts = check_step(self, tokens, sequence_ids, starts)
        if (
            self._ahead
            and sequence_ids is not None
            and not self._stands_for_ahead(tokens, sequence_ids, starts)
        ):
            self._take_back_ahead()
        logits = self.caches.logits(len(tokens), self.shape.vocab_size)
        if sequence_ids is None:  # stateless: each width on scratch rows, kept nowhere
            stateless = []
            for rows in _by_width(tokens, range(len(tokens))):
                width = len(tokens[rows[0]])
                scratch = self.caches.allocate(len(rows), persistent=False, positions=width)
                stateless.append((rows, self._prompt_group([tokens[r] for r in rows], scratch, 0)))
            self._run(stateless, logits)
            return logits
        self._ensure_buffers()
        filling = {s for s in self._ids[self._decoding :]}
        new = [r for r in range(len(tokens)) if starts[r]]
        one_by_one = [r for r in range(len(tokens)) if not starts[r] and len(tokens[r]) > 1]
        decode = [r for r in range(len(tokens)) if not starts[r] and len(tokens[r]) == 1]
        for r in decode:  # a filling sequence's first one-token step: it joins the run
            if sequence_ids[r] in filling:
                self._swap(self._slot[sequence_ids[r]], self._decoding)
                self._decoding += 1

        # Every row that moves, moves now: a forward writes past a row's committed length,
        # and a move carries only that length.
        if decode:
            slots = self._gather_front([sequence_ids[r] for r in decode])

        # Each group of rows one forward needs: the decoding rows (a view, nothing copied),
        # new prompts of one width on fresh rows after the filling run (the sequences' own
        # slots once the step commits), a later chunk (or several tokens on a decoding
        # row) alone on its row. Decoding rows whose step ran ahead take its logits.
        groups: list[tuple[list[int], Group]] = []  # (rows of logits, the forward's inputs)
        ahead = bool(self._ahead)
        if ahead:
            self._take_ahead_logits(
                logits, decode, [self._ahead[sequence_ids[r]][0] for r in decode]
            )
        elif decode:
            rows = len(decode)
            order = [decode[i] for i in np.argsort(slots)]  # slots are [0, rows) in some order
            ids = np.array([tokens[r][0] for r in order], np.int64).reshape(rows, 1)
            lengths = self._lengths[:rows]
            views = [b[:rows] for b in self._buffers]
            groups.append((order, Group(ids, lengths, lengths.reshape(rows, 1), views)))
        first = len(self._ids)
        placed = []
        for rows in _by_width(tokens, new):
            start = first + len(placed)
            views = [b[start : start + len(rows)] for b in self._buffers]
            groups.append((rows, self._prompt_group([tokens[r] for r in rows], views, 0)))
            placed += rows
        for r in one_by_one:
            slot = self._slot[sequence_ids[r]]
            views = [b[slot : slot + 1] for b in self._buffers]
            past = int(self._lengths[slot])
            groups.append(([r], self._prompt_group([tokens[r]], views, past)))
        self._run(groups, logits)

        # commit
        for r in one_by_one + ([] if ahead else decode):
            self._lengths[self._slot[sequence_ids[r]]] += len(tokens[r])
        self._ahead, self._ahead_logits = {}, None
        for offset, r in enumerate(placed):
            slot = first + offset
            self._ids.append(sequence_ids[r])
            self._slot[sequence_ids[r]] = slot
            self._lengths[slot] = len(tokens[r])
        return logits

    def release(self, sequence_ids: Sequence[int]) -> int:
        """Free the caches of these sequences; unknown ids are ignored. Returns how many.

        All at once: the rows that stay close the gaps, each moving at most once, and rows
        that leave together never move. When every sequence leaves, nothing moves or is
        cleared row by row: host buffers are freed whole. (GPT-2 small, 16 sequences of
        ~100 positions leaving one by one: 44 ms, 19 ms of it copying rows that were
        leaving too; all at once now: 8 ms.)"""
        gone = [s for s in dict.fromkeys(sequence_ids) if self.holds(s)]
        if not gone:
            return 0
        for sid in gone:  # its step decoded ahead goes with it (the row is cleared whole)
            self._ahead.pop(sid, None)
        if not self._ahead:
            self._ahead_logits = None
        if self._journal is not None:  # their keys and values, to put back on failure
            for sid in gone:
                slot = self._slot[sid]
                length = int(self._lengths[slot])
                rows = [self.caches.copy(b[slot, :, :length]) for b in self._buffers]
                self._journal.append((sid, slot < self._decoding, length, rows))
        if len(gone) == len(self._ids):
            self._drop_all()
        else:
            self._drop(gone)
        return len(gone)

    def release_all(self) -> int:
        return self.release(list(self._ids))

    def step_ahead(self, sequence_ids: Sequence[int], tokens) -> np.ndarray:
        """Run the next decode step of every decoding sequence now, from ``tokens``, a
        (rows,) tensor on the engine's device (the tokens a step just sampled there, one
        per id, in the order of ``sequence_ids``), before the host has read them; returns
        them read (numpy, that order). The step counts as the caller's next one: when the
        caller then steps these sequences with these tokens, ``step`` returns its logits
        without running it; a step that differs (other sequences, other tokens) takes it
        back first (it never happened: lengths and keys as before). Only the decoding
        sequences, all of them (the slots ``[0, rows)`` a decode step runs on), and not
        inside ``atomic``. Raises EngineError where it cannot run; nothing is then
        committed.

        What it buys on a GPU: the step's kernels run while the host reads, detokenizes
        and sends the tokens, instead of after."""
        if not self.decodes_ahead:
            raise EngineError("this engine cannot decode ahead (it needs the torch engine's "
                              "static decode steps)")  # fmt: skip
        if self._journal is not None:
            raise EngineError("no decoding ahead inside atomic()")
        if self._ahead:
            raise EngineError("a step decoded ahead is still pending")
        rows = len(sequence_ids)
        slots = [self._slot.get(sid) for sid in sequence_ids]
        if (
            rows == 0
            or None in slots
            or rows != self._decoding
            or sorted(slots) != list(range(rows))
        ):
            raise EngineError("decoding ahead takes exactly the decoding sequences")
        if len(tokens) != rows:
            raise EngineError(f"{len(tokens)} tokens for {rows} sequences")
        lengths = self._lengths[:rows].copy()
        if lengths.max() >= self.shape.max_positions:
            raise EngineError("a sequence fills its context window: no position to decode ahead")
        order = np.empty(rows, np.int64)  # slot -> the caller's row
        order[slots] = np.arange(rows)
        read, logits = self.forward.ahead(tokens, order, lengths)
        self._lengths[:rows] += 1
        self.steps_ahead += 1
        self._ahead = {
            sid: (slot, int(read[row]))
            for row, (sid, slot) in enumerate(zip(sequence_ids, slots, strict=True))
        }
        self._ahead_logits = logits
        return read

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Undo the releases made inside if it raises: a release and a step fail as one.

        Releases take effect at once (a step in the block may start the same id again, or
        use the room), keeping a copy of what they freed; a step undoes itself (one that
        raises commits nothing); on failure the sequences a step in the block started
        leave, and the released ones come back.
        """
        if self._journal is not None:
            yield
            return
        self._take_back_ahead()  # a release in the block puts back only what callers stepped
        self._journal = []
        held = set(self._slot)
        try:
            yield
        except BaseException:
            journal, self._journal = self._journal, None
            # Sequences a step in the block started (it succeeded, something after it
            # failed) go first: the released ones come back into their room.
            self.release([sid for sid in self._ids if sid not in held])
            for sid, decoding, length, rows in reversed(journal):
                self._restore(sid, decoding, length, rows)
            raise
        self._journal = None

    # -- internals -------------------------------------------------------------------------
    def _stands_for_ahead(self, tokens, sequence_ids, starts) -> bool:
        """Whether this step is the one decoded ahead: the same sequences decoding, each
        the token it was run with."""
        decoding = {
            sid: toks[0]
            for sid, start, toks in zip(sequence_ids, starts, tokens, strict=True)
            if not start and len(toks) == 1
        }
        if decoding.keys() != self._ahead.keys():
            return False
        return all(self._ahead[sid][1] == token for sid, token in decoding.items())

    def _take_ahead_logits(self, logits, rows: list[int], ran: list[int]) -> None:
        """``logits[rows]`` = the step run ahead's rows ``ran`` (the slots they had then).
        In the usual case both are ``0..n-1`` (nobody left, nobody reordered): a slice copy,
        queued behind the step like everything else; otherwise the forward gathers the rows
        without waiting (``take_rows``), and only a scatter among other groups' rows waits
        for the device (a list index goes to the device by a blocking copy)."""
        count = len(rows)
        if ran == list(range(count)):
            picked = self._ahead_logits[:count]
        else:
            picked = self.forward.take_rows(self._ahead_logits, ran)
        if rows == list(range(count)):
            logits[:count] = picked
        else:
            logits[rows] = picked

    def _take_back_ahead(self) -> None:
        """Undo a step decoded ahead: each sequence's length back, its position cleared."""
        self.steps_ahead_taken_back += bool(self._ahead)
        for sid in self._ahead:
            if sid in self._slot:
                slot = self._slot[sid]
                self._lengths[slot] -= 1
                at = int(self._lengths[slot])
                for buffer in self._buffers:
                    self.caches.clear(buffer[slot, :, at : at + 1])
        self._ahead, self._ahead_logits = {}, None

    @staticmethod
    def _prompt_group(prompts: list[Sequence[int]], views: list[np.ndarray], past: int) -> Group:
        """Prompts (or chunks) of one width on ``views`` rows at ``past``."""
        width = len(prompts[0])
        ids = np.array(prompts, np.int64).reshape(len(prompts), width)
        positions = np.tile(np.arange(past, past + width, dtype=np.int64), (len(prompts), 1))
        lengths = np.full(len(prompts), past, np.int64)
        return Group(ids, lengths, positions, views)

    def _run(self, groups: list[tuple[list[int], Group]], logits: np.ndarray) -> None:
        """Each group's forward, its logits into ``logits`` at its rows. A forward that
        takes two groups at once (``pair``: ONNX Runtime's) gets them two by two, the
        decoding rows with the first prompt or chunk: one weight read for both."""
        pair = getattr(self.forward, "pair", None)
        if pair is None:
            for rows, inputs in groups:
                logits[rows] = self.forward(*inputs)
            return
        for at in range(0, len(groups), 2):
            (rows_a, a), *second = groups[at : at + 2]
            logits_a, logits_b = pair(a, second[0][1] if second else None)
            logits[rows_a] = logits_a
            if second:
                logits[second[0][0]] = logits_b

    def _ensure_buffers(self) -> None:
        if not self._buffers:  # host: zeroed, untouched, memory comes as positions are written
            self._buffers = self.caches.allocate(self.max_sequences, persistent=True)

    def _gather_front(self, ids: list[int]) -> list[int]:
        """Trade rows within the decoding run until ``ids`` hold slots ``[0, len(ids))``;
        their slots. Every decoding sequence steps in the common case: nothing moves."""
        for sid in ids:
            if self._slot[sid] >= len(ids):
                free = next(s for s in range(len(ids)) if self._ids[s] not in ids)
                self._swap(self._slot[sid], free)
        return [self._slot[sid] for sid in ids]

    def _restore(self, sid: int, decoding: bool, length: int, rows: list[np.ndarray]) -> None:
        if sid in self._slot:  # a failed block's restart of it
            self._drop([sid])
        self._ensure_buffers()
        slot = len(self._ids)
        for buffer, row in zip(self._buffers, rows, strict=True):
            buffer[slot, :, :length] = row
        self._ids.append(sid)
        self._slot[sid] = slot
        self._lengths[slot] = length
        if decoding:  # back into the decoding run, as a join does
            self._swap(slot, self._decoding)
            self._decoding += 1

    def _drop_all(self) -> None:
        if not self.caches.frees_on_release:  # the buffers stay: each used row reads as zeros
            for slot in range(len(self._ids)):
                for buffer in self._buffers:
                    self.caches.forget(buffer[slot])
        self._ids.clear()
        self._slot.clear()
        self._lengths[:] = 0
        self._decoding = 0
        self.caches.release(self._buffers)
        self._buffers = []

    def _drop(self, gone: list[int]) -> None:
        """Vacate the slots of ``gone``: the decoding run's rows past its new end fill its
        gaps, then the filling run's rows past the new end fill what is free in its new
        range, each row moving at most once; the rows past the new end read as zeros."""
        slots = {self._slot.pop(sid) for sid in gone}
        count, decoding = len(self._ids), self._decoding
        new_decoding = decoding - sum(1 for slot in slots if slot < decoding)
        new_count = count - len(slots)
        decoding_moves = list(
            zip(
                [r for r in range(new_decoding, decoding) if r not in slots],
                [t for t in range(new_decoding) if t in slots],
                strict=True,
            )
        )
        filling_moves = list(
            zip(
                [r for r in range(max(new_count, decoding), count) if r not in slots],
                [t for t in range(new_decoding, new_count) if t < decoding or t in slots],
                strict=True,
            )
        )
        for src, dst in decoding_moves + filling_moves:  # the decoding run's first
            self._move(src, dst)
        for slot in range(new_count, count):
            self._lengths[slot] = 0
            for buffer in self._buffers:
                self.caches.forget(buffer[slot])
        del self._ids[new_count:]
        self._decoding = new_decoding

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        length, old = int(self._lengths[src]), int(self._lengths[dst])
        for buffer in self._buffers:
            buffer[dst, :, :length] = buffer[src, :, :length]
            if old > length:  # what was there past the new length: zeros, as everywhere
                self.caches.clear(buffer[dst, :, length:old])
        self._lengths[dst] = length
        self._ids[dst] = self._ids[src]
        self._slot[self._ids[dst]] = dst

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        la, lb = int(self._lengths[a]), int(self._lengths[b])
        for buffer in self._buffers:
            kept = self.caches.copy(buffer[a, :, :la])
            buffer[a, :, :lb] = buffer[b, :, :lb]
            buffer[b, :, :la] = kept
            # the longer row's old tail, now past the shorter one's length: zeros again
            if la > lb:
                self.caches.clear(buffer[a, :, lb:la])
            elif lb > la:
                self.caches.clear(buffer[b, :, la:lb])
        self._lengths[a], self._lengths[b] = lb, la
        self._ids[a], self._ids[b] = self._ids[b], self._ids[a]
        self._slot[self._ids[a]], self._slot[self._ids[b]] = a, b


def _by_width(tokens: Sequence[Sequence[int]], rows) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(len(tokens[r]), []).append(r)
    return list(groups.values())
