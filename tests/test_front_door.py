"""Integration: the Envoy front door in front of a real tritonserver, attacked from outside.

Everything goes through the service's public ports (``Service.http_url`` / ``grpc_url``), as
clients do; nothing is mocked. The session server (tests/conftest.py) takes the bad input,
the oversized bodies, the admin calls and the cancelled streams; one more service, with an
API key and a concurrency limit of 2, takes the tests of those two. Every wait is on a state
(a response, a counter, a gauge), bounded by a generous deadline, never on a sleep alone.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import conftest
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from conftest import ADMIN_KEY, service
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from client.core import own_connection_args
from gpt2_triton.front_door import FrontDoorError, FrontDoorSettings

pytestmark = pytest.mark.integration

DEADLINE_S = 120.0  # for a state to be reached on a busy 2-core machine
MB = 1 << 20
GENERATE = "/v2/models/gpt2/generate"
GENERATE_STREAM = "/v2/models/gpt2/generate_stream"
JSON = {"Content-Type": "application/json"}
PROMPT = "The cat"
GREEDY = {"text_input": "The old man", "max_tokens": 24, "temperature": 0}
# A prompt of 2 tokens and 1000 new ones that EOS cannot end early (min_length): ~1 s of
# generation on the tiny model, so a stream cut after its first event is surely cut mid-way.
LONG = {"text_input": PROMPT, "max_tokens": 1000, "min_length": 1000}
API_KEY = "front-door-test-key"
LIMIT = 2  # max_concurrent_requests of the guarded service

# The gpt2 inputs' datatypes (model_repository/gpt2/config.pbtxt.in)
DATATYPES = {
    "text_input": "BYTES",
    "max_tokens": "INT32",
    "stream": "BOOL",
    "temperature": "FP32",
    "top_k": "INT32",
    "top_p": "FP32",
    "repetition_penalty": "FP32",
    "seed": "UINT64",
    "stop_words": "BYTES",
    "exclude_input_in_output": "BOOL",
    "min_length": "INT32",
}


# -- waiting ----------------------------------------------------------------------------
def wait_for(condition: Callable, what: str | Callable[[], str], timeout: float = DEADLINE_S):
    """Poll ``condition`` until it is truthy and return its value; fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not reached in {timeout:.0f} s: {what() if callable(what) else what}")
        time.sleep(0.05)


# -- HTTP -------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def error(self) -> str:
        return json.loads(self.body)["error"]

    def json(self) -> dict:
        return json.loads(self.body)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.rsplit(":", 1)
    return host, int(port)


def http_call(url, method, path, body=None, headers=None, timeout=DEADLINE_S) -> Reply:
    """One request with http.client, which sends the path exactly as written (no normalizing)."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()  # NaN and inf become the NaN / Infinity literals
    connection = http.client.HTTPConnection(*host_port(url), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={**JSON, **(headers or {})})
        response = connection.getresponse()
        return Reply(response.status, response.read(), dict(response.getheaders()))
    finally:
        connection.close()


def generate_http(service, body, headers=None) -> str:
    reply = http_call(service.http_url, "POST", GENERATE, body, headers)
    assert reply.status == 200, reply
    return reply.json()["text_output"]


class HttpStream:
    """A /generate_stream request, read event by event."""

    def __init__(self, service, body, headers=None) -> None:
        self.connection = http.client.HTTPConnection(
            *host_port(service.http_url), timeout=DEADLINE_S
        )
        self.connection.request(
            "POST",
            GENERATE_STREAM,
            body=json.dumps({**body, "stream": True}),
            headers={**JSON, **(headers or {})},
        )
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()

    def next_event(self) -> dict | None:
        """The next server-sent event; None at the end of the stream."""
        for line in self.response:
            if line.startswith(b"data:"):
                return json.loads(line[5:])
        return None

    def drop(self) -> None:
        """Close the connection mid-stream, as a client that goes away does."""
        self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


# -- gRPC -------------------------------------------------------------------------------
def grpc_input(name: str, value, datatype: str | None = None) -> grpcclient.InferInput:
    """One input with the batch dimension: a value has shape [1, 1], a list [1, n]."""
    datatype = datatype or DATATYPES[name]
    if isinstance(value, np.ndarray):
        array = value
    elif datatype == "BYTES":
        values = value if isinstance(value, list) else [value]
        array = np.array(
            [[v if isinstance(v, bytes) else str(v).encode() for v in values]], dtype=object
        )
    else:
        values = value if isinstance(value, list) else [value]
        array = np.array([values], dtype=triton_to_np_dtype(datatype))
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def grpc_inputs(fields: dict, datatypes: dict | None = None) -> list[grpcclient.InferInput]:
    return [grpc_input(k, v, (datatypes or {}).get(k)) for k, v in fields.items()]


class GrpcStream:
    """A gRPC ModelStreamInfer stream (a decoupled model refuses unary infer)."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        # its own connection, as the client's channels (client/core.py)
        self.client = grpcclient.InferenceServerClient(url, channel_args=own_connection_args())
        self.responses: queue.Queue = queue.Queue()
        # tritonclient calls back with parameters named result and error
        self.client.start_stream(
            callback=lambda result, error: self.responses.put((result, error)), headers=headers
        )

    def send(self, inputs, model: str = "gpt2") -> None:
        try:
            self.client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        except InferenceServerException:
            pass  # the stream broke at once (refused): the callback holds the cause

    def next(self):
        """(result, error) of the next response."""
        try:
            return self.responses.get(timeout=DEADLINE_S)
        except queue.Empty:
            pytest.fail(f"no gRPC stream response in {DEADLINE_S:.0f} s")

    def close(self, cancel: bool = False) -> None:
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()


