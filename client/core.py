"""gRPC (tritonclient, the default) and HTTP (Triton's generate extension) transports."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from gpt2_triton import names

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# wait_until_ready asks again after answers that waiting can change: a server down,
# starting or restarting, or silent; every RETRY_EVERY_S, no check shorter than MIN_CHECK_S
WORTH_WAITING = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
RETRY_EVERY_S = 0.5
MIN_CHECK_S = 0.1


class ClientError(Exception):
    """Anything that went wrong: bad parameters (``status`` INVALID_ARG), server down..."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GenerationParams:
    """Unset fields take the server's documented defaults (docs/API.md)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_words: tuple[str, ...] = ()
    exclude_input_in_output: bool = True  # the client returns the completion only
    min_length: int | None = None  # no EOS before this many tokens

    def as_json(self) -> dict:
        """The request's fields; raises ClientError for an integer its input's type cannot
        hold (numpy, and Triton's JSON parser, would wrap it round to another value)."""
        fields = {
            names.MAX_TOKENS: self.max_tokens,
            names.TEMPERATURE: self.temperature,
            names.TOP_K: self.top_k,
            names.TOP_P: self.top_p,
            names.REPETITION_PENALTY: self.repetition_penalty,
            names.SEED: self.seed,
            names.MIN_LENGTH: self.min_length,
        }
        out = {k: v for k, v in fields.items() if v is not None}
        for name, value in out.items():
            low, high = names.INTEGER_RANGES.get(names.SCALAR_DATATYPES[name], (None, None))
            if low is not None and not low <= value <= high:
                raise ClientError(
                    f"{name} must be in [{low}, {high}] ({names.SCALAR_DATATYPES[name]}), "
                    f"got {value}",
                    "INVALID_ARG",
                )
        if self.stop_words:
            out[names.STOP_WORDS] = [checked_text(names.STOP_WORDS, w) for w in self.stop_words]
        out[names.EXCLUDE_INPUT_IN_OUTPUT] = self.exclude_input_in_output
        return out


def check_address(url: str) -> None:
    """``url`` is host:port, as both transports take it; raises ClientError otherwise (a
    port past 65535 reached another port over gRPC, a scheme broke every HTTP call)."""
    host, sep, port = url.rpartition(":")
    if "://" in url:
        problem = "give host:port, without a scheme"
    elif not sep or not host or any(c.isspace() for c in url):
        problem = "expected host:port"
    elif not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        problem = "the port must be a number from 1 to 65535"
    elif host.startswith("[") != host.endswith("]"):
        problem = "an IPv6 host goes in brackets, as [::1]:8001"
    else:
        return
    raise ClientError(f"url {url!r}: {problem}", "INVALID_ARG")


def check_api_key(key: str) -> None:
    """The key goes in a header: printable ASCII with no spaces, as the front door takes
    it. A key read from a file often ends with a newline, which no header can carry."""
    if not key or not all("!" <= c <= "~" for c in key):
        raise ClientError(
            "the API key must be printable ASCII without spaces or line breaks (read "
            "from a file? strip its trailing newline)",
            "INVALID_ARG",
        )


def checked_text(name: str, text: str) -> str:
    """``text``, if UTF-8 can carry it: a command line's undecodable bytes arrive as lone
    surrogates ("caf\\udce9"), which no request can send."""
    at = names.lone_surrogate_at(text)
    if at is not None:
        raise ClientError(
            f"{name} is not valid UTF-8 text: character {at} is "
            f"U+{ord(text[at]):04X} (undecodable bytes, or a lone surrogate)",
            "INVALID_ARG",
        )
    return text


# numpy dtypes and Triton datatypes of the gpt2 scalar inputs, by name
_DTYPES = {
    name: (triton_to_np_dtype(datatype), datatype)
    for name, datatype in names.SCALAR_DATATYPES.items()
}


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    time_to_first_token_s: float | None = None
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class _Chunk:
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    final: bool


class _Cancellation:
    """What cancelling one request does; the transport adds its own hooks."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._hooks: list = []

    def add(self, hook) -> None:
        self._hooks.append(hook)

    def __call__(self) -> None:
        self.requested.set()
        for hook in self._hooks:
            hook()


def own_connection_args() -> list[tuple[str, int]]:
    """tritonclient's own channel arguments, plus a connection of the channel's own.

    The client opens a channel per call and closes it after (a stream is its own call).
    gRPC Python otherwise puts every channel to one address with the same arguments on one
    shared TCP connection (its global subchannel pool). With many streams live and channels
    opening and closing beside them, that connection was now and then closed under all of
    them: every stream of the process failed at once with "Stream removed (Socket closed)".
    Why gRPC closed it is not known; with a connection per channel it was not seen again
    (docs/RELIABILITY.md). Pass these as ``channel_args`` wherever channels come and go.
    """
    import tritonclient.grpc as grpcclient

    keepalive = grpcclient.KeepAliveOptions()
    return [  # tritonclient's defaults, which channel_args would otherwise replace
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def grpc_inputs(prompt: str, params: GenerationParams, stream: bool = True) -> list:
    """The ``gpt2`` model's inputs for one request, as tritonclient.grpc tensors (for a
    caller that sends several requests over one stream of its own)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, datatype):
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    prompt_bytes = checked_text(names.TEXT_INPUT, prompt).encode()
    inputs = [tensor(names.TEXT_INPUT, np.array([[prompt_bytes]], dtype=object), "BYTES")]
    values = params.as_json() | {names.STREAM: stream}
    for name, value in values.items():
        if name == names.STOP_WORDS:
            words = np.array([[w.encode() for w in value]], dtype=object)
            inputs.append(tensor(name, words, "BYTES"))
        else:
            dtype, datatype = _DTYPES[name]
            inputs.append(tensor(name, np.array([[value]], dtype=dtype), datatype))
    return inputs


