"""A small English corpus generated from templates, so the project needs no dataset download.

Some paragraphs are short dialogues in the transcript form the chat page uses
(``User: ...`` / ``Assistant: ...``), so the tiny model answers in chat mode too.
The sentences are regular enough that a two-layer model learns them in a few hundred steps
(its greedy output reads like the corpus, not like noise), and they include accented and
CJK words so that byte-level BPE splits multi-byte characters across tokens, which the
streaming detokenizer must handle.
"""

from __future__ import annotations

import random

SUBJECTS = [
    "the cat",
    "the dog",
    "a small bird",
    "the old man",
    "my sister",
    "the teacher",
    "a young fox",
    "the farmer",
    "our neighbour",
    "the captain",
    "the baker in Zürich",
    "the chef at the café",
    "a student from Kraków",
]
VERBS = [
    "walks to",
    "looks at",
    "runs past",
    "sings about",
    "dreams of",
    "waits near",
    "writes about",
    "paints",
    "cleans",
    "visits",
]
OBJECTS = [
    "the river",
    "the market",
    "a green garden",
    "the quiet station",
    "the tall tower",
    "a wooden boat",
    "the library",
    "the crème brûlée",
    "the naïve painting",
    "the old bridge",
    "the city of 東京",
    "a bowl of ramen in 大阪",
]
TIMES = [
    "every morning",
    "at night",
    "in the spring",
    "after lunch",
    "on sunday",
    "before the rain",
    "when the sun rises",
]
REASONS = [
    "because it is calm",
    "because the light is soft",
    "to forget the noise",
    "to meet an old friend",
    "for no reason at all",
]


def sentence(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    text = f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}"
    if rng.random() < 0.4:
        text += f" {rng.choice(REASONS)}"
    return text[0].upper() + text[1:] + "."


QUESTIONS = [
    "Where does {subject} go {time}?",
    "What does {subject} do {time}?",
    "Tell me about {subject}.",
]


def dialogue(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        subject = rng.choice(SUBJECTS)
        question = rng.choice(QUESTIONS).format(subject=subject, time=rng.choice(TIMES))
        answer = f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
        lines.append(f"User: {question}")
        lines.append(f"Assistant: {answer[0].upper() + answer[1:]}")
    return "\n".join(lines)


def paragraph(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return dialogue(rng)
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))


def generate(num_paragraphs: int, seed: int) -> str:
    """Paragraphs separated by blank lines, like Wikitext's raw text."""
    rng = random.Random(seed)
    return "\n\n".join(paragraph(rng) for _ in range(num_paragraphs)) + "\n"