def grpc_generate(url, inputs, headers=None) -> tuple[str | None, InferenceServerException | None]:
    """One request on its own stream: (the whole text, None) or (None, the error)."""
    stream = GrpcStream(url, headers)
    try:
        stream.send(inputs)
        pieces = []
        while True:
            result, error = stream.next()
            if error is not None:
                return None, error
            text = result.as_numpy("text_output")
            if text is not None:
                pieces.append(text.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return "".join(pieces), None
    finally:
        stream.close()


def grpc_status(error: InferenceServerException) -> str:
    return str(error.status()).replace("StatusCode.", "")


# -- the server's state -----------------------------------------------------------------
def gpt2_metrics(service) -> dict[str, float]:
    return conftest.gpt2_metrics(service.metrics_url)


def finished(service) -> dict[str, float]:
    """gpt2_requests_total by finish reason."""
    prefix = 'gpt2_requests_total{finish_reason="'
    return {
        name.removeprefix(prefix).rstrip('"}'): value
        for name, value in gpt2_metrics(service).items()
        if name.startswith(prefix)
    }


def finished_since(service, before: dict[str, float]) -> dict[str, float]:
    now = finished(service)
    return {reason: now[reason] - before.get(reason, 0) for reason in now}


def idle(service) -> bool:
    """No sequence running, queued or holding a KV cache in the gpt2 model."""
    m = gpt2_metrics(service)
    cached = [
        v
        for k, v in m.items()
        if k.startswith("gpt2_engine_cached_sequences{") and 'model="gpt2"' in k
    ]
    assert cached, "no gpt2_engine_cached_sequences gauge for model gpt2"
    return m["gpt2_active_sequences"] == 0 and m["gpt2_waiting_requests"] == 0 and not any(cached)


def server_processes(service) -> list[psutil.Process]:
    root = psutil.Process(service.triton.process.pid)
    return [root, *root.children(recursive=True)]


def heap_returns(service) -> float:
    return gpt2_metrics(service).get("gpt2_idle_heap_returns_total", 0.0)


def server_rss(service) -> int:
    total = 0
    for process in server_processes(service):
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, FileNotFoundError):  # ended since it was listed
            pass
    return total


def rss_by_process(service) -> dict[str, int]:
    out = {}
    for process in server_processes(service):
        try:
            name = " ".join(process.cmdline()[-3:-1])[-40:] or process.name()
            out[f"{process.pid} {name}"] = process.memory_info().rss // MB
        except psutil.NoSuchProcess:
            pass
    return out


def shm_files(service) -> dict[str, int]:
    """The /dev/shm files the server's processes map (Python backend regions), with sizes.

    Only ours: this machine is shared, and other servers create (and, killed, leak) their
    own regions there at any time, so a count of the whole folder would measure them too.
    """
    paths = set()
    for process in server_processes(service):
        try:
            maps = process.memory_maps()
        except (psutil.NoSuchProcess, FileNotFoundError):
            # ended since it was listed (the lifeline's shell watcher runs short children);
            # psutil may see /proc/<pid>/smaps vanish before it knows the process is gone
            continue
        paths |= {m.path for m in maps if m.path.startswith("/dev/shm/")}
    return {path: os.path.getsize(path) for path in paths}


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def identity(triton) -> tuple[int, int]:
    """The session tritonserver's pid and restart count when this module starts."""
    return triton.triton.process.pid, triton.restarts


@pytest.fixture(scope="module")
def greedy_before(triton, identity) -> str:
    """The greedy text before any bad input was sent (and the server's identity then)."""
    return generate_http(triton, GREEDY)


@pytest.fixture(scope="module")
def guarded(triton, artifacts):
    """A second service on the session's repository: an API key and at most 2 requests."""
    with service(
        artifacts / "model_repository",
        artifacts / "logs_front_door",
        api_key=API_KEY,
        max_concurrent_requests=LIMIT,
    ) as server:
        yield server


AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = {"authorization": f"Bearer {API_KEY}"}


def assert_unharmed(service, identity) -> None:
    """Envoy and the same tritonserver are up, and a good request still works."""
    pid, restarts = identity
    assert service.envoy.alive(), f"envoy exited; see {service.envoy.log_file}"
    assert service.triton_alive(), "tritonserver died" + service.triton.log_tail()
    assert (service.triton.process.pid, service.restarts) == (pid, restarts), "Triton restarted"
    assert generate_http(service, {"text_input": PROMPT, "max_tokens": 3}).startswith(PROMPT)


# == 1. Bad input ========================================================================
@dataclass(frozen=True)
class Bad:
    """One bad request: JSON fields for HTTP /generate, the same as tensors on a gRPC stream."""

    name: str
    fields: dict
    error: str  # a regex the refusal's message matches (both protocols unless set below)
    http_status: int = 400
    http_error: str | None = None
    grpc_error: str | None = None
    datatypes: dict = field(default_factory=dict)  # gRPC datatypes other than the config's
    raw_body: bytes | None = None  # HTTP: sent as it is, instead of the fields
    http: bool = True
    grpc: bool = True
    http_xfail: str = ""  # a known gap (see the reason)


def with_prompt(fields: dict) -> dict:
    return {"text_input": PROMPT, **fields}


def grpc_type_error(name: str, sent: str, expected: str) -> str:
    return f"inference input '{name}' data-type is '{sent}', but model 'gpt2' expects '{expected}'"


# Triton's HTTP JSON parser would answer a JSON type that does not fit the input's
# datatype with HTTP 500 and a message without the input's name, and wrap an integer out of
# its type's range round to another value: the front door refuses both first, with 400 and
# the input's name (deploy/envoy/generate_check.lua). Over gRPC the datatype check names
# the input; a typed tensor cannot hold an out-of-range value.
INT32_RANGE = r"must be an integer in \[-2147483648, 2147483647\] \(INT32\), got "
UINT64_RANGE = r"must be an integer in \[0, 18446744073709551615\] \(UINT64\), got "


