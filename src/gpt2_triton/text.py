"""Text <-> token ids with the checkpoint's own tokenizer (Hugging Face ``tokenizers``).

Loaded from ``tokenizer.json`` with the Rust ``tokenizers`` library directly: the server's
processes that tokenize (``tokenizer``, ``gpt2``) then never import ``transformers``,
which saves ~150 MB of memory in each and seconds of start-up.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2_triton.errors import CheckpointError


class TextCodec:
    def __init__(self, tokenizer_dir: Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(tokenizer_dir)
        try:
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except Exception as exc:  # missing file, malformed JSON, unknown model type
            raise CheckpointError(f"cannot load the tokenizer from {folder}: {exc}") from exc
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eos_id = self._tokenizer.token_to_id(eos) if eos else None
        if eos_id is None:
            raise CheckpointError(f"the tokenizer in {folder} has no end-of-text token")
        self.eos_token_id: int = eos_id

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for: a text of more characters
        than ``n * max_token_bytes`` has more than ``n`` tokens. (A byte-level vocabulary
        spells each byte with one character of up to 2 bytes: the bound is generous.)"""
        return max(len(token.encode()) for token in self._tokenizer.get_vocab())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; an empty text starts from ``<|endoftext|>``, GPT-2's
        document boundary, which is how it generates unconditionally."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
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
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)
