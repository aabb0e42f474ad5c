"""Triton adapter over gpt2_triton.engines: the stateful KV-cache engine.

Runs requests one by one in this single instance, which holds every live sequence's cache.
Exports gauges of the caches it holds on the metrics port. With ``engine_holder`` gpt2
(engine placement in process) it holds no engine: it passes each stateless step to gpt2,
so the server holds the weights once, and refuses stateful ones.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from gpt2_triton import lifeline, model_config, names
from gpt2_triton.engine_gauges import EngineGauges
from gpt2_triton.engines import protocol
from gpt2_triton.engines.factory import build_engine_from_params
from gpt2_triton.errors import EngineError, RequestValidationError
from gpt2_triton.request import check_forward_rows

STATEFUL_INPUTS = (names.SEQUENCE_IDS, names.SEQUENCE_START, names.RELEASE_IDS)


class TritonPythonModel:
    def initialize(self, args):
        lifeline.exit_with_parent()  # a stub left behind by a crashed server holds the caches
        config = json.loads(args["model_config"])
        params = model_config.parameters(config)
        self.logger = pb_utils.Logger
        kind = model_config.require(params, "engine_kind", "engine")
        self.holder = params.get("engine_holder") or "self"
        self.engine = None
        self.max_sequences = model_config.int_param(params, "max_sequences", "engine", minimum=1)
        if self.holder != "self":
            # what the holder would refuse is refused here, as INVALID_ARG: an error's
            # code does not survive the decoupled BLS reply (it arrives as INTERNAL)
            self.window = model_config.int_param(params, "context_window", "engine", minimum=1)
            self.vocab_size = model_config.int_param(params, "vocab_size", "engine", minimum=1)
            self.logger.log_info(
                f"engine '{kind}': model '{self.holder}' holds the only copy; this model "
                "passes stateless steps to it and refuses stateful ones (PLACEMENT=bls "
                "serves them here)"
            )
            return
        folder = Path(args["model_repository"]) / args["model_version"]
        self.engine = build_engine_from_params(params, folder, "engine", self.max_sequences)
        self.gauges = EngineGauges(pb_utils, kind, "engine")
        self.logger.log_info(
            f"engine '{kind}' ready, KV cache {self.engine.kv_cache}: {self.engine.shape}"
        )

    def execute(self, requests):
        if self.engine is None:
            return [self._passed_on(request) for request in requests]
        responses = []
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                logits = protocol.serve(self.engine, inputs)
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor(names.LOGITS, logits)])
                )
            except EngineError as exc:
                responses.append(_error(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception as exc:
                self.logger.log_error(f"engine step failed: {traceback.format_exc()}")
                responses.append(_error(f"engine failure: {exc}", pb_utils.TritonError.INTERNAL))
        self.gauges.publish(self.engine)
        return responses

    def _passed_on(self, request):
        """A stateless step, run by the holder's loop (a forward request to gpt2)."""
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        stateful = [name for name in STATEFUL_INPUTS if name in inputs]
        if stateful:
            return _error(
                f"model 'engine' holds no caches here ({', '.join(stateful)} given): "
                f"'{self.holder}' runs the only copy of the engine, and its caches are its "
                "streams'; stateless steps (no sequence_ids) work, and a repository rendered "
                "with PLACEMENT=bls serves stateful ones",
                pb_utils.TritonError.INVALID_ARG,
            )
        ids = inputs.get(names.INPUT_IDS)
        if ids is None:
            return _error(f"send {names.INPUT_IDS}", pb_utils.TritonError.INVALID_ARG)
        try:
            tokens = protocol.unpack_tokens(ids, inputs.get(names.INPUT_LENGTHS))
            check_forward_rows(tokens, self.max_sequences, self.window, self.vocab_size)
        except (EngineError, RequestValidationError) as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        ids, lengths = protocol.pack_tokens(tokens)
        tensors = [
            pb_utils.Tensor(names.INPUT_IDS, ids[np.newaxis]),
            pb_utils.Tensor(names.INPUT_LENGTHS, lengths[np.newaxis]),
        ]
        try:
            replies = pb_utils.InferenceRequest(
                model_name=self.holder, inputs=tensors, requested_output_names=[names.LOGITS]
            ).exec(decoupled=True)
            for reply in replies:  # one response with the logits, or one with an error
                if reply.has_error():
                    error = reply.error()
                    return _error(error.message(), error.code())
                tensor = pb_utils.get_output_tensor_by_name(reply, names.LOGITS)
                if tensor is not None:
                    return pb_utils.InferenceResponse(
                        [pb_utils.Tensor(names.LOGITS, tensor.as_numpy()[0])]
                    )
        except Exception as exc:  # the holder is not loaded, or the call broke
            self.logger.log_error(f"engine: the step by '{self.holder}' failed: {exc}")
            return _error(
                f"model 'engine' could not reach '{self.holder}': {exc}",
                pb_utils.TritonError.UNAVAILABLE,
            )
        return _error(f"'{self.holder}' answered without logits", pb_utils.TritonError.INTERNAL)

    def finalize(self):
        if self.engine is not None:
            self.engine.release_all()


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