RANGE_TEMPERATURE = r"temperature must be in \[0, 100\] \(0 = greedy\), got "
RANGE_TOP_P = r"top_p must be in \(0, 1\], got "
RANGE_PENALTY = r"repetition_penalty must be in \(0, 10\] \(1 = off\), got "
BAD_INPUTS = [
    # -- out of range: the model's own validation (request.py, sampling.py), INVALID_ARG
    Bad("max_tokens_zero", with_prompt({"max_tokens": 0}), "max_tokens must be >= 1, got 0"),
    Bad("max_tokens_negative", with_prompt({"max_tokens": -5}), "max_tokens must be >= 1, got -5"),
    Bad(
        "max_tokens_past_the_context_window",
        with_prompt({"max_tokens": 5000}),
        r"max_tokens \(5000\) \+ text_input \(\d+ tokens\) exceed the context window of 1024 "
        r"tokens: max_tokens can be at most \d+",
    ),
    Bad("temperature_negative", with_prompt({"temperature": -0.5}), RANGE_TEMPERATURE + "-0.5"),
    Bad("temperature_over_100", with_prompt({"temperature": 1000.0}), RANGE_TEMPERATURE + "1000"),
    Bad("temperature_nan", with_prompt({"temperature": float("nan")}), RANGE_TEMPERATURE + "nan"),
    Bad("temperature_inf", with_prompt({"temperature": float("inf")}), RANGE_TEMPERATURE + "inf"),
    Bad(
        "temperature_minus_inf",
        with_prompt({"temperature": float("-inf")}),
        RANGE_TEMPERATURE + "-inf",
    ),
    Bad("top_p_over_one", with_prompt({"top_p": 1.5}), RANGE_TOP_P + "1.5"),
    Bad("top_p_zero", with_prompt({"top_p": 0.0}), RANGE_TOP_P + "0.0"),
    Bad("top_p_negative", with_prompt({"top_p": -0.1}), RANGE_TOP_P + "-0.1"),
    Bad("top_p_nan", with_prompt({"top_p": float("nan")}), RANGE_TOP_P + "nan"),
    Bad("top_k_negative", with_prompt({"top_k": -1}), r"top_k must be >= 0 \(0 = off\), got -1"),
    Bad("repetition_penalty_zero", with_prompt({"repetition_penalty": 0.0}), RANGE_PENALTY + "0.0"),
    Bad(
        "repetition_penalty_negative",
        with_prompt({"repetition_penalty": -1.0}),
        RANGE_PENALTY + "-1",
    ),
    Bad(
        "repetition_penalty_over_10",
        with_prompt({"repetition_penalty": 11.0}),
        RANGE_PENALTY + "11",
    ),
    Bad(
        "repetition_penalty_inf",
        with_prompt({"repetition_penalty": float("inf")}),
        RANGE_PENALTY + "inf",
    ),
    Bad(
        "min_length_over_max_tokens",
        with_prompt({"max_tokens": 5, "min_length": 6}),
        r"min_length must be in \[0, max_tokens\], got 6",
    ),
    Bad(
        "min_length_negative",
        with_prompt({"min_length": -1}),
        r"min_length must be in \[0, max_tokens\], got -1",
    ),
    Bad(
        "seventeen_stop_words",
        with_prompt({"stop_words": [f"word{i}" for i in range(17)]}),
        "stop_words: at most 16 words, got 17",
    ),
    Bad(
        "stop_word_of_257_characters",
        with_prompt({"stop_words": ["x" * 257]}),
        "stop_words: each word at most 256 characters",
    ),
    Bad(
        "prompt_past_the_context_window",
        {"text_input": "hello " * 1100},
        r"text_input has \d+ tokens; the context window is 1024 tokens",
    ),
    Bad("missing_text_input", {"max_tokens": 3}, "text_input is required"),
    Bad(
        "text_input_not_utf8",
        {"text_input": b"The \xff cat"},
        "text_input is not valid UTF-8",
        raw_body=b'{"text_input": "The \xff cat"}',
    ),
    Bad(
        "stop_word_not_utf8",
        with_prompt({"stop_words": [b"\xc3("]}),
        "stop_words is not valid UTF-8",
        raw_body=b'{"text_input": "The cat", "stop_words": ["\xc3("]}',
    ),
    # -- wrong types: Triton refuses them before the model (see json_type_error)
    Bad(
        "max_tokens_a_string",
        with_prompt({"max_tokens": "ten"}),
        "",
        http_error="max_tokens " + INT32_RANGE + "a string",
        grpc_error=grpc_type_error("max_tokens", "BYTES", "INT32"),
        datatypes={"max_tokens": "BYTES"},
    ),
    Bad(
        "max_tokens_a_fraction",
        with_prompt({"max_tokens": 2.5}),
        "",
        http_error=r"max_tokens " + INT32_RANGE + r"2\.5",
        grpc_error=grpc_type_error("max_tokens", "FP32", "INT32"),
        datatypes={"max_tokens": "FP32"},
    ),
    Bad(
        "temperature_a_string",
        with_prompt({"temperature": "hot"}),
        "",
        http_error="temperature must be a number, got a string",
        grpc_error=grpc_type_error("temperature", "BYTES", "FP32"),
        datatypes={"temperature": "BYTES"},
    ),
    Bad(
        "stream_a_string",
        with_prompt({"stream": "yes"}),
        "",
        http_error="stream must be true or false",
        grpc_error=grpc_type_error("stream", "BYTES", "BOOL"),
        datatypes={"stream": "BYTES"},
    ),
    Bad(
        "text_input_a_number",
        {"text_input": 5},
        "",
        http_error="text_input must be a string, got 5",
        grpc_error=grpc_type_error("text_input", "INT32", "BYTES"),
        datatypes={"text_input": "INT32"},
    ),
    Bad(
        "seed_negative",
        with_prompt({"seed": -1}),
        "",
        http_error="seed " + UINT64_RANGE + "-1",
        grpc_error=grpc_type_error("seed", "INT64", "UINT64"),
        datatypes={"seed": "INT64"},
    ),
    Bad(
        "temperature_null",
        with_prompt({"temperature": None}),
        "temperature must be a number, got null",
        grpc=False,
    ),
    # -- out of the input's type's range: Triton's parser would wrap them round (4294967299
    # tokens would be 3, top_k 2^32 would be 0: off); a typed gRPC tensor cannot hold them
    *(
        Bad(f"{name}_{value}", with_prompt({name: value}), "", http_error=words, grpc=False)
        for name, value, words in (
            ("max_tokens", 2**32 + 3, "max_tokens " + INT32_RANGE + "4294967299"),
            ("max_tokens", 2**31, "max_tokens " + INT32_RANGE + "2147483648"),
            ("top_k", 2**32, "top_k " + INT32_RANGE),
            ("min_length", -(2**32) + 2, "min_length " + INT32_RANGE),
            ("seed", 2**64, "seed " + UINT64_RANGE + "18446744073709551616"),
            # a list is a batch (of one, here): its elements are values all the same
            ("max_tokens", [2**32 + 3], "max_tokens " + INT32_RANGE + "4294967299"),
        )
    ),
    # the door reads field names as JSON spells them, and refuses one given twice
    Bad(
        "escaped_field_name",
        {},
        "",
        http_error="max_tokens " + INT32_RANGE + "4294967299",
        raw_body=b'{"text_input": "x", "max_tok\\u0065ns": 4294967299}',
        grpc=False,
    ),
    Bad(
        "lists_nested_too_deep",
        {},
        "",
        http_error="lists nested more than 32 deep",
        # Triton would flatten it to 4294967299 (and wrap that); the door's scanner
        # reads lists by recursion: 6,000 levels once overflowed Lua's stack, unchecked
        raw_body=b'{"text_input": "x", "max_tokens": ' + b"[" * 6000 + b"5" + b"]" * 6000 + b"}",
        grpc=False,
    ),
    Bad(
        "field_given_twice",
        {},
        "",
        http_error="max_tokens is given more than once",
        raw_body=b'{"text_input": "x", "max_tokens": 4294967299, "max_tokens": 5}',
        grpc=False,
    ),
    # -- wrong shapes: Triton's shape checks. Over HTTP a JSON list is a batch: Triton's
    # message names the batch, and for max_tokens the input it compares it with.
    Bad(
        "max_tokens_two_values",
        with_prompt({"max_tokens": [1, 2]}),
        "",
        http_error="input 'text_input' batch size does not match other inputs for 'gpt2'",
        grpc_error=r"unexpected shape for input 'max_tokens' for model 'gpt2'\. "
        r"Expected \[-1,1\], got \[1,2\]",
    ),
    Bad(
        "text_input_two_values",
        {"text_input": ["The cat", "The dog"]},
        "",
        http_error="inference request batch-size must be <= 1 for 'gpt2'",
        grpc_error=r"unexpected shape for input 'text_input' for model 'gpt2'",
    ),
    Bad(
        "max_tokens_of_rank_3",
        {"text_input": PROMPT, "max_tokens": np.array([[[3]]], np.int32)},
        r"unexpected shape for input 'max_tokens' for model 'gpt2'\. Expected \[-1,1\], "
        r"got \[1,1,1\]",
        http=False,
    ),
    Bad(
        "no_inputs",
        {},
        # Triton's own answer: every input of gpt2 is optional (a forward sends input_ids
        # instead of text_input), so the core has nothing to name
        re.escape("request has 0 inputs"),
        http=False,
    ),
    Bad(
        "no_text_input",
        {"max_tokens": 5},
        re.escape("text_input is required"),
    ),
    Bad(
        "unknown_input",
        with_prompt({"tokens_max": 3}),
        "unexpected inference input 'tokens_max' for model 'gpt2'",
        # Triton's /generate turns JSON fields that are not inputs into request parameters:
        # the gpt2 model refuses the ones that are not Triton's own
        http_error="unknown input 'tokens_max'; the inputs are text_input, max_tokens",
        datatypes={"tokens_max": "INT32"},
    ),
    # -- bodies that are not a JSON object: the front door's 400, or (an object it does not
    # follow to the end) Triton's parser, HTTP 500
    Bad(
        "malformed_json",
        {},
        "failed to parse the request JSON buffer: Missing a name for object member",
        http_status=500,
        raw_body=b'{"text_input": "The cat",',
        grpc=False,
    ),
    Bad(
        "json_list_not_object",
        {},
        "the body must be a JSON object",
        raw_body=b'["The cat"]',
        grpc=False,
    ),
    Bad(
        "json_string_not_object",
        {},
        "the body must be a JSON object",
        raw_body=b'"The cat"',
        grpc=False,
    ),
    Bad(
        "empty_body",
        {},
        "the body must be a JSON object",
        raw_body=b"",
        grpc=False,
    ),
    Bad(
        "json_followed_by_garbage",
        {},
        "The document root must not be followed by other values",
        http_status=500,
        raw_body=b'{"text_input": "The cat"} and more',
        grpc=False,
    ),
    Bad(
        "json_lone_surrogate",
        {},
        "The surrogate pair in string is invalid",
        http_status=500,
        raw_body=b'{"text_input": "\\ud800"}',
        grpc=False,
    ),
]


