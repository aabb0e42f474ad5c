"""Triton adapter over gpt2_triton.batcher: streaming text generation, in-flight batching.

``execute`` only parses and queues (it returns at once, as a decoupled model may); one
background thread runs the generation loop: one engine step per iteration for all live
sequences, on this model's own engine (``engine_placement`` in_process) or on the
``engine`` model by BLS (bls). Responses go out from a second thread (``ResponseWorker``)
while the loop waits on the next engine step. At unload the loop fails what is left itself,
then the response thread sends every final still queued.
"""

import json
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from gpt2_triton import heap, lifeline, model_config, names
from gpt2_triton.batcher import (
    MAX_BURST_WINDOW_MS,
    BatcherLimits,
    InflightBatcher,
    QueueFullError,
    ShuttingDownError,
)
from gpt2_triton.engine_gauges import EngineGauges
from gpt2_triton.engines.factory import build_engine_from_params, takes_prompt_chunks
from gpt2_triton.engines.protocol import pack_tokens, unpack_tokens
from gpt2_triton.errors import EngineError, RequestValidationError
from gpt2_triton.request import GenerationRequest, check_parameters
from gpt2_triton.sending import MAX_LANES, ResponseWorker
from gpt2_triton.text import TextCodec

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_EVERY_S = 0.5
# Freed heap goes back to the OS once the loop has been idle this long (heap.py), not at
# once: a request that comes after a short pause then finds its memory still mapped. The
# first request after a give-back pays for fresh pages: with 1 s, the benchmark's waves
# (the service idle while the peer's wave ran) had int8 TTFT p50 73 ms at one stream
# against 38-47 ms in runs without it, and 704 against 443 ms at 16 streams with the
# trim at once.
GIVE_BACK_AFTER_S = 15.0
STOP_TIMEOUT_S = 30  # a step in progress ends first; an engine step takes well under a second
# response_sender.is_cancelled() is a round trip to the server process: each stream is
# asked at most every 50 ms, and at most 4 streams a step (those asked longest ago first),
# instead of every stream every step. A cancelled stream leaves within max(50 ms, 4 steps
# at 16 streams) plus one step: ~50 ms at one stream, ~250 ms at 16 (steps of ~50 ms).
CANCEL_CHECK_INTERVAL_S = 0.05
CANCEL_CHECKS_PER_STEP = 4