class TextStream:
    """Iterate to get text pieces as they arrive; ``result`` is set at the end;
    ``cancel()`` stops the request on the server. The request is sent when the first piece
    is asked for: a stream cancelled before that sends nothing and yields nothing."""

    def __init__(self, chunks: Iterator[_Chunk], cancel: _Cancellation) -> None:
        self._chunks = chunks
        self._cancel = cancel
        self.result: GenerationResult | None = None
        self._pieces: list[str] = []
        self._started = time.perf_counter()
        self._first: float | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self._chunks:
                if chunk.text:
                    if self._first is None:
                        self._first = time.perf_counter() - self._started
                    self._pieces.append(chunk.text)
                    yield chunk.text
                if chunk.final:
                    self.result = GenerationResult(
                        "".join(self._pieces),
                        chunk.finish_reason,
                        chunk.num_input_tokens,
                        chunk.num_output_tokens,
                        self._first,
                        time.perf_counter() - self._started,
                    )
                    return
        finally:
            # Close the transport now, not whenever this stream is garbage-collected: an
            # open gRPC stream counts as in flight, and the server waits for it on exit.
            self._chunks.close()

    def cancel(self) -> None:
        self._cancel()


@dataclass
class Gpt2Client:
    url: str | None = None
    protocol: str = "grpc"
    model: str = "gpt2"
    # The longest wait for the next piece of a generation (generate() streams too, and
    # joins): long, since a busy server may queue a request a while.
    timeout_s: float = 300.0
    # The longest wait for every other call (readiness, model configuration, token
    # counts): these answer in milliseconds, so a silent server is found out quickly.
    request_timeout_s: float = 30.0
    # The front door's API key (sent as "Authorization: Bearer <key>"); default $API_KEY
    api_key: str | None = field(default_factory=lambda: os.environ.get("API_KEY") or None)
    _grpc_clients: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in DEFAULT_URLS:
            raise ClientError(f"protocol must be grpc or http, got {self.protocol!r}")
        self.url = self.url or DEFAULT_URLS[self.protocol]
        check_address(self.url)
        if self.api_key:  # "" sends none (and overrides $API_KEY)
            check_api_key(self.api_key)

    @property
    def headers(self) -> dict[str, str]:
        """Sent with every request: gRPC metadata or HTTP headers."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get(self, path: str, timeout_s: float | None = None):
        request = urllib.request.Request(f"http://{self.url}{path}", headers=self.headers)
        return urllib.request.urlopen(request, timeout=timeout_s or self.request_timeout_s)

    def _no_answer(self, what: str, timeout_s: float) -> ClientError:
        return ClientError(
            f"Triton at {self.url} did not answer within {timeout_s:g} s ({what})",
            "DEADLINE_EXCEEDED",
        )

    def _unary_error(
        self, exc: Exception, what: str, timeout_s: float | None = None
    ) -> ClientError:
        """The ClientError for a failed unary call; a timeout says what went unanswered."""
        timeout_s = timeout_s or self.request_timeout_s
        if isinstance(exc, ClientError):
            return exc
        if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, TimeoutError):
            exc = exc.reason
        if isinstance(exc, TimeoutError):
            return self._no_answer(what, timeout_s)
        if isinstance(exc, urllib.error.HTTPError):
            return _http_error(exc)
        if isinstance(exc, OSError):  # URLError and a refused or reset connection
            return ClientError(f"cannot reach Triton at {self.url}: {exc}", "UNAVAILABLE")
        http_code = _http_code_of(exc)
        if http_code is not None:  # tritonclient.http's error for an HTTP answer
            return ClientError(exc.message(), _HTTP_STATUSES.get(http_code, str(http_code)))
        error = _client_error(exc)
        if error.status == "DEADLINE_EXCEEDED":
            return self._no_answer(what, timeout_s)
        return error

    # -- public API -------------------------------------------------------------------------
    def generate(
        self, prompt: str, params: GenerationParams = GenerationParams()
    ) -> GenerationResult:
        """The whole completion at once: streamed all the same, its pieces joined (the
        prompt first unless ``exclude_input_in_output``), over either transport. Triton
        2.51 notices a client gone (Ctrl-C, a timeout, a killed process) only when it writes
        to it: a request asked for whole (``/generate``, or ``stream`` false) ran to its
        end for nobody, where a streamed one is cancelled at its next piece. And so
        ``timeout_s`` bounds the wait for each piece on both, as for ``stream()``."""
        started = time.perf_counter()
        pieces: list[str] = [] if params.exclude_input_in_output else [prompt]
        final: _Chunk | None = None
        chunks = self._chunks(prompt, params, _Cancellation())
        try:
            for chunk in chunks:
                pieces.append(chunk.text)
                if chunk.final:
                    final = chunk
        finally:
            chunks.close()  # on Ctrl-C too: closing the transport cancels the request
        if final is None:  # the transports raise first; never pass a cut reply as whole
            raise _incomplete()
        total = time.perf_counter() - started
        return GenerationResult(
            "".join(pieces),
            final.finish_reason,
            final.num_input_tokens,
            final.num_output_tokens,
            total,
            total,
        )

    def stream(self, prompt: str, params: GenerationParams = GenerationParams()) -> TextStream:
        """Text pieces as they are generated; see :class:`TextStream`."""
        cancel = _Cancellation()
        return TextStream(self._chunks(prompt, params, cancel), cancel)

    def model_info(self) -> dict[str, str | int]:
        """What is being served: model name, engine kind and context window, read from
        the models' configurations on the server."""
        gpt2 = self._model_parameters(self.model)
        engine = self._model_parameters(gpt2.get("engine_model", "engine"))
        return {
            "model": gpt2.get("model_name", self.model),
            "engine": engine.get("engine_kind", "?"),
            "context_window": int(gpt2.get("context_window", 0) or 0),
        }

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts from the server's own ``tokenizer`` model."""
        if not texts:
            return []
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        if self.protocol == "grpc":
            module, client = grpcclient, self._grpc()
            timeout = {"client_timeout": self.request_timeout_s}
        else:
            module, timeout = httpclient, {}
            client = httpclient.InferenceServerClient(
                self.url,
                connection_timeout=self.request_timeout_s,
                network_timeout=self.request_timeout_s,
            )
        try:
            data = np.array(
                [checked_text(names.TEXT_INPUT, t).encode() for t in texts], dtype=object
            )
            tensor = module.InferInput(names.TEXT_INPUT, [len(texts)], "BYTES")
            tensor.set_data_from_numpy(data)
            result = client.infer("tokenizer", [tensor], headers=self.headers, **timeout)
            return [int(n) for n in result.as_numpy(names.INPUT_LENGTHS)]
        except Exception as exc:
            raise self._unary_error(exc, "asked to count tokens") from None
        finally:
            client.close()

    def _model_parameters(self, model: str) -> dict[str, str]:
        try:
            if self.protocol == "grpc":
                client = self._grpc()
                try:
                    config = client.get_model_config(
                        model,
                        as_json=True,
                        headers=self.headers,
                        client_timeout=self.request_timeout_s,
                    )
                    config = config["config"]
                finally:
                    client.close()
            else:
                with self._get(f"/v2/models/{model}/config") as response:
                    config = json.loads(response.read())
        except Exception as exc:
            raise self._unary_error(exc, f"asked for the configuration of {model}") from None
        return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}

    def check_ready(self, timeout_s: float | None = None) -> None:
        """Return if the server and the model are ready; else raise a ClientError that
        says why: UNAVAILABLE (down, starting, model not loaded), DEADLINE_EXCEEDED (no
        answer within ``timeout_s``, default ``request_timeout_s``), or the refusal the
        server answered with (UNAUTHENTICATED: the front door wants the API key)."""
        timeout = timeout_s or self.request_timeout_s
        try:
            if self.protocol == "grpc":
                client = self._grpc()
                try:
                    ready = client.is_server_ready(
                        headers=self.headers, client_timeout=timeout
                    ) and client.is_model_ready(
                        self.model, headers=self.headers, client_timeout=timeout
                    )
                finally:
                    client.close()
            else:
                with self._get(f"/v2/models/{self.model}/ready", timeout) as response:
                    ready = response.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code != 400:  # Triton's answer while the model is not ready
                raise _http_error(exc) from None
            ready = False
        except Exception as exc:
            raise self._unary_error(exc, "asked whether it is ready", timeout) from None
        if not ready:
            raise ClientError(
                f"Triton at {self.url} is up but {self.model} is not ready", "UNAVAILABLE"
            )

    def is_ready(self) -> bool:
        try:
            self.check_ready()
            return True
        except ClientError:
            return False

    def wait_until_ready(self, timeout_s: float = 120.0) -> None:
        """Return once the server and the model are ready, asking again while the answer
        is one that waiting can change (down, starting, silent); raise any other at once
        (a refused API key), and after ``timeout_s`` the last reason. (An unknown model
        reads as not ready: Triton answers so, and waiting may see it loaded.)
        No check waits past the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                self.check_ready(max(min(self.request_timeout_s, left), MIN_CHECK_S))
                return
            except ClientError as exc:
                if exc.status not in WORTH_WAITING:
                    raise
                if time.monotonic() + RETRY_EVERY_S > deadline:
                    raise ClientError(
                        f"Triton at {self.url} is not ready after {timeout_s:g} s: {exc}",
                        "UNAVAILABLE",
                    ) from None
            time.sleep(RETRY_EVERY_S)

    def close(self) -> None:
        for client in self._grpc_clients:
            try:
                client.close()
            except Exception:
                pass
        self._grpc_clients.clear()

    def __enter__(self) -> Gpt2Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transports -------------------------------------------------------------------------
    def _chunks(self, prompt, params, cancel: _Cancellation) -> Iterator[_Chunk]:
        if self.protocol == "grpc":
            return self._grpc_chunks(prompt, params, cancel)
        return self._http_chunks(prompt, params, cancel)

    def _grpc(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url, channel_args=own_connection_args())

    def _grpc_chunks(self, prompt, params, cancel) -> Iterator[_Chunk]:
        from tritonclient.utils import InferenceServerException

        if cancel.requested.is_set():  # cancelled before it started: send nothing
            return
        inputs = grpc_inputs(prompt, params, stream=True)
        responses: queue.Queue = queue.Queue()
        client = self._grpc()

        def callback(result, error):
            responses.put((result, error))

        # tritonclient's stream is not safe to stop from one thread while another sends on
        # it or stops it (a Stop's cancel runs on the page's thread, the reader's on its
        # own): a send and every stop take this lock, and a cancel that came first wins
        stream_lock = threading.Lock()

        def stop(cancel_requests: bool = True) -> None:
            with stream_lock:
                client.stop_stream(cancel_requests=cancel_requests)

        try:
            client.start_stream(callback=callback, headers=self.headers)
            cancel.add(stop)
            with stream_lock:
                # cancelled first: nothing is sent, and the loop below is skipped; its
                # stop cancels (with cancel_requests also when nothing was sent: without
                # it, stopping waits for the server to close the stream, 20 s if silent)
                if not cancel.requested.is_set():
                    client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
        except InferenceServerException as exc:
            if cancel.requested.is_set():  # our own cancel stopped the stream meanwhile
                client.close()
                return
            # When the stream broke at once (server down), its callback holds the cause.
            try:
                exc = responses.get(timeout=1.0)[1] or exc
            except queue.Empty:
                pass
            client.close()
            raise _client_error(exc) from None
        finished = False  # the final response arrived: nothing left to cancel
        try:
            while not cancel.requested.is_set():  # what arrives after a cancel is dropped
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise self._no_answer(
                        "waiting for the next piece of the generation", self.timeout_s
                    ) from None
                if error is not None:
                    if cancel.requested.is_set():
                        return  # our own cancel: the stream just ends
                    finished = True  # an error ends the request: nothing left to cancel
                    raise _client_error(error)
                ends_request = _is_triton_final(result)
                finished = finished or ends_request
                chunk = _grpc_chunk(result)
                if chunk is not None:
                    yield chunk
                    if chunk.final:
                        return
        finally:
            try:
                stop(cancel_requests=not finished)
            finally:
                client.close()

    def _http_chunks(self, prompt, params, cancel) -> Iterator[_Chunk]:
        if cancel.requested.is_set():  # cancelled before it started: send nothing
            return
        body = {
            names.TEXT_INPUT: checked_text(names.TEXT_INPUT, prompt),
            names.STREAM: True,
            **params.as_json(),
        }
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{self.model}/generate_stream",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.headers},
        )
        try:
            try:
                # The timeout bounds the connection and every read: the wait for the first
                # response and then for each next piece of the stream.
                response = urllib.request.urlopen(request, timeout=self.timeout_s)
            except Exception:
                if cancel.requested.is_set():  # cancelled meanwhile: its answer is moot
                    return
                raise
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except TimeoutError:  # connected, then no response (urlopen does not wrap this)
            raise self._no_answer("waiting for the generation to start", self.timeout_s) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            if isinstance(getattr(exc, "reason", None), TimeoutError):
                raise self._no_answer("connecting", self.timeout_s) from None
            raise ClientError(f"cannot reach Triton at {self.url}: {exc}", "UNAVAILABLE") from None
        cancel.add(_closer(response))  # closing the connection cancels the request
        with response:
            if cancel.requested.is_set():  # cancelled while the response was on its way
                return
            silent = self._no_answer("waiting for the next piece of the generation", self.timeout_s)
            for raw in _lines_until_closed(response, cancel, silent):
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                try:
                    data = json.loads(line[5:])
                except ValueError:  # not Triton's: a proxy's page, a cut line
                    raise ClientError(
                        f"the stream from {self.url} sent an event that is not JSON: {line[:80]!r}",
                        "UNAVAILABLE",
                    ) from None
                if not isinstance(data, dict):
                    raise ClientError(
                        f"the stream sent an event that is not an object: {line[:80]!r}",
                        "UNAVAILABLE",
                    )
                if "error" in data:
                    raise _stream_error(data)
                chunk = _http_chunk(data, final=bool(data.get(names.FINISH_REASON)))
                yield chunk
                if chunk.final:
                    return
            # Every request ends with an event that has a finish_reason: without it the
            # text is cut short (server or proxy gone), which must not pass as a result.
            if not cancel.requested.is_set():
                raise _incomplete()


def _closer(response):
    """How to close ``response`` from another thread than the one reading it (a Stop
    button's): ``close()`` alone waits for the reader's lock, held by a read that waits
    for the server's next piece, up to ``timeout_s``. Shutting the socket down ends that
    read at once, and the server sees the connection go."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)

    def close() -> None:
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)
        response.close()

    return close