def http_case(case: Bad):
    marks = [pytest.mark.xfail(strict=True, reason=case.http_xfail)] if case.http_xfail else []
    return pytest.param(case, id=case.name, marks=marks)


def test_the_bad_input_matrix_is_large():
    assert len(BAD_INPUTS) >= 30
    assert len({case.name for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("case", [http_case(c) for c in BAD_INPUTS if c.http])
def test_bad_input_over_http_is_refused_naming_the_problem(triton, greedy_before, case):
    body = case.raw_body if case.raw_body is not None else json.dumps(case.fields).encode()
    reply = http_call(triton.http_url, "POST", GENERATE, body)
    assert reply.status == case.http_status, reply
    assert re.search(case.http_error or case.error, reply.error()), reply.error()


@pytest.mark.parametrize(
    "body",
    [
        # what the door's scanner must see through: quotes, braces and field names in text
        json.dumps(
            {"text_input": 'say "max_tokens": 9999999999999, {"stream": true} \\', "max_tokens": 2}
        ).encode(),
        b'{ "text_input" :\n "The cat" , "max_tokens":2,"stop_words":["a]", "}b"],\t"top_p":1e0 }',
        # the edges of each input's type
        json.dumps(
            {"text_input": "x", "max_tokens": 2, "top_k": 2**31 - 1, "seed": 2**64 - 1}
        ).encode(),
        b'{"text_input": "x", "max_tokens": 2, "min_length": -0, "temperature": 0.5}',
    ],
)
def test_valid_bodies_pass_the_door(triton, body):
    reply = http_call(triton.http_url, "POST", GENERATE, body)
    assert reply.status == 200, reply
    assert reply.json()["finish_reason"] in ("length", "stop"), reply


@pytest.mark.parametrize("path", [GENERATE, "/v2/models/gpt2/versions/1/generate?x=1"])
def test_stream_true_on_generate_is_refused_and_runs_nothing(triton, path):
    """/generate sends one response: Triton 2.51 would run a streamed request to its end
    and answer 200 with an error. The door refuses it first; generate_stream serves it."""

    def requests_seen() -> float:
        # a settled reading: one taken at once may not count the requests just ended yet
        metrics = conftest.wait_until_idle(triton.metrics_url)
        return sum(v for k, v in metrics.items() if k.startswith("gpt2_requests_total"))

    before = requests_seen()
    body = {"text_input": PROMPT, "max_tokens": 50, "stream": True}
    for sent in (body, body | {"stream": [True]}, body | {"stream": [[True]]}):  # (batches)
        reply = http_call(triton.http_url, "POST", path, sent)
        assert reply.status == 400 and "_stream instead" in reply.error(), reply
    streamed = http_call(triton.http_url, "POST", GENERATE_STREAM, body | {"max_tokens": 2})
    assert streamed.status == 200 and b"data:" in streamed.body, streamed
    assert requests_seen() == before + 1  # the stream only: no refused body reached the model
    plain = http_call(triton.http_url, "POST", path, body | {"stream": False, "max_tokens": 2})
    assert plain.status == 200, plain


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in BAD_INPUTS if c.grpc])
def test_bad_input_over_grpc_is_refused_naming_the_problem(triton, greedy_before, case):
    text_out, error = grpc_generate(triton.grpc_url, grpc_inputs(case.fields, case.datatypes))
    # A stream's error reaches the client as a message only (ModelStreamInferResponse has no
    # status code field): the message is what a client can show.
    assert error is not None, f"accepted, answered {text_out!r}"
    assert re.search(case.grpc_error or case.error, error.message()), error.message()


