"""Token ids -> streamed text: only complete characters, never half a stop word.

Decoding one token alone loses what depends on its neighbours (a multi-byte character split
over two byte-level tokens). So each step decodes a short window of recent ids and emits
the new suffix once it no longer ends in an incomplete character; the window then moves on,
which keeps the work per token constant however long the text grows.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence decodes to


class IncrementalDetokenizer:
    def __init__(self, decode, stop_words: Sequence[str] = ()) -> None:
        """``decode(ids) -> str`` is the tokenizer's decode."""
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: the text before it is settled
        self._read = 0  # ids up to here have been turned into text
        self._stop_words = tuple(w for w in stop_words if w)
        self._pending = ""  # decoded but held back: may be the start of a stop word
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop word was found; nothing more is emitted

    def add(self, token_id: int) -> str:
        """Append one token; return the text that can be shown now (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :])
        if window.endswith(REPLACEMENT):
            return ""  # the character is not complete yet
        settled = self._decode(self._ids[self._prefix : self._read])
        delta = window[len(settled) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(delta)

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete tail decodes as U+FFFD).

        Checked for stop words too: a stop word completed by a last token that ends in half a
        character is only whole here; ``stopped`` then says so.
        """
        if self.stopped:
            return ""
        tail = ""
        if self._read < len(self._ids):
            window = self._decode(self._ids[self._prefix :])
            tail = window[len(self._decode(self._ids[self._prefix : self._read])) :]
            self._read = len(self._ids)
        out, held = self._release(tail), self._pending
        # No more text comes: what is held as a stop word's start is plain text.
        self._pending = ""
        self.text += held
        return out + held

    def _release(self, delta: str) -> str:
        buffer = self._pending + delta
        hits = [(buffer.find(w), w) for w in self._stop_words if w in buffer]
        if hits:
            cut = min(hits)[0]
            self.stopped = True
            self._pending = ""
            self.text += buffer[:cut]
            return buffer[:cut]
        hold = longest_stop_prefix(buffer, self._stop_words)
        out, self._pending = buffer[: len(buffer) - hold], buffer[len(buffer) - hold :]
        self.text += out
        return out


def longest_stop_prefix(text: str, stop_words: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that a stop word starts with."""
    best = 0
    for word in stop_words:
        for n in range(min(len(word) - 1, len(text)), best, -1):
            if text.endswith(word[:n]):
                best = n
                break
    return best
