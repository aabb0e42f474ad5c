"""Reading a model's parsed config.pbtxt, as the backend hands it to ``initialize``."""

import pytest

from gpt2_triton import model_config
from gpt2_triton.model_config import ModelConfigError

CONFIG = {
    "parameters": {
        "response_lanes": {"string_value": "4"},
        "engine_kind": {"string_value": "onnx"},
        "max_queue": {"string_value": "many"},
    },
    "model_transaction_policy": {"decoupled": True},
}


def test_parameters_are_read_as_strings():
    params = model_config.parameters(CONFIG)
    assert model_config.require(params, "engine_kind", "gpt2") == "onnx"
    assert model_config.int_param(params, "response_lanes", "gpt2", minimum=1) == 4
    assert model_config.is_decoupled(CONFIG) and not model_config.is_decoupled({})
    assert model_config.parameters({}) == {}


def test_a_parameter_an_older_repository_lacks_names_the_fix():
    params = model_config.parameters(CONFIG)
    with pytest.raises(ModelConfigError, match="'cuda_graphs' is missing.*'make repo'"):
        model_config.require(params, "cuda_graphs", "gpt2")


@pytest.mark.parametrize(
    "key, minimum, message",
    [("max_queue", 1, "must be an integer, got 'many'"), ("response_lanes", 5, "must be >= 5")],
)
def test_a_bad_integer_is_refused_with_its_name(key, minimum, message):
    params = model_config.parameters(CONFIG)
    with pytest.raises(ModelConfigError, match=f"parameter '{key}' {message}"):
        model_config.int_param(params, key, "gpt2", minimum=minimum)


def test_an_integer_above_its_maximum_is_refused():
    params = model_config.parameters(CONFIG)
    assert model_config.int_param(params, "response_lanes", "gpt2", maximum=4) == 4
    with pytest.raises(ModelConfigError, match="parameter 'response_lanes' must be <= 3"):
        model_config.int_param(params, "response_lanes", "gpt2", maximum=3)