def test_after_the_bad_inputs_the_server_is_healthy_and_answers_the_same(
    triton, identity, greedy_before
):
    assert http_call(triton.http_url, "GET", "/v2/health/ready").status == 200
    assert_unharmed(triton, identity)
    assert generate_http(triton, GREEDY) == greedy_before
    grpc_text, error = grpc_generate(triton.grpc_url, grpc_inputs(GREEDY))
    assert error is None and grpc_text == greedy_before


# == 2. Oversized bodies ==================================================================
def generate_body(size: int) -> bytes:
    return b'{"text_input": "' + b"a" * size + b'", "max_tokens": 1}'


def tokenizer_body(size: int) -> bytes:
    head = b'{"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["'
    return head + b"a" * size + b'"]}]}'


def post_oversized(url: str, path: str, body: bytes, chunked: bool = False):
    """POST a big body; the front door may answer and close before it has read it all.

    Returns (status or None, response body, whether the whole body went out); None when the
    front door closed the connection so early that no response could be read.
    """
    connection = http.client.HTTPConnection(*host_port(url), timeout=DEADLINE_S)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
        else:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        view, sent_all = memoryview(body), True
        try:
            for start in range(0, len(body), MB):
                piece = view[start : start + MB]
                if chunked:
                    connection.sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                else:
                    connection.sock.sendall(piece)
            if chunked:
                connection.sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            sent_all = False  # the front door stopped reading: its answer is read below
        try:
            response = connection.getresponse()
            return response.status, response.read(), sent_all
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            return None, b"", sent_all
    finally:
        connection.close()


@pytest.mark.parametrize("megabytes", [4, 16, 64])
@pytest.mark.parametrize(
    "path, build, chunked",
    [
        pytest.param(GENERATE, generate_body, False, id="generate"),
        pytest.param(GENERATE, generate_body, True, id="generate-chunked"),
        pytest.param("/v2/models/tokenizer/infer", tokenizer_body, False, id="tokenizer-infer"),
    ],
)
def test_oversized_http_body_is_refused_and_triton_survives(
    triton, identity, megabytes, path, build, chunked
):
    # tritonserver 2.51 itself dies (SIGSEGV) on an HTTP body of ~4 MB: only the front
    # door's limit keeps it alive.
    status, body, sent_all = post_oversized(triton.http_url, path, build(megabytes * MB), chunked)
    if status is None:
        assert not sent_all, "the connection closed after the whole body went out, unanswered"
    else:
        assert status == 413, (status, body)
        assert json.loads(body)["error"].startswith("request too large: the limit is 1048576")
    assert_unharmed(triton, identity)


@pytest.mark.parametrize("megabytes", [4, 16, 64])
def test_oversized_unary_grpc_call_is_resource_exhausted(triton, identity, megabytes):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        text_input = grpcclient.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([b"a" * (megabytes * MB)], dtype=object))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tokenizer", [text_input])
    finally:
        client.close()
    assert grpc_status(refused.value) == "RESOURCE_EXHAUSTED"
    assert "request too large: the limit is 1048576 bytes per request" in refused.value.message()
    assert_unharmed(triton, identity)


def test_a_grpc_client_at_the_http_port_is_told_where_grpc_is(triton):
    """Triton's HTTP server would hold a gRPC stream a minute, then say "request timeout"."""
    client = grpcclient.InferenceServerClient(triton.http_url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.is_server_ready(client_timeout=DEADLINE_S)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put(error))
        with contextlib.suppress(InferenceServerException):  # the stream may be over already
            client.async_stream_infer("gpt2", grpc_inputs({"text_input": PROMPT}, {}))
        streamed = answers.get(timeout=DEADLINE_S)  # at once; a hang fails here
        client.stop_stream()
    finally:
        client.close()
    port = triton.grpc_url.rsplit(":", 1)[1]
    assert grpc_status(refused.value) == "UNIMPLEMENTED", refused.value
    for error in (refused.value, streamed):
        assert f"gRPC goes to port {port}" in error.message(), error