def _incomplete() -> ClientError:
    return ClientError(
        "the stream from Triton ended before its final response: the text is "
        "incomplete (server stopped or connection lost)",
        "UNAVAILABLE",
    )


def _is_triton_final(result) -> bool:
    """Whether this gRPC response is the request's last (Triton's final flag)."""
    return result.get_response().parameters["triton_final_response"].bool_param


def _grpc_chunk(result) -> _Chunk | None:
    """One gRPC stream response (a tritonclient ``InferResult``) as a chunk: None for an
    empty response that is not the last. A request's last response carries its
    finish_reason; a last one without (the model's bare final flag, sent when it could
    not send its real final response) means the text is cut short: UNAVAILABLE, as a
    cut HTTP stream, never a short result."""
    final = _is_triton_final(result)
    # Only text_output is sure to be in every response; the counts and the finish reason
    # may come on the last one only.
    text = result.as_numpy(names.TEXT_OUTPUT)
    reason = _first(result.as_numpy(names.FINISH_REASON), b"").decode()
    if final and not reason:
        raise _incomplete()
    if text is None and not reason:
        return None
    return _Chunk(
        _first(text, b"").decode("utf-8"),
        reason,
        int(_first(result.as_numpy(names.NUM_INPUT_TOKENS), 0)),
        int(_first(result.as_numpy(names.NUM_OUTPUT_TOKENS), 0)),
        bool(reason),
    )