class TritonPythonModel:
    def initialize(self, args):
        lifeline.exit_with_parent()  # this stub runs its own threads: it must die with the server
        config = json.loads(args["model_config"])
        if not model_config.is_decoupled(config):
            raise pb_utils.TritonModelException(
                "model 'gpt2' must be decoupled (model_transaction_policy { decoupled: true })"
            )
        params = model_config.parameters(config)
        folder = Path(args["model_repository"]) / args["model_version"]
        codec = TextCodec(folder / model_config.require(params, "tokenizer_dir", "gpt2"))
        max_active = model_config.int_param(params, "max_active", "gpt2", minimum=1)
        self.engine, self.gauges = self._engine(params, folder, max_active)
        limits = BatcherLimits(
            max_positions=model_config.int_param(params, "context_window", "gpt2", minimum=2),
            eos_token_id=codec.eos_token_id,
            max_active=max_active,
            max_queue=model_config.int_param(params, "max_queue", "gpt2", minimum=1),
            max_prefill_tokens=model_config.int_param(
                params, "max_prefill_tokens", "gpt2", minimum=1
            ),
            burst_window_s=model_config.int_param(
                params, "burst_window_ms", "gpt2", minimum=0, maximum=MAX_BURST_WINDOW_MS
            )
            / 1e3,
            chunked_prefill=takes_prompt_chunks(
                model_config.require(params, "engine_kind", "gpt2")
            ),
            cancel_check_interval_s=CANCEL_CHECK_INTERVAL_S,
            cancel_checks_per_step=CANCEL_CHECKS_PER_STEP,
            vocab_size=self._vocab_size(params),
            decode_ahead=self._decode_ahead(params, self.engine),
        )
        self.batcher = InflightBatcher(self.engine, codec, limits)
        lanes = model_config.int_param(
            params, "response_lanes", "gpt2", minimum=1, maximum=MAX_LANES
        )
        # a request keeps its lane: lanes beyond the streams that can be live would idle
        self.responses = ResponseWorker(max_pending=8 * max_active, lanes=min(lanes, max_active))
        capped = f" (response_lanes {lanes}, capped at max_active)" if lanes > max_active else ""
        pb_utils.Logger.log_info(f"gpt2: responses sent on {self.responses.lanes} lanes{capped}")
        if limits.decode_ahead:
            pb_utils.Logger.log_info("gpt2: decode steps run ahead (decode_ahead)")
        self.metrics = Metrics(self.batcher.stats)
        self.stop = threading.Event()
        self.last_metrics = 0.0
        self.loop = threading.Thread(target=self._run, name="gpt2-generation", daemon=True)
        self.loop.start()

    @staticmethod
    def _engine(params, folder, max_active):
        placement = model_config.require(params, "engine_placement", "gpt2")
        if placement == "bls":
            return BlsEngine(model_config.require(params, "engine_model", "gpt2")), None
        if placement != "in_process":
            raise pb_utils.TritonModelException(
                f"model 'gpt2': engine_placement must be in_process or bls, got {placement!r}"
            )
        kind = model_config.require(params, "engine_kind", "gpt2")
        engine = build_engine_from_params(
            params,
            folder / model_config.require(params, "engine_dir", "gpt2"),
            "gpt2",
            max_sequences=max_active,
        )
        pb_utils.Logger.log_info(
            f"gpt2: engine '{kind}' in process, KV cache {engine.kv_cache}: {engine.shape}"
        )
        describe = getattr(engine.forward, "describe", None)  # the torch engine's own line
        if describe:
            pb_utils.Logger.log_info(f"gpt2: {describe()}")
        return engine, EngineGauges(pb_utils, kind, "gpt2")

    @staticmethod
    def _decode_ahead(params, engine) -> bool:
        """``decode_ahead``: asked for and possible (the torch engine in process), or an error
        at load rather than a setting that silently does nothing."""
        asked = "decode_ahead" in params and model_config.int_param(params, "decode_ahead", "gpt2")
        if asked and not getattr(engine, "decodes_ahead", False):
            raise pb_utils.TritonModelException(
                "model 'gpt2': decode_ahead needs the torch engine in process "
                "(engine_placement in_process) with static decode steps"
            )
        return bool(asked)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            try:
                check_parameters(json.loads(request.parameters() or "{}"))
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                if names.INPUT_IDS in inputs:  # a forward (the engine model's next_token step)
                    self._forward(inputs, sink)
                    continue
                generation = GenerationRequest.from_inputs(inputs)
                sink.outputs_on_every_piece = generation.outputs_on_every_piece
                self.batcher.submit(generation, self.responses.wrap(sink))
            except (RequestValidationError, EngineError) as exc:
                sink.send_error(str(exc), pb_utils.TritonError.INVALID_ARG)
            except (QueueFullError, ShuttingDownError) as exc:
                sink.send_error(str(exc), pb_utils.TritonError.UNAVAILABLE)
            except Exception:
                pb_utils.Logger.log_error(f"gpt2: cannot queue request: {traceback.format_exc()}")
                sink.send_error("internal error while queueing the request")
        return None

    def _forward(self, inputs, sink):
        """A stateless forward for the ``engine`` model (which holds no weights of its own):
        ``input_ids`` (1, B, T) and ``input_lengths`` (1, B) in, one final response with
        ``logits`` (1, B, vocab), sent from the loop's thread when the rows are done."""
        if names.TEXT_INPUT in inputs:
            raise RequestValidationError(
                f"send {names.TEXT_INPUT} (generation) or {names.INPUT_IDS} (a forward), not both"
            )
        lengths = inputs.get(names.INPUT_LENGTHS)
        tokens = unpack_tokens(inputs[names.INPUT_IDS][0], None if lengths is None else lengths[0])

        def reply(logits, error):
            if error is None:
                tensor = pb_utils.Tensor(names.LOGITS, logits[np.newaxis])
                sink.sender.send(pb_utils.InferenceResponse([tensor]), flags=FINAL)
            elif isinstance(error, ShuttingDownError):
                sink.send_error(str(error), pb_utils.TritonError.UNAVAILABLE)
            else:
                sink.send_error(f"forward failed: {error}")

        self.batcher.submit_forward(tokens, reply)

    def _vocab_size(self, params) -> int:
        """What a forward's token ids are checked against, in both placements: by BLS the
        engine model would refuse a bad id as well, but its answer cannot tell a refused
        input from its own failure. A repository rendered before the parameter existed
        falls back to the engine in process (by BLS: none, the engine checks)."""
        if "vocab_size" in params:
            return model_config.int_param(params, "vocab_size", "gpt2", minimum=1)
        pb_utils.Logger.log_warn("gpt2: no vocab_size parameter (make repo renders it)")
        shape = getattr(self.engine, "shape", None)
        return shape.vocab_size if shape else 0

    def _run(self):
        try:
            self.batcher.run(
                self.stop, self._publish_metrics, heap.release_free_heap, GIVE_BACK_AFTER_S
            )
        except Exception:
            pb_utils.Logger.log_error(f"gpt2 loop stopped: {traceback.format_exc()}")

    def _publish_metrics(self):
        now = time.monotonic()
        if now - self.last_metrics > METRICS_EVERY_S:
            self.last_metrics = now
            try:
                self.metrics.publish()
                if self.gauges:
                    self.gauges.publish(self.engine)
            except Exception:
                pb_utils.Logger.log_error(f"gpt2 metrics: {traceback.format_exc()}")

    def finalize(self):
        self.stop.set()
        self.batcher.wake()
        self.loop.join(timeout=STOP_TIMEOUT_S)  # the loop fails what is left, then returns
        if self.loop.is_alive():
            pb_utils.Logger.log_error(
                f"gpt2: the generation loop did not stop in {STOP_TIMEOUT_S} s; requests it "
                "still holds may get no final response"
            )
        self.responses.close()  # after the loop: every final it queued goes out