@pytest.mark.parametrize("megabytes", [4, 16, 64])
def test_oversized_grpc_stream_message_is_refused(triton, identity, megabytes):
    prompt = b"hello " * (megabytes * MB // 6)
    text_out, error = grpc_generate(
        triton.grpc_url, grpc_inputs({"text_input": prompt, "max_tokens": 1})
    )
    assert error is not None, f"accepted, answered {text_out!r}"
    if megabytes * MB < FrontDoorSettings().max_stream_bytes:
        # Within a stream's 8 MiB: it passes the front door and the model refuses it, from
        # its length alone (tokenizing megabytes would hold the model for seconds).
        assert re.search(
            r"text_input has \d+ characters: more than the context window of 1024 tokens",
            error.message(),
        )
    else:
        assert grpc_status(error) == "RESOURCE_EXHAUSTED", error
        assert "request too large" in error.message()
    assert_unharmed(triton, identity)


# == 3. Admin routes ======================================================================
ADMIN_REFUSAL = "admin API: send the x-admin-key header with the server's admin key"
ADMIN_HTTP = [
    # method, path, the status Triton answers once the key lets the request through
    ("POST", "/v2/repository/index", 200),
    ("POST", "/v2/repository/models/gpt2/unload", 503),  # --model-control-mode=none
    ("GET", "/v2/logging", 200),
    ("GET", "/v2/trace/setting", 200),
    ("GET", "/v2/models/gpt2/trace/setting", 200),
    ("GET", "/v2/models/stats", 200),
    ("GET", "/v2/models/gpt2/stats", 200),
    ("GET", "/v2/models/gpt2/versions/1/stats", 200),
    ("GET", "/v2/systemsharedmemory/status", 200),
    ("GET", "/v2/cudasharedmemory/status", 200),
    # path tricks: the front door normalizes the path before it matches the admin routes
    ("POST", "//v2//repository/index", 200),
    ("POST", "/v2/models/gpt2/../../repository/index", 200),
    ("POST", "/v2/./repository/index", 200),
    ("POST", "/v2/%72epository/index", 200),  # %72 = r
    ("POST", "/v2/repository/index?model=gpt2", 200),
    ("GET", "/v2/logging?", 200),
    ("GET", "/v2/models/gpt2//stats", 200),
]


@pytest.mark.parametrize(
    "method, path, status_with_key", [pytest.param(*a, id=a[1]) for a in ADMIN_HTTP]
)
def test_admin_http_path_needs_the_admin_key(triton, method, path, status_with_key):
    for headers in ({}, {"x-admin-key": "wrong"}, {"x-admin-key": ADMIN_KEY + "x"}):
        reply = http_call(triton.http_url, method, path, headers=headers)
        assert reply.status == 403, (headers, reply)
        assert reply.error() == ADMIN_REFUSAL
    reply = http_call(triton.http_url, method, path, headers={"x-admin-key": ADMIN_KEY})
    assert reply.status == status_with_key, reply


def test_escaped_slash_in_a_path_is_rejected_at_the_door(triton):
    # %2F could hide a path from the admin routes: the front door rejects it outright
    reply = http_call(triton.http_url, "POST", "/v2/repository%2Findex")
    assert reply.status == 400, reply
    assert "malformed request" in json.loads(reply.body)["error"], reply
    # under /v1 in OpenAI's error shape, with the same words (not an empty message)
    reply = http_call(triton.http_url, "GET", "/v1/models/a%2Fb")
    error = json.loads(reply.body)["error"]
    assert reply.status == 400 and "malformed request" in error["message"], reply
    assert error["type"] == "invalid_request_error"


ADMIN_GRPC = {
    "RepositoryIndex": lambda c, h: c.get_model_repository_index(headers=h),
    "LogSettings": lambda c, h: c.get_log_settings(headers=h),
    "TraceSetting": lambda c, h: c.get_trace_settings(headers=h),
    "ModelStatistics": lambda c, h: c.get_inference_statistics("gpt2", headers=h),
    "SystemSharedMemoryStatus": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "CudaSharedMemoryStatus": lambda c, h: c.get_cuda_shared_memory_status(headers=h),
}


@pytest.mark.parametrize("method", list(ADMIN_GRPC))
def test_admin_grpc_method_needs_the_admin_key(triton, method):
    call = ADMIN_GRPC[method]
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        for headers in (None, {"x-admin-key": "wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                call(client, headers)
            assert grpc_status(refused.value) == "PERMISSION_DENIED", headers
            assert refused.value.message() == ADMIN_REFUSAL
        call(client, {"x-admin-key": ADMIN_KEY})  # raises if refused
    finally:
        client.close()


def test_triton_behind_the_door_refuses_the_admin_api_without_the_key(triton):
    """The second layer: Triton's own restriction, on its loopback ports."""
    direct = triton.triton.http_url
    assert direct != triton.http_url
    for method, path in [
        ("POST", "/v2/repository/index"),
        ("GET", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("GET", "/v2/models/stats"),
        ("GET", "/v2/systemsharedmemory/status"),
    ]:
        for headers in ({}, {"x-admin-key": "wrong"}):
            reply = http_call(direct, method, path, headers=headers)
            assert reply.status == 403, (path, headers, reply)
            assert reply.error() == "This API is restricted, expecting header 'x-admin-key'"
        assert http_call(direct, method, path, headers={"x-admin-key": ADMIN_KEY}).status == 200
    client = grpcclient.InferenceServerClient(triton.triton.grpc_url)
    try:
        for headers in (None, {"x-admin-key": ADMIN_KEY}):  # over gRPC Triton wants its prefix
            with pytest.raises(InferenceServerException, match="This protocol is restricted"):
                client.get_model_repository_index(headers=headers)
        client.get_model_repository_index(headers={"triton-grpc-protocol-x-admin-key": ADMIN_KEY})
    finally:
        client.close()


# == 4. API key ===========================================================================
API_KEY_REFUSAL = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def test_binding_beyond_loopback_without_an_api_key_is_refused():
    with pytest.raises(FrontDoorError, match="HOST=0.0.0.0 exposes the service.*set API_KEY"):
        FrontDoorSettings(host="0.0.0.0")
    assert FrontDoorSettings(host="0.0.0.0", api_key="k").api_key == "k"


def test_api_key_is_needed_for_everything_but_health_over_http(guarded):
    for path in ("/v2/health/ready", "/v2/health/live"):
        assert http_call(guarded.http_url, "GET", path).status == 200, path
    body = {"text_input": PROMPT, "max_tokens": 3}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},  # no "Bearer "
        {"Authorization": f"bearer {API_KEY}x"},
        {"Authorization": f"Bearer {API_KEY.upper()}"},  # the key itself is exact
        {"Authorization": f"Bearer{API_KEY}"},
    ):
        reply = http_call(guarded.http_url, "POST", GENERATE, body, headers)
        assert reply.status == 401, (headers, reply)
        assert reply.headers.get("content-type") == "application/json"
        assert reply.error() == API_KEY_REFUSAL
    for method, path in [
        ("GET", "/v2"),
        ("GET", "/v2/models/gpt2/config"),
        ("GET", "/v2/health/../models/gpt2/config"),  # out of /v2/health/ once normalized
        ("POST", GENERATE_STREAM),
    ]:
        reply = http_call(guarded.http_url, method, path, body if method == "POST" else None)
        assert reply.status == 401, (path, reply)
    # the key first: a bad body without it learns nothing about its body (the body check
    # runs on the route to Triton only)
    bad = body | {"max_tokens": 2**32}
    assert http_call(guarded.http_url, "POST", GENERATE, bad).status == 401
    assert http_call(guarded.http_url, "POST", GENERATE, bad, AUTH).status == 400
    assert generate_http(guarded, body, AUTH).startswith(PROMPT)
    # the scheme is case-insensitive (RFC 7235), as are the spaces after it
    for scheme in ("bearer ", "BEARER  "):
        assert generate_http(guarded, body, {"Authorization": scheme + API_KEY}).startswith(PROMPT)


def test_api_key_is_needed_for_everything_but_health_over_grpc(guarded):
    client = grpcclient.InferenceServerClient(guarded.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                client.is_model_ready("gpt2", headers=headers)
            assert grpc_status(refused.value) == "UNAUTHENTICATED"
            assert refused.value.message() == API_KEY_REFUSAL
            text_out, error = grpc_generate(
                guarded.grpc_url, grpc_inputs({"text_input": PROMPT, "max_tokens": 3}), headers
            )
            assert error is not None, f"accepted without the key: {text_out!r}"
            assert grpc_status(error) == "UNAUTHENTICATED" and API_KEY_REFUSAL in error.message()
        assert client.is_model_ready("gpt2", headers=GRPC_AUTH)
    finally:
        client.close()
    text_out, error = grpc_generate(
        guarded.grpc_url, grpc_inputs({"text_input": PROMPT, "max_tokens": 3}), GRPC_AUTH
    )
    assert error is None and text_out.startswith(PROMPT)


def test_admin_api_also_needs_the_api_key_when_one_is_set(guarded):
    reply = http_call(
        guarded.http_url, "POST", "/v2/repository/index", headers={"x-admin-key": ADMIN_KEY}
    )
    assert reply.status == 401, reply


# == 5. Concurrency limit =================================================================
class LongGrpcStream(GrpcStream):
    """A gRPC stream with a long generation in flight (its first response has arrived)."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        super().__init__(url, headers)
        try:
            self.send(grpc_inputs({**LONG, "stream": True}))
            result, error = self.next()
            assert error is None, error
        except BaseException:
            self.close(cancel=True)
            raise


def test_grpc_call_over_the_concurrency_limit_is_resource_exhausted(guarded):
    # Over gRPC each stream is one request at the front door for as long as it is open.
    streams = [LongGrpcStream(guarded.grpc_url, GRPC_AUTH) for _ in range(LIMIT)]
    try:
        client = grpcclient.InferenceServerClient(guarded.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.is_model_ready("gpt2", headers=GRPC_AUTH)
        finally:
            client.close()
        assert grpc_status(refused.value) == "RESOURCE_EXHAUSTED"
        message = f"too many requests in flight (at most {LIMIT}): retry later"
        assert refused.value.message() == message
        text_out, error = grpc_generate(
            guarded.grpc_url, grpc_inputs({"text_input": PROMPT, "max_tokens": 3}), GRPC_AUTH
        )
        assert error is not None, f"a third request was served: {text_out!r}"
        assert grpc_status(error) == "RESOURCE_EXHAUSTED" and message in error.message()
    finally:
        for stream in streams:
            stream.close(cancel=True)

    def works():
        return grpc_generate(
            guarded.grpc_url, grpc_inputs({"text_input": PROMPT, "max_tokens": 3}), GRPC_AUTH
        )[0]

    assert wait_for(works, "a gRPC request served after the streams ended").startswith(PROMPT)


def http_in_flight(service) -> int:
    """Requests the front door holds for Triton's HTTP port: sent upstream or queued."""
    stats = service.envoy.stats()
    return (
        stats["cluster.triton_http.upstream_rq_active"]
        + stats["cluster.triton_http.upstream_rq_pending_active"]
    )


# A tokenizer call, not gpt2's /generate: the door reads a generate body whole before it
# passes it on (generate_check.lua), so a half-sent one is not yet in flight upstream.
HELD_PATH = "/v2/models/tokenizer/infer"
HELD_BODY = json.dumps(
    {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}]}
).encode()


def hold_http_request(service) -> socket.socket:
    """A request with half its body sent: in flight at the door until released."""
    sock = socket.create_connection(host_port(service.http_url), timeout=DEADLINE_S)
    head = (
        f"POST {HELD_PATH} HTTP/1.1\r\nHost: front-door\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(HELD_BODY)}\r\n\r\n"
    )
    sock.sendall(head.encode() + HELD_BODY[:10])
    return sock


def read_reply(sock: socket.socket) -> Reply:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return Reply(response.status, response.read(), dict(response.getheaders()))


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_http_requests_over_the_limit_get_a_clear_429_and_work_again_after(guarded):
    # Requests held by an unfinished body are in flight whatever the machine's speed.
    # Over HTTP (one upstream connection per request) the door admits LIMIT and lets LIMIT
    # more wait for a connection (docs/API.md), so the refusal comes at 2 * LIMIT + 1.
    held: list[socket.socket] = []
    refusal = None
    try:
        for _ in range(2 * LIMIT + 1):
            sock = hold_http_request(guarded)
            held.append(sock)
            count = len(held)
            wait_for(
                lambda sock=sock, count=count: answered(sock) or http_in_flight(guarded) == count,
                "the request in flight at the front door, or answered",
            )
            if answered(sock):
                refusal = read_reply(held.pop())
                sock.close()
                break
        assert refusal is not None, f"{len(held)} requests in flight and none refused"
        assert len(held) >= LIMIT, f"refused with only {len(held)} in flight"
        assert refusal.status == 429, refusal
        assert refusal.error() == f"too many requests in flight (at most {LIMIT}): retry later"
        for sock in held:  # release them: each is served
            sock.sendall(HELD_BODY[10:])
            assert read_reply(sock).status == 200
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: http_in_flight(guarded) == 0, "no request in flight at the front door")
    assert generate_http(guarded, {"text_input": PROMPT, "max_tokens": 3}, AUTH)