def _lines_until_closed(response, cancel: _Cancellation, silent: ClientError) -> Iterator[bytes]:
    """The response's lines; a connection we closed ourselves (cancel) just ends them, one
    that stays silent past the timeout raises ``silent``."""
    try:
        yield from response
    except TimeoutError:
        if not cancel.requested.is_set():
            raise silent from None
    # HTTPException: a chunked body cut off before its last chunk (IncompleteRead)
    except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
        if not cancel.requested.is_set():
            raise ClientError(f"the connection to Triton broke: {exc}", "UNAVAILABLE") from None


def _first(array, default=None):
    if array is None:
        return default
    return np.asarray(array).reshape(-1)[0]


def _http_chunk(data: dict, final: bool) -> _Chunk:
    if "error" in data:
        raise ClientError(data["error"], "INVALID_ARG")
    return _Chunk(
        data[names.TEXT_OUTPUT],
        data.get(names.FINISH_REASON, ""),
        int(data.get(names.NUM_INPUT_TOKENS, 0)),
        int(data.get(names.NUM_OUTPUT_TOKENS, 0)),
        final,
    )


def _status_of_message(message: str) -> str:
    """The status a server error message without a code stands for (a gRPC stream's, an
    SSE event's), spelled as Triton's HTTP errors map to it (INVALID_ARG)."""
    status, _ = names.error_status(message)
    return "INVALID_ARG" if status == "INVALID_ARGUMENT" else status


