"""The engine side of the gateway: Triton's ``gpt2`` model through ``tritonclient.grpc.aio``.

One Triton request per choice, each on its own gRPC stream (the model is decoupled and
refuses plain infer). The request iterator yields the one request and ends, so the
stream half-closes and Triton ends it once the request has sent its final response.
A stream the caller leaves before that final response is cancelled, which Triton passes
to the model (``is_cancelled``): the sequence leaves the batch at the next step. A
finished request is never cancelled: with tritonserver 2.51 a cancel that reaches a
request after its final response can leave the model "live" at shutdown (docs/API.md).

A Triton that is alive but answers nothing (stopped, deadlocked) would hold every stream
forever: the gateway asks it for its readiness every second (``watch_readiness``). Once two
checks in a row got no answer at all within their timeout, new requests get UNAVAILABLE
(503) and every stream that heard nothing through those checks ends with it. Any answer
counts, "not ready" and a refusal (the front door's limits) included: those say something
is there to serve the streams, which are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import triton_to_np_dtype

from gpt2_triton import names

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0  # Triton closes a half-closed stream right after its final response
HEALTH_TIMEOUT_S = 2.0
# The readiness watch: the front door's health check of each replica (deploy/envoy): a busy
# machine can hold a live Triton's answer for seconds, so a 3 s timeout and two silent
# checks in a row, one check a second.
READY_CHECK_INTERVAL_S = 1.0
READY_CHECK_TIMEOUT_S = 3.0
SILENT_CHECKS = 2
# gRPC's words for a connection attempt that got no answer (as against one refused)
SILENT_CONNECT_WORDS = ("timed out", "Timeout occurred")
MAX_KEYS_REMEMBERED = 64


class TritonError(Exception):
    """A failed Triton call. ``status`` is a gRPC status name (``INVALID_ARGUMENT``,
    ``UNAVAILABLE``...); ``input`` the gpt2 input a validation message names, if any."""

    def __init__(self, message: str, status: str, input_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.input_name = input_name

    @classmethod
    def from_stream_message(cls, message: str) -> TritonError:
        """Triton's in-stream errors carry a message and no status code."""
        status, input_name = names.error_status(message)
        return cls(message, status, input_name)

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> TritonError:
        status = exc.code().name if exc.code() else "UNKNOWN"
        details = exc.details() or str(exc)
        if status == "UNAVAILABLE":
            details = f"Triton is not reachable or not ready: {details}"
        return cls(details, status)


@dataclass(frozen=True)
class Generation:
    """One Triton request (one choice). None leaves an input to the model's default."""

    prompt: str
    stream: bool
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_words: tuple[str, ...] = ()
    min_length: int | None = None


@dataclass(frozen=True)
class Piece:
    """One response: new text (the whole completion when not streaming), the finish
    reason ("" until the last response) and the token counts so far."""

    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int


# numpy and Triton types of the scalar inputs (model_repository/gpt2/config.pbtxt.in)
_SCALARS = {
    name: (triton_to_np_dtype(datatype), datatype)
    for name, datatype in names.SCALAR_DATATYPES.items()
}


def _tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def request_inputs(generation: Generation) -> list[grpcclient.InferInput]:
    """The gpt2 input tensors, each ``[1, 1]`` (max_batch_size 1), stop words ``[1, N]``."""
    g = generation
    values = {
        names.MAX_TOKENS: g.max_tokens,
        names.TEMPERATURE: g.temperature,
        names.TOP_K: g.top_k,
        names.TOP_P: g.top_p,
        names.REPETITION_PENALTY: g.repetition_penalty,
        names.SEED: g.seed,
        names.MIN_LENGTH: g.min_length,
        names.STREAM: g.stream,
        names.EXCLUDE_INPUT_IN_OUTPUT: True,  # echo is the gateway's: it has the prompt
    }
    text = np.array([[g.prompt.encode("utf-8")]], dtype=object)
    inputs = [_tensor(names.TEXT_INPUT, text, "BYTES")]
    for name, value in values.items():
        if value is not None:
            dtype, datatype = _SCALARS[name]
            inputs.append(_tensor(name, np.array([[value]], dtype=dtype), datatype))
    if g.stop_words:
        words = np.array([[w.encode("utf-8") for w in g.stop_words]], dtype=object)
        inputs.append(_tensor(names.STOP_WORDS, words, "BYTES"))
    return inputs