# == 6. Streaming through the door ========================================================
# what Triton's generate_stream sends for a streamed piece before the final response
PIECE = {"model_name", "model_version", "text_output"}


def test_http_stream_arrives_event_by_event(triton):
    # 256 tokens: pieces that wait join (how many depends on how sending keeps up); a
    # machine that starves the sending for the whole stream can send it as one piece, and
    # such a stream is void (three at most). A door that buffered would merge every one.
    body = {"text_input": PROMPT, "max_tokens": 256, "min_length": 256, "temperature": 0}
    counted = {"return_num_output_tokens": True, "return_finish_reason": True}
    before, streams = finished(triton), 0
    for _ in range(3):
        streams += 1
        stream = HttpStream(triton, body | counted)
        events = []
        while (event := stream.next_event()) is not None:
            events.append(event)
        stream.connection.close()
        assert events[-1]["finish_reason"] in {"length", "stop"}
        if len(events) > 1:
            break
    else:
        pytest.fail("three streams of 256 tokens each came as one event: the door merged them")
    assert events[0]["finish_reason"] == "" and events[0]["num_output_tokens"] < 256
    counts = [e["num_output_tokens"] for e in events]
    assert counts == sorted(counts)
    # The next tests count finish reasons from here: leave once these requests are counted.
    wait_for(
        lambda: sum(finished_since(triton, before).values()) >= streams,
        lambda: f"{streams} requests counted: {finished_since(triton, before)}",
    )


def cut_mid_generation(triton, cut: Callable[[], None], attempts: int = 4) -> None:
    """Run ``cut`` (open a 1000-token stream, read its first piece, cut it) until the server
    counts a cancel. The stream must still be generating when the cut reaches Triton; on a
    machine that stalls the test for the whole generation it ends "length" instead: such
    an attempt shows nothing either way, so it is tried again. A door that buffered the
    stream or lost the cut would end every attempt "length"."""
    outcomes = []
    for _ in range(attempts):
        wait_for(lambda: idle(triton), "an idle server")  # its counts include every end
        before = finished(triton)
        cut()
        ended = wait_for(
            lambda before=before: {
                reason: n
                for reason, n in finished_since(triton, before).items()
                if reason in ("cancelled", "length") and n >= 1
            },
            lambda before=before: f"the cut request to end: {finished_since(triton, before)}",
        )
        if "cancelled" in ended:
            assert "length" not in ended, ended
            return
        outcomes.append(ended)
    pytest.fail(f"in {attempts} attempts every stream ran to its end: {outcomes}")


