"""The ``engine`` model's tensor contract, packed and unpacked without Triton.

Request: ``input_ids`` INT64 (B, T) right-padded with ``input_lengths`` INT32 (B,);
``sequence_ids`` UINT64 (B,) and ``sequence_start`` BOOL (B,) make the step stateful;
``release_ids`` UINT64 (N,) frees caches (alone, or before the step). Response: ``logits``
FP32 (B, vocab) for each row's last token ((0, vocab) for a release-only request).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gpt2_triton import names
from gpt2_triton.engines.stateful import StatefulEngine
from gpt2_triton.errors import EngineError


def host_logits(logits) -> np.ndarray:
    """An engine's logits as a numpy array: the torch engine leaves them, a tensor, on its
    device (for the device sampler); a caller that needs them on the host copies them here."""
    if isinstance(logits, np.ndarray):
        return logits
    return logits.float().cpu().numpy()


def pack_tokens(tokens: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` (B, T) and ``input_lengths`` (B,)."""
    lengths = np.fromiter((len(t) for t in tokens), np.int32, len(tokens))
    if lengths.size and lengths.max() == lengths.min():  # decode steps: one token each
        return np.asarray(tokens, np.int64).reshape(len(tokens), -1), lengths
    ids = np.zeros((len(tokens), int(lengths.max(initial=0))), np.int64)
    for row, toks in enumerate(tokens):
        ids[row, : len(toks)] = toks
    return ids, lengths


def unpack_tokens(ids: np.ndarray, lengths: np.ndarray | None) -> list[list[int]]:
    if ids.ndim != 2:
        raise EngineError(f"{names.INPUT_IDS} must be 2-D (batch, sequence), got {ids.shape}")
    if lengths is None:
        return ids.tolist()
    lengths = lengths.reshape(-1)
    if lengths.shape[0] != ids.shape[0]:
        raise EngineError(
            f"{names.INPUT_LENGTHS} has {lengths.shape[0]} rows, {names.INPUT_IDS} {ids.shape[0]}"
        )
    if (lengths < 1).any() or (lengths > ids.shape[1]).any():
        raise EngineError(f"{names.INPUT_LENGTHS} must be in [1, {ids.shape[1]}]")
    return [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)]


def serve(engine: StatefulEngine, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run one ``engine`` request; raises EngineError for a request that breaks the contract.

    All or nothing: the whole request is checked before it runs, and a step that fails undoes
    the release that came with it, so a failed request changes no cache.
    """
    release = inputs.get(names.RELEASE_IDS)
    ids = inputs.get(names.INPUT_IDS)
    if ids is None and release is None:
        raise EngineError(f"send {names.INPUT_IDS} (a step) or {names.RELEASE_IDS}")
    step = None if ids is None else _step_args(ids, inputs)
    with engine.atomic():
        if release is not None:
            engine.release(release.reshape(-1).tolist())
        if step is None:
            return np.zeros((0, engine.shape.vocab_size), np.float32)
        return host_logits(engine.step(*step))


def _step_args(ids: np.ndarray, inputs: Mapping[str, np.ndarray]) -> tuple:
    """``(tokens, sequence_ids, starts)`` for ``StatefulEngine.step``."""
    tokens = unpack_tokens(ids, inputs.get(names.INPUT_LENGTHS))
    sequence_ids = inputs.get(names.SEQUENCE_IDS)
    starts = inputs.get(names.SEQUENCE_START)
    if sequence_ids is None:
        if starts is not None:
            raise EngineError(f"{names.SEQUENCE_START} needs {names.SEQUENCE_IDS}")
        return tokens, None, None
    return (
        tokens,
        sequence_ids.reshape(-1).tolist(),
        starts.reshape(-1).tolist() if starts is not None else None,
    )
