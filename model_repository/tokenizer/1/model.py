"""Triton adapter: text_input -> input_ids, input_lengths (gpt2_triton.text)."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from gpt2_triton import lifeline, model_config, names
from gpt2_triton.request import text_values
from gpt2_triton.text import TextCodec


class TritonPythonModel:
    def initialize(self, args):
        lifeline.exit_with_parent()  # no stub outlives a server that died by a signal
        config = json.loads(args["model_config"])
        params = model_config.parameters(config)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.codec = TextCodec(folder / model_config.require(params, "tokenizer_dir", "tokenizer"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = pb_utils.get_input_tensor_by_name(request, names.TEXT_INPUT).as_numpy()
                ids, lengths = self.codec.encode_batch(text_values(texts, names.TEXT_INPUT))
                responses.append(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor(names.INPUT_IDS, ids),
                            pb_utils.Tensor(names.INPUT_LENGTHS, lengths),
                        ]
                    )
                )
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                    )
                )
        return responses