def test_first_http_event_arrives_mid_generation_and_a_disconnect_cancels(triton):
    # The stream cannot end by itself for 1000 tokens. Had the door buffered the response,
    # the first event would come after the last one and the request would end "length";
    # it ends "cancelled": the first event reached the client while Triton was generating,
    # and the closed connection reached Triton.
    def drop_after_the_first_event():
        stream = HttpStream(triton, LONG)
        first = stream.next_event()
        assert set(first) == PIECE, first  # a piece before the final response
        stream.drop()

    cut_mid_generation(triton, drop_after_the_first_event)


def test_grpc_stop_stream_with_cancel_reaches_triton(triton):
    cut_mid_generation(triton, lambda: LongGrpcStream(triton.grpc_url).close(cancel=True))


# == 7. Many streams cut mid-generation ===================================================
# One cut in four is a gRPC cancel, the others dropped HTTP connections. tritonserver 2.51
# died once in CI in the first of these batches, with a SIGSEGV that we read as an upstream
# race between a gRPC stream's cancellation and a response (docs/RELIABILITY.md, "Known
# limit"). This test is about memory, which both paths reach the same way in the model; a
# quarter keeps the gRPC path in it at half the exposure.
GRPC_CUT_EVERY = 4


def cut_one_stream(service, index: int) -> None:
    """Start a long stream, wait for its first piece, then cancel (gRPC) or drop (HTTP)."""
    if index % GRPC_CUT_EVERY:
        stream = HttpStream(service, LONG)
        try:
            event = stream.next_event()
            assert set(event) == PIECE, event  # mid-generation
        finally:
            stream.drop()
    else:
        LongGrpcStream(service.grpc_url).close(cancel=True)  # stop_stream(cancel_requests=True)


MAX_CUT_BATCHES = 8
WINDOW = 3  # batches judged together
LEAK_BOUND = 12 * MB  # over a window of 600 streams: 20 KB a stream


def cut_streams(service, count: int, concurrency: int = 16) -> None:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: cut_one_stream(service, i), range(count)))


def test_200_streams_cut_mid_generation_leave_nothing_behind(triton, identity):
    def cut_and_settle(count: int) -> dict[str, float]:
        """Cut ``count`` streams; wait until the model counted them all and is idle."""
        before = finished(triton)
        returns = heap_returns(triton)
        cut_streams(triton, count)
        # the model publishes its metrics twice a second: wait for the counts, then idle
        wait_for(
            lambda: sum(finished_since(triton, before).values()) >= count,
            lambda: f"{count} requests finished: {finished_since(triton, before)}",
        )
        wait_for(lambda: idle(triton), lambda: f"the gpt2 model idle: {gpt2_metrics(triton)}")
        # then the loop's give-back of freed heap, 15 s into the idle (model.py): what is
        # read after it is what the server keeps, not the allocator's high-water mark,
        # which moved by up to 83 MB in one batch (two CI runs)
        wait_for(
            lambda: heap_returns(triton) > returns,
            lambda: f"the gpt2 model's idle heap give-back: {gpt2_metrics(triton)}",
        )
        return finished_since(triton, before)

    # Memory must be flat: a leak grows with every batch. The first batches settle the
    # working size (pools, allocator arenas: after the bad-input matrix the gpt2 stub's heap
    # rose by tens of MB in them, on a busy machine as late as the fourth batch); then three
    # batches in a row (600 streams) may not add more than LEAK_BOUND together (20 KB a
    # stream). One batch's reading moves by up to ~12 MB either way under a CPU hog (+6,
    # -12, +6, -3 MB), so the bound is over three together. A leak fails every window.
    cut_and_settle(16)
    shm_before = shm_files(triton)
    readings = [server_rss(triton)]
    while len(readings) <= MAX_CUT_BATCHES:
        ended = cut_and_settle(200)
        readings.append(server_rss(triton))
        assert sum(ended.values()) == 200, ended  # each ended exactly once
        assert not ended.get("error"), ended
        if len(readings) > WINDOW and readings[-1] - readings[-1 - WINDOW] <= LEAK_BOUND:
            break
    steps = [round((b - a) / MB, 1) for a, b in zip(readings, readings[1:], strict=False)]
    print(f"server RSS per 200 cut streams: {steps} MB")
    assert readings[-1] - readings[-1 - WINDOW] <= LEAK_BOUND, (
        f"server RSS still grows after {len(steps)} batches of 200 cut streams: {steps} MB "
        f"a batch ({rss_by_process(triton)})"
    )
    shm_after = shm_files(triton)
    assert len(shm_after) == len(shm_before), (shm_before, shm_after)
    assert sum(shm_after.values()) <= sum(shm_before.values()) + MB, (shm_before, shm_after)
    assert_unharmed(triton, identity)


# == 8. The OpenAI API behind the same door ================================================
def openai_client(service, api_key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=f"http://{service.http_url}/v1", api_key=api_key, max_retries=0)


def test_the_openai_api_is_served_behind_the_front_door(triton):
    client = openai_client(triton)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    native = generate_http(triton, {"text_input": PROMPT, "max_tokens": 12, "temperature": 0})
    assert PROMPT + reply.choices[0].text == native
    assert reply.usage.completion_tokens == 12


def test_the_front_door_answers_the_openai_api_in_openai_s_error_shape(triton, guarded):
    big = {"model": "m", "prompt": "a" * (2 * MB)}
    too_large = http_call(triton.http_url, "POST", "/v1/completions", big)
    assert too_large.status == 413
    assert too_large.json()["error"]["code"] == "request_too_large"
    assert "request too large" in too_large.json()["error"]["message"]
    no_key = http_call(guarded.http_url, "GET", "/v1/models")
    assert no_key.status == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(guarded, api_key="wrong").models.list()
    # with the key, the door lets the call through to the gateway, and the gateway to Triton
    client = openai_client(guarded, api_key=API_KEY)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


def test_compressed_bodies_are_refused(triton, identity):
    """The size limit counts bytes on the wire: a gzip body of a few KB decodes into MBs
    inside Triton. Refused at the door, over HTTP and gRPC."""
    import gzip

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    body = gzip.compress(json.dumps({"text_input": "a" * (4 * MB), "max_tokens": 1}).encode())
    assert len(body) < 64 * 1024
    reply = http_call(triton.http_url, "POST", GENERATE, body, {"Content-Encoding": "gzip", **JSON})
    assert reply.status == 415, reply
    assert "compressed request bodies are not accepted" in reply.error()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        tensor = grpcclient.InferInput("text_input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"a" * (4 * MB)], dtype=object))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tokenizer", [tensor], compression_algorithm="gzip")
    finally:
        client.close()
    assert grpc_status(refused.value) == "UNIMPLEMENTED", refused.value
    assert "compressed messages are not accepted" in refused.value.message()
    assert_unharmed(triton, identity)
