import numpy as np
import pytest

from gpt2_triton.errors import RequestValidationError
from gpt2_triton.request import GenerationRequest


def inputs(**kw):
    base = {"text_input": np.array([[b"Hello"]], dtype=object)}
    base.update({k: np.array([v]) if not isinstance(v, np.ndarray) else v for k, v in kw.items()})
    return base


def test_defaults():
    r = GenerationRequest.from_inputs(inputs())
    assert r.prompt == "Hello" and r.max_tokens is None and not r.stream
    assert r.sampling.temperature == 1.0 and r.stop_words == ()


def test_values_with_any_shape_of_one():
    r = GenerationRequest.from_inputs(
        inputs(
            max_tokens=np.array([[5]], np.int32),
            stream=np.array([True]),
            temperature=np.array([[0.0]], np.float32),
            seed=np.array([3], np.uint64),
            stop_words=np.array([[b"\n", b"", b"User:"]], dtype=object),
        )
    )
    assert (r.max_tokens, r.stream, r.sampling.temperature, r.sampling.seed) == (5, True, 0, 3)
    assert r.stop_words == ("\n", "User:")


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"max_tokens": np.array([0], np.int32)}, "max_tokens"),
        ({"max_tokens": np.array([1, 2], np.int32)}, "max_tokens"),
        ({"top_p": np.array([2.0], np.float32)}, "top_p"),
        ({"temperature": np.array([b"hot"], dtype=object)}, "temperature"),
        ({"text_input": np.array([b"\xff\xfe"], dtype=object)}, "text_input"),
        ({"stop_words": np.array([b"w%d" % i for i in range(17)], dtype=object)}, "stop_words"),
    ],
)
def test_bad_input_names_the_field(kw, field):
    with pytest.raises(RequestValidationError, match=field):
        GenerationRequest.from_inputs(inputs(**kw))


def test_text_input_is_required():
    with pytest.raises(RequestValidationError, match="text_input is required"):
        GenerationRequest.from_inputs({})


def test_parameters_that_are_not_triton_s_own_are_misspelt_inputs():
    from gpt2_triton.request import check_parameters

    check_parameters({})
    check_parameters({"triton_enable_empty_final_response": True, "priority": 1})
    with pytest.raises(RequestValidationError, match="unknown input 'max_token'.*max_tokens"):
        check_parameters({"max_token": 3})