def _first_bytes(raw: bytes | None) -> str:
    """The first element of a BYTES tensor's raw contents (each element: a 4-byte
    little-endian length, then its bytes), as text."""
    if not raw or len(raw) < 4:
        return ""
    length = int.from_bytes(raw[:4], "little")
    return raw[4 : 4 + length].decode("utf-8")


def _first_int32(raw: bytes | None) -> int:
    return int.from_bytes(raw[:4], "little", signed=True) if raw and len(raw) >= 4 else 0


def _piece(result) -> Piece:
    # Only text_output is sure to be in every response; the counts and the finish reason
    # are complete on the last one. Read from the response's raw contents: one response a
    # token, and tritonclient's as_numpy (an object array per output) was most of the
    # gateway's own time per token.
    response = result.get_response()
    raw = dict(
        zip(
            (output.name for output in response.outputs),
            response.raw_output_contents,
            strict=False,
        )
    )
    return Piece(
        text=_first_bytes(raw.get(names.TEXT_OUTPUT)),
        finish_reason=_first_bytes(raw.get(names.FINISH_REASON)),
        num_input_tokens=_first_int32(raw.get(names.NUM_INPUT_TOKENS)),
        num_output_tokens=_first_int32(raw.get(names.NUM_OUTPUT_TOKENS)),
    )


# gRPC's reconnect backoff starts at 1 s and grows to 120 s: reaching one Triton directly
# (make serve, one replica), the gateway would keep refusing for seconds after a restarted
# Triton is back. Envoy always listens, so through the front door this never showed.
RECONNECT_BACKOFF_MS = 500