class TritonSink:
    """A request's response sender, seen by the batcher as a ResponseSink."""

    def __init__(self, sender):
        self.sender = sender
        self.outputs_on_every_piece = frozenset()  # the request's return_* flags

    def send(self, output, final):
        # Every output is a tensor in shared memory here, a copy in tritonserver and a
        # field the client parses, once per token per stream: the pieces before the last
        # carry the text alone unless the request asked for more (16 streams: +7%
        # tokens/s, docs/PERFORMANCE.md).
        every = final or bool(output.finish_reason)
        wanted = self.outputs_on_every_piece
        tensors = [
            pb_utils.Tensor(names.TEXT_OUTPUT, np.array([output.text.encode()], dtype=object))
        ]
        if every or names.FINISH_REASON in wanted:
            reason = np.array([output.finish_reason.encode()], dtype=object)
            tensors.append(pb_utils.Tensor(names.FINISH_REASON, reason))
        if every or names.NUM_INPUT_TOKENS in wanted:
            count = np.array([output.num_input_tokens], np.int32)
            tensors.append(pb_utils.Tensor(names.NUM_INPUT_TOKENS, count))
        if every or names.NUM_OUTPUT_TOKENS in wanted:
            count = np.array([output.num_output_tokens], np.int32)
            tensors.append(pb_utils.Tensor(names.NUM_OUTPUT_TOKENS, count))
        self.sender.send(
            pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0
        )

    def send_error(self, message, code=None):
        # TritonError exists only once the stub runs the model, not at config auto-complete
        error = pb_utils.TritonError(message, code or pb_utils.TritonError.INTERNAL)
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def is_cancelled(self):
        return self.sender.is_cancelled()

    def close(self):
        self.sender.send(flags=FINAL)


