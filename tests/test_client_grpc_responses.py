"""How the client reads one gRPC stream response (``_grpc_chunk``, a pure function),
on responses built as tritonclient builds them from the wire."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from client.core import ClientError, _grpc_chunk


def response(final: bool, **outputs) -> InferResult:
    """A ``gpt2`` stream response with these outputs (text as str, counts as int)."""
    message = service_pb2.ModelInferResponse(model_name="gpt2")
    message.parameters["triton_final_response"].bool_param = final
    for name, value in outputs.items():
        output = message.outputs.add(name=name, shape=[1])
        if isinstance(value, str):
            output.datatype = "BYTES"
            raw = serialize_byte_tensor(np.array([value.encode()], dtype=object)).item()
        else:
            output.datatype = "INT32"
            raw = np.array([value], np.int32).tobytes()
        message.raw_output_contents.append(raw)
    return InferResult(message)


def test_a_bare_final_flag_is_a_cut_stream_not_a_short_result():
    """The model ends a request with a bare final flag when it could not send its real
    final response (gpt2/1/model.py close()): the text is incomplete, as when an HTTP
    stream ends before its final event."""
    with pytest.raises(ClientError) as exc:
        _grpc_chunk(response(final=True))
    assert exc.value.status == "UNAVAILABLE"
    assert "ended before its final response" in str(exc.value)


def test_a_final_response_without_a_finish_reason_is_a_cut_stream_too():
    with pytest.raises(ClientError) as exc:
        _grpc_chunk(response(final=True, text_output=" the"))
    assert exc.value.status == "UNAVAILABLE"


def test_pieces_and_the_final_response_are_read_as_before():
    piece = _grpc_chunk(response(final=False, text_output=" walks"))
    assert (piece.text, piece.final, piece.finish_reason) == (" walks", False, "")
    assert _grpc_chunk(response(final=False)) is None  # an empty piece: nothing to yield
    last = _grpc_chunk(
        response(
            final=True,
            text_output=" to",
            finish_reason="length",
            num_input_tokens=2,
            num_output_tokens=3,
        )
    )
    assert (last.text, last.final, last.finish_reason) == (" to", True, "length")
    assert (last.num_input_tokens, last.num_output_tokens) == (2, 3)