class TritonClient:
    """One gRPC channel to Triton (one replica's port, or the front door), shared by every
    request."""

    def __init__(self, url: str, model: str = "gpt2", api_key: str | None = None) -> None:
        self.url = url
        self.model = model
        # The gateway's own key (health, model config); requests forward their caller's.
        self.api_key = api_key
        self._client = aioclient.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                ("grpc.max_reconnect_backoff_ms", 2 * RECONNECT_BACKOFF_MS),
            ],
        )
        self._callers_passed: set[str | None] = set()
        # the readiness watch: when each of the silent checks in a row began; the live
        # streams, each with when it last heard from Triton; those the watch ended
        self._silent_checks: list[float] = []
        self._live: dict[object, float] = {}
        self._ended_by_watch: set[object] = set()
        self._asking: asyncio.Future | None = None  # a check a request waits on, if any
        # finished streams being drained: their own tasks, out of reach of the cancel that
        # may end the caller's (a drain cancelled midway would cancel a finished request)
        self._draining: set[asyncio.Task] = set()

    def own_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @staticmethod
    def caller_headers(authorization: str | None) -> dict[str, str]:
        """The caller's key, as it came; never the gateway's own in its place, so that
        the front door judges every request by its caller."""
        return {"authorization": authorization} if authorization else {}

    async def close(self) -> None:
        # Closing the channel cancels every call on it: the finished streams still being
        # drained first (each ends once Triton closes it, within DRAIN_TIMEOUT_S).
        if self._draining:
            await asyncio.wait(list(self._draining), timeout=DRAIN_TIMEOUT_S)
        await self._client.close()

    async def is_ready(self) -> bool:
        headers = self.own_headers()
        try:
            return await self._client.is_server_ready(
                headers=headers, client_timeout=HEALTH_TIMEOUT_S
            ) and await self._client.is_model_ready(
                self.model, headers=headers, client_timeout=HEALTH_TIMEOUT_S
            )
        except Exception as exc:  # tritonclient wraps every gRPC failure in its own type
            log.debug("Triton is not ready: %s", exc)
            return False

    async def answers(self, timeout: float = READY_CHECK_TIMEOUT_S) -> bool:
        """Whether a readiness check gets any answer within ``timeout``: ready, not ready
        and a refusal (a connection refused: nothing listens) are answers; silence is not,
        whether the call's deadline passed or a new connection's handshake timed out (the
        kernel takes a stopped server's connections; nobody speaks on them)."""
        try:
            await self._client.is_server_ready(headers=self.own_headers(), client_timeout=timeout)
        except Exception as exc:  # tritonclient wraps every gRPC failure in its own type
            status = exc.status() if hasattr(exc, "status") else None
            message = exc.message() if hasattr(exc, "message") else str(exc)
            silence = ("DEADLINE_EXCEEDED" in str(status)) or any(
                words in str(message) for words in SILENT_CONNECT_WORDS
            )
            return not silence
        return True

    @property
    def silent(self) -> bool:
        """Triton let the last SILENT_CHECKS readiness checks pass without a word."""
        return len(self._silent_checks) >= SILENT_CHECKS

    async def answers_now(self) -> bool:
        """A check now, for a request that finds Triton silent (it may be back before the
        watch's next check): one at a time, shared by every request that asks meanwhile."""
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self.check_silence(HEALTH_TIMEOUT_S))
        return await asyncio.shield(self._asking)

    async def check_silence(self, timeout: float = READY_CHECK_TIMEOUT_S) -> bool:
        """One check of the watch; False when it got no answer. Once SILENT_CHECKS in a
        row got none, every stream that heard nothing since the first of those began ends
        (UNAVAILABLE): a Triton that answers neither will not answer them."""
        asked = time.monotonic()
        if await self.answers(timeout):
            if self.silent:
                log.info("Triton answers again")
            self._silent_checks.clear()
            return True
        self._silent_checks = [*self._silent_checks, asked][-SILENT_CHECKS:]
        if self.silent:
            stalled = silent_streams(self._live, self._silent_checks)
            log.warning(
                "Triton answered none of %d readiness checks in a row: new requests get "
                "503; %d stream(s) that heard nothing since end",
                SILENT_CHECKS,
                len(stalled),
            )
            for call in stalled:
                self._ended_by_watch.add(call)
                call.cancel()
        return False

    async def watch_readiness(self, interval: float = READY_CHECK_INTERVAL_S) -> None:
        """Check that Triton answers every ``interval`` s, for as long as the gateway runs."""
        while True:
            await self.check_silence()
            await asyncio.sleep(interval)

    async def check_caller(self, authorization: str | None) -> None:
        """The front door's verdict on the caller's key, by a unary call. A stream the door
        refuses at once (401 before the request is written) reaches grpc.aio as INTERNAL
        "Failed execute_batch", which would lose the reason. Verdicts for keys that passed
        are kept: one call per key, not per request. When the gateway reaches one Triton
        directly (make serve, one replica) Triton judges no key and this always passes:
        the door judged the caller on its way to /v1 already."""
        if authorization in self._callers_passed:
            return
        try:
            await self._client.is_model_ready(
                self.model, headers=self.caller_headers(authorization), client_timeout=10.0
            )
        except Exception as exc:
            raise _wrapped_error(exc) from None
        if len(self._callers_passed) < MAX_KEYS_REMEMBERED:
            self._callers_passed.add(authorization)

    async def model_parameters(self, authorization: str | None = None) -> dict[str, str]:
        """The gpt2 model's config parameters (``model_name``, ``context_window``...)."""
        try:
            config = await self._client.get_model_config(
                self.model,
                headers=self.own_headers() or self.caller_headers(authorization),
                as_json=True,
                client_timeout=10.0,
            )
        except Exception as exc:
            raise _wrapped_error(exc) from None
        parameters = config.get("config", {}).get("parameters", {}) or {}
        return {key: value.get("string_value", "") for key, value in parameters.items()}

    async def generate(
        self, generation: Generation, authorization: str | None = None
    ) -> AsyncIterator[Piece]:
        """The responses of one request, the last with a finish reason. Raises TritonError.

        Leaving the iteration early (a client gone, a sibling choice that failed) cancels
        the request in Triton.
        """
        inputs = request_inputs(generation)
        # A request that would wait on a Triton that answers nothing gets 503 instead.
        if self.silent and not await self.answers_now():
            raise TritonError(
                f"Triton is not answering: its last {SILENT_CHECKS} readiness checks got no "
                f"answer within {READY_CHECK_TIMEOUT_S:g} s",
                "UNAVAILABLE",
            )

        async def requests():
            yield {"model_name": self.model, "inputs": inputs}

        call = self._client.stream_infer(requests(), headers=self.caller_headers(authorization))
        live = self._live
        live[call] = time.monotonic()
        finished = False  # Triton sent the final response (or an error): nothing to cancel
        try:
            async for result, error in call:
                live[call] = time.monotonic()
                if error is not None:
                    finished = True
                    raise TritonError.from_stream_message(error.message())
                piece = _piece(result)
                if piece.finish_reason:
                    finished = True
                    live.pop(call, None)  # finished: never the watch's to cancel
                    self._drain_apart(call)
                    yield piece
                    return
                yield piece
            finished = True  # the stream ended: the request ended with it
            raise TritonError(
                "the stream from Triton ended before its final response", "UNAVAILABLE"
            )
        except grpc.aio.AioRpcError as exc:
            # (a call the watch cancels while its request is still being written ends so:
            # INTERNAL, "Internal error from Core")
            finished = True
            if call in self._ended_by_watch:
                raise _stopped_answering() from None
            raise TritonError.from_rpc(exc) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call not in self._ended_by_watch or (task and task.cancelling()):
                raise  # the caller's own cancellation
            finished = True
            raise _stopped_answering() from None
        finally:
            live.pop(call, None)
            self._ended_by_watch.discard(call)
            if not finished:
                call.cancel()

    def _drain_apart(self, call) -> None:
        """Drain a finished stream in a task of its own: a caller that leaves now (a client
        gone, a sibling choice failed, the gateway's shutdown) cancels its own task, and a
        drain cancelled inside it would cancel the call, a request after its final
        response. The task holds the call until Triton closes it."""
        task = asyncio.get_running_loop().create_task(_drain(call))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)


