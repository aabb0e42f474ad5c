"""Text <-> token ids with the checkpoint's own tokenizer (Hugging Face ``tokenizers``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2_triton.errors import CheckpointError


class TextCodec:
    def __init__(self, tokenizer_dir: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as exc:
            raise CheckpointError(f"cannot load the tokenizer from {tokenizer_dir}: {exc}") from exc
        self.eos_token_id: int = self._tokenizer.eos_token_id
        # The Rust tokenizer directly: the Python wrapper adds ~20 us of checks per call,
        # which the streaming loop pays once per token.
        self._fast = self._tokenizer.backend_tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; an empty text starts from ``<|endoftext|>``, GPT-2's
        document boundary, which is how it generates unconditionally."""
        ids = self._fast.encode(text, add_special_tokens=False).ids
        return ids or [self.eos_token_id]

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``input_ids`` (B, T) int64 and ``input_lengths`` (B,) int32."""
        rows = [self.encode(t) for t in texts]
        lengths = np.array([len(r) for r in rows], np.int32)
        ids = np.full((len(rows), int(lengths.max(initial=1))), self.eos_token_id, np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return ids, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=True)