class BlsEngine:
    """The ``engine`` model called by BLS, seen by the batcher as an EngineClient."""

    def __init__(self, model_name):
        self.model_name = model_name

    def step(self, tokens, sequence_ids, starts):
        ids, lengths = pack_tokens(tokens)
        return self._call(
            [
                pb_utils.Tensor(names.INPUT_IDS, ids),
                pb_utils.Tensor(names.INPUT_LENGTHS, lengths),
                pb_utils.Tensor(names.SEQUENCE_IDS, np.asarray(sequence_ids, np.uint64)),
                pb_utils.Tensor(names.SEQUENCE_START, np.asarray(starts, np.bool_)),
            ]
        )

    def release(self, sequence_ids):
        self._call([pb_utils.Tensor(names.RELEASE_IDS, np.asarray(sequence_ids, np.uint64))])

    def _call(self, tensors):
        response = pb_utils.InferenceRequest(
            model_name=self.model_name, inputs=tensors, requested_output_names=[names.LOGITS]
        ).exec()
        if response.has_error():
            raise EngineError(response.error().message())
        return pb_utils.get_output_tensor_by_name(response, names.LOGITS).as_numpy()


class Metrics:
    """Publishes the batcher's counters on Triton's metrics port (prefix gpt2_)."""

    def __init__(self, stats):
        self.stats = stats
        # A MetricFamily must outlive its Metric objects: keep both.
        self.families = {}
        self.requests = {}  # finish_reason -> Metric
        self.tokens = self._metric("gpt2_output_tokens_total", "Tokens generated", counter=True)
        self.steps = self._metric("gpt2_engine_steps_total", "Batched engine steps", counter=True)
        self.ttft = self._metric(
            "gpt2_time_to_first_token_seconds_total",
            "Sum over requests of queue + prompt time to the first token",
            counter=True,
        )
        self.step_time = self._metric(
            "gpt2_step_seconds_total", "Time in batched steps (engine call included)", counter=True
        )
        self.engine_time = self._metric(
            "gpt2_engine_call_seconds_total",
            "Time in the engine call (BLS) of each step",
            counter=True,
        )
        self.heap_returns = self._metric(
            "gpt2_idle_heap_returns_total",
            f"Times the loop, idle for {GIVE_BACK_AFTER_S:g} s, gave its freed heap back",
            counter=True,
        )
        self.burst_windows = self._metric(
            "gpt2_burst_windows_total",
            "First steps after an idle loop that held the burst window",
            counter=True,
        )
        self.steps_ahead = self._metric(
            "gpt2_steps_ahead_total",
            "Decode steps queued on the device before the last one's tokens were read "
            "(decode_ahead)",
            counter=True,
        )
        self.active = self._metric(names.ACTIVE_SEQUENCES_METRIC, "Sequences in the running batch")
        self.waiting = self._metric(names.WAITING_REQUESTS_METRIC, "Requests queued to join")
        self.published = {}  # counter name -> value already published

    def _metric(self, name, description, counter=False, labels=None):
        family = self.families.get(name)
        if family is None:
            kind = pb_utils.MetricFamily.COUNTER if counter else pb_utils.MetricFamily.GAUGE
            family = self.families[name] = pb_utils.MetricFamily(
                name=name, description=description, kind=kind
            )
        return family.Metric(labels=labels or {})

    def _advance(self, key, metric, value):
        if value > self.published.get(key, 0):
            metric.increment(value - self.published.get(key, 0))
            self.published[key] = value

    def publish(self):
        s = self.stats
        for reason, count in list(s.requests.items()):
            if reason not in self.requests:
                self.requests[reason] = self._metric(
                    "gpt2_requests_total",
                    "Finished requests by finish reason",
                    counter=True,
                    labels={"finish_reason": reason},
                )
            self._advance(("requests", reason), self.requests[reason], count)
        self._advance("tokens", self.tokens, s.output_tokens)
        self._advance("steps", self.steps, s.steps)
        self._advance("ttft", self.ttft, s.first_token_seconds_total)
        self._advance("step_time", self.step_time, s.step_seconds_total)
        self._advance("engine_time", self.engine_time, s.engine_seconds_total)
        self._advance("heap_returns", self.heap_returns, s.idle_hooks)
        self._advance("burst_windows", self.burst_windows, s.burst_windows)
        self._advance("steps_ahead", self.steps_ahead, s.steps_ahead)
        self.active.set(s.active)
        self.waiting.set(s.waiting)
