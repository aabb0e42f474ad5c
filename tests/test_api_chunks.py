"""The gateway's streamed text chunks: the same events pydantic would render, field for field."""

from __future__ import annotations

import json

import pytest

from api.protocol import (
    MAX_OPENAI_SEED,
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from api.serving_engine import TextChunks, choice_seed, sse
from gpt2_triton.sampling import MAX_SEED

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


@pytest.mark.parametrize("final", [False, True])
def test_a_piece_is_read_from_the_raw_response_as_tritonclient_reads_it(final):
    """The gateway reads Triton's raw output contents itself: the same values as
    tritonclient's own ``as_numpy``, on a real ModelInferResponse."""
    import numpy as np
    from tritonclient.grpc import InferResult, service_pb2
    from tritonclient.utils import serialize_byte_tensor

    from api.triton import _piece
    from gpt2_triton import names

    response = service_pb2.ModelInferResponse(model_name="gpt2")
    outputs = [(names.TEXT_OUTPUT, "BYTES", np.array(["é a \u2028".encode()], dtype=object))]
    if final:
        outputs += [
            (names.FINISH_REASON, "BYTES", np.array([b"length"], dtype=object)),
            (names.NUM_INPUT_TOKENS, "INT32", np.array([7], dtype=np.int32)),
            (names.NUM_OUTPUT_TOKENS, "INT32", np.array([300], dtype=np.int32)),
        ]
    for name, datatype, array in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        response.raw_output_contents.append(raw)
    result = InferResult(response)

    piece = _piece(result)
    assert piece.text == result.as_numpy(names.TEXT_OUTPUT)[0].decode()
    if final:
        assert piece.finish_reason == "length"
        assert (piece.num_input_tokens, piece.num_output_tokens) == (7, 300)
    else:
        assert (piece.finish_reason, piece.num_input_tokens, piece.num_output_tokens) == ("", 0, 0)


def test_every_seed_and_choice_is_its_own_model_seed():
    """The model's seed 0 is "a fresh random seed": never sent for a seed asked for, and
    no two OpenAI seeds (or two choices of one request) share a model seed, at the edges
    where the wrap-round happens too."""
    assert choice_seed(None, 3) is None
    edges = [0, 1, 2, MAX_OPENAI_SEED - 16, MAX_OPENAI_SEED - 1, MAX_OPENAI_SEED]
    for seed in edges:
        seeds = [choice_seed(seed, i) for i in range(16)]
        assert len(set(seeds)) == 16 and all(1 <= s <= MAX_SEED for s in seeds), seed
    firsts = [choice_seed(seed, 0) for seed in edges]
    assert len(set(firsts)) == len(edges)
    assert choice_seed(MAX_OPENAI_SEED, 1) == choice_seed(0, 0) == 1  # seed + 1, wrapped
