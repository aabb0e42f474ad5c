"""Triton adapter: logits -> output_ids with gpt2_triton.sampling."""

import triton_python_backend_utils as pb_utils

from gpt2_triton import lifeline, names
from gpt2_triton.engines.protocol import unpack_tokens
from gpt2_triton.errors import Gpt2TritonError
from gpt2_triton.request import sampling_from_inputs
from gpt2_triton.sampling import sample_rows


class TritonPythonModel:
    def initialize(self, args):
        lifeline.exit_with_parent()  # no stub outlives a server that died by a signal

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                history = None
                if names.INPUT_IDS in inputs:  # the prompt: what repetition_penalty looks at
                    history = unpack_tokens(
                        inputs[names.INPUT_IDS], inputs.get(names.INPUT_LENGTHS)
                    )
                ids = sample_rows(inputs[names.LOGITS], sampling_from_inputs(inputs), history)
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor(names.OUTPUT_IDS, ids)])
                )
            except Gpt2TritonError as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                    )
                )
        return responses
