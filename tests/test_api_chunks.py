"""The gateway's streamed text chunks: the same events pydantic would render, field for field."""

from __future__ import annotations

import json

import pytest

from api.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from api.serving_engine import TextChunks, sse

TEXTS = ["hello", ' "quoted" and \\ back', "line\nbreak\ttab", "é ü 漢字 \u2028", "\ue000", ""]


def _completion(index: int, text: str) -> CompletionResponse:
    return CompletionResponse(
        id="cmpl-x", created=7, model="gpt2", choices=[CompletionChoice(index=index, text=text)]
    )


def _chat(index: int, text: str) -> ChatCompletionChunk:
    choice = ChatStreamChoice(index=index, delta=DeltaMessage(content=text))
    return ChatCompletionChunk(id="chatcmpl-x", created=7, model="gpt2", choices=[choice])


@pytest.mark.parametrize("render", [_completion, _chat])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("index", [0, 3])
def test_a_text_chunk_is_the_event_pydantic_renders(render, text, index):
    chunks = TextChunks(render)
    chunks(index, "warm the template up")
    event = chunks(index, text)
    expected = sse(render(index, text))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event.removeprefix("data: ")) == json.loads(expected.removeprefix("data: "))
