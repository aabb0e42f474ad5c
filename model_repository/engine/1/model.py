"""Triton adapter over gpt2_triton.engines: the stateful KV-cache engine.

Runs requests one by one in this single instance, which holds every live sequence's cache.
Exports gauges of the caches it holds on the metrics port. With ``engine_load``
on_first_request (gpt2 has its own copy) the engine is built when the first request comes.
"""

import json
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils

from gpt2_triton import lifeline, model_config, names
from gpt2_triton.engine_gauges import EngineGauges
from gpt2_triton.engines import protocol
from gpt2_triton.engines.factory import build_engine_from_params
from gpt2_triton.errors import EngineError


class TritonPythonModel:
    def initialize(self, args):
        lifeline.exit_with_parent()  # a stub left behind by a crashed server holds the caches
        config = json.loads(args["model_config"])
        params = model_config.parameters(config)
        self.logger = pb_utils.Logger
        kind = model_config.require(params, "engine_kind", "engine")
        self.holder = params.get("engine_holder") or "self"
        if self.holder != "self":  # the GPU engine lives in gpt2's process: no second copy
            self.engine = None
            self.logger.log_info(
                f"engine '{kind}': model '{self.holder}' holds the only copy; this model "
                "refuses steps (render with PLACEMENT=bls to serve them here)"
            )
            return
        self.kind = kind
        self.params = params
        self.folder = Path(args["model_repository"]) / args["model_version"]
        self.max_sequences = model_config.int_param(params, "max_sequences", "engine", minimum=1)
        self.gauges = EngineGauges(pb_utils, kind, "engine")
        self.engine = None
        self.load_error = None  # a failed load's message: every later request gets it
        # a repository rendered before engine_load existed loads at start, as it did then
        load = params.get("engine_load") or "at_start"
        if load == "at_start":
            self._load()
        elif load == "on_first_request":
            self.logger.log_info(f"engine '{kind}': loads on its first request")
        else:
            raise pb_utils.TritonModelException(
                f"model 'engine': engine_load must be at_start or on_first_request, got {load!r}"
            )

    def _load(self):
        self.engine = build_engine_from_params(
            self.params, self.folder, "engine", max_sequences=self.max_sequences
        )
        self.logger.log_info(f"engine '{self.kind}' ready: {self.engine.shape}")

    def execute(self, requests):
        if self.engine is None and self.holder == "self":
            if self.load_error is None:
                try:
                    self._load()
                except Exception as exc:  # a missing or broken export: tried once, not
                    # parsed again per request; fixed by a new export and a restart
                    self.logger.log_error(f"engine load failed: {traceback.format_exc()}")
                    self.load_error = f"model 'engine' could not load its engine: {exc}"
            if self.load_error is not None:
                return [_error(self.load_error, pb_utils.TritonError.UNAVAILABLE) for _ in requests]
        if self.engine is None:
            message = (
                f"model 'engine' holds no engine: '{self.holder}' runs the only copy of the "
                "GPU engine in its own process; render the repository with PLACEMENT=bls to "
                "call this model (and the next_token ensemble)"
            )
            return [_error(message, pb_utils.TritonError.UNAVAILABLE) for _ in requests]
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

    def finalize(self):
        if self.engine is not None:
            self.engine.release_all()


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