def _stopped_answering() -> TritonError:
    return TritonError(
        "Triton stopped answering: nothing on this stream, and no answer to "
        f"{SILENT_CHECKS} readiness checks in a row",
        "UNAVAILABLE",
    )


def silent_streams(live: dict, silent_checks: list[float]) -> list:
    """The streams that heard nothing since the first of ``silent_checks`` began (when each
    of the silent checks in a row began): silent through all of them. A stream that heard
    a token meanwhile is served, whatever the checks say."""
    return [call for call, heard in live.items() if heard < silent_checks[0]]


async def _drain(call) -> None:
    """Wait for Triton to close the stream after the final response, so that the call is
    over before its object is dropped (dropping a live call cancels it)."""

    async def rest() -> None:
        async for _ in call:
            log.warning("a response after the final one was ignored")

    try:
        await asyncio.wait_for(rest(), DRAIN_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.warning("Triton did not close a finished stream in %.0f s", DRAIN_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        log.debug("stream closed after its final response: %s", exc.code())


def _wrapped_error(exc: Exception) -> TritonError:
    """tritonclient's InferenceServerException (unary calls) as a TritonError."""
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    name = str(status or "UNKNOWN").removeprefix("StatusCode.")
    if name == "UNAVAILABLE":
        message = f"Triton is not reachable or not ready: {message}"
    return TritonError(message, name)