def _stream_error(data: dict) -> ClientError:
    """An SSE error event. Triton's is ``{"error": "<message>"}`` with no code (the HTTP
    status was sent with the first event, 200 once text has streamed), so the code is a
    status the event carries, if any (a proxy's), else what the message says it is."""
    message = str(data["error"])
    status = data.get("status") or data.get("code")
    if isinstance(status, str) and status:
        return ClientError(message, status)
    return ClientError(message, _status_of_message(message))


def _client_error(exc) -> ClientError:
    status = exc.status() if hasattr(exc, "status") and exc.status() else ""
    message = exc.message() if hasattr(exc, "message") else str(exc)
    if "StatusCode.UNAVAILABLE" in str(status) or "failed to connect" in str(message).lower():
        return ClientError(f"cannot reach Triton: {message}", "UNAVAILABLE")
    if not status:  # an error in a gRPC stream: a message alone
        return ClientError(message, _status_of_message(message))
    return ClientError(message, str(status).replace("StatusCode.", ""))


def _http_error(exc: urllib.error.HTTPError) -> ClientError:
    """The ClientError of an HTTP error answer. Triton's HTTP frontend sends one code for
    many statuses (a full queue is a 503, as a server shutting down): where the message
    says which it is, that is the status, as over gRPC; else the code's."""
    status = _HTTP_STATUSES.get(exc.code, str(exc.code))
    try:
        body = exc.read().decode("utf-8").strip()
        # generate_stream sends an error in its first event as SSE: "data: {...}"
        body = body.removeprefix("data:")
        message = str(json.loads(body)["error"])
    except Exception:
        return ClientError(str(exc), status)
    said = _status_of_message(message)
    return ClientError(message, said if said != "INTERNAL" else status)


# ClientError.status of an HTTP error status, the same for every call
_HTTP_STATUSES = {
    400: "INVALID_ARG",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",  # the front door's size limit
    429: "RESOURCE_EXHAUSTED",  # its concurrency or rate limit
    500: "INTERNAL",
    502: "UNAVAILABLE",  # a proxy's: the server behind it failed
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _http_code_of(exc) -> int | None:
    """The HTTP status of a tritonclient.http error (its ``status()`` is the code as
    text, "413"); None for any other error."""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    if isinstance(status, str) and status.isdigit():
        return int(status)
    return None
