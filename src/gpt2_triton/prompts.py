"""Fixed prompts of varied length for the consistency report and the benchmarks."""

from __future__ import annotations

_SENTENCES = [
    "The cat looks at the river every morning.",
    "Hello, my name is",
    "In 1998, the city council decided to build a new bridge across the river, and",
    "The chef at the café paints the naïve painting at night.",
    "Machine learning models are trained on large amounts of text so that they",
    "Once upon a time, in a small village near the mountains, there lived",
    "The quick brown fox jumps over the lazy dog.",
    "東京 is a city where",
    "The teacher writes about the old bridge before the rain because the light is soft.",
    "Python is a programming language that",
    "A young fox runs past the quiet station when the sun rises.",
    "The history of the Roman Empire spans more than a thousand years, from the founding of",
]


def varied_prompts(count: int = 32) -> list[str]:
    """``count`` prompts: whole sentences, their prefixes and joined pairs (1 to ~60 tokens)."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        sentence = _SENTENCES[i % len(_SENTENCES)]
        kind = (i // len(_SENTENCES)) % 3
        if kind == 0:
            out.append(sentence)
        elif kind == 1:
            words = sentence.split()
            out.append(" ".join(words[: max(1, len(words) // 3)]))
        else:
            out.append(sentence + " " + _SENTENCES[(i + 5) % len(_SENTENCES)])
        i += 1
    return out
