"""Every error leaves the gateway through ``error_body``: OpenAI's error shape, the right status.

``{"error": {"message", "type", "param", "code"}}``. 400 bad values (``param`` names the
OpenAI field), 404 an unknown model, 429 Triton's queue is full, 503 Triton unreachable
or not ready; 401/413/429 for keys, sizes and rates come from the Envoy front door.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.protocol import ErrorInfo, ErrorResponse
from api.triton import TritonError
from gpt2_triton import names

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


# gpt2 input -> the OpenAI field that sets it (serving modules adjust text_input, max_tokens)
TRITON_PARAMS = {
    names.TEXT_INPUT: "prompt",
    names.MAX_TOKENS: "max_tokens",
    names.TEMPERATURE: "temperature",
    names.TOP_K: "top_k",
    names.TOP_P: "top_p",
    names.REPETITION_PENALTY: "repetition_penalty",
    names.SEED: "seed",
    names.STOP_WORDS: "stop",
    names.MIN_LENGTH: "min_tokens",
}

# gRPC status (Triton's, or the front door's) -> HTTP status
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,  # the model's full queue; the front door's limits
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# batcher.InflightBatcher.submit's two context-window messages
_PROMPT_TOO_LONG = re.compile(r"has (\d+) tokens; the context window is (\d+) tokens")
_TOO_MANY_CHARACTERS = re.compile(
    r"has (\d+) characters: more than the context window of (\d+) tokens can hold "
    r"\(at most (\d+)\)"
)
_TOO_MANY_TOKENS = re.compile(
    r"\((\d+)\) \+ \S+ \((\d+) tokens\) exceed the context window of (\d+) tokens: "
    r"\S+ can be at most (\d+)"
)


def from_triton(exc: TritonError, params: Mapping[str, str] = TRITON_PARAMS) -> ApiError:
    """A Triton failure in OpenAI's terms; ``params`` names the fields behind the inputs."""
    status = _HTTP_STATUS.get(exc.status, 500)
    if exc.status == "RESOURCE_EXHAUSTED" and "too large" in exc.message:
        status = 413  # the front door's size limit
    if status != 400:
        code = "queue_full" if "already waiting" in exc.message else None
        return ApiError(status, exc.message, code=code)
    prompt = params.get(names.TEXT_INPUT, "prompt")
    if match := _TOO_MANY_TOKENS.search(exc.message):
        asked, prompt_tokens, window, room = match.groups()
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{int(prompt_tokens) + int(asked)} tokens ({prompt_tokens} in the {prompt}, "
            f"{asked} for the completion). Reduce the length of the {prompt} or "
            f"{params.get(names.MAX_TOKENS, 'max_tokens')}: at most {room} for this {prompt}."
        )
        return ApiError(400, message, prompt, "context_length_exceeded")
    if match := _TOO_MANY_CHARACTERS.search(exc.message):
        characters, window, most = match.groups()
        message = (
            f"This model's maximum context length is {window} tokens. However, the {prompt} "
            f"has {characters} characters, more than {window} tokens can hold ({most} "
            "characters at most): it was refused before it was tokenized."
        )
        return ApiError(400, message, prompt, "context_length_exceeded")
    if match := _PROMPT_TOO_LONG.search(exc.message):
        prompt_tokens, window = match.groups()
        message = (
            f"This model's maximum context length is {window} tokens. However, you sent "
            f"{prompt_tokens} tokens in the {prompt}, which leaves no room for a completion "
            f"(at most {int(window) - 1} tokens leave room for one)."
        )
        return ApiError(400, message, prompt, "context_length_exceeded")
    param = params.get(exc.input_name or "", exc.input_name)
    message = exc.message
    if exc.input_name and param and param != exc.input_name:
        message = f"{param}: {message}"  # the model names its input; the caller knows the field
    return ApiError(400, message, param)


_UNION_BRANCHES = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _UNION_BRANCHES and "[" not in part and "-" not in part:
            out += f".{part}" if out else part  # a union's branch names are not fields
    return out or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    # A union reports each branch it tried: our own check's message says what is wrong,
    # where "Input should be a valid string" (another branch's) would not.
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {loc[-1]}", _param(loc))
    if error.get("type") == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {error.get('msg')}")
    if error.get("type") == "model_attributes_type":
        return ApiError(
            400, "The request body must be a JSON object, sent as Content-Type: application/json"
        )
    param = _param(loc)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param)


def error_body(exc: Exception) -> tuple[int, ErrorResponse]:
    """The one place an exception becomes an HTTP status and OpenAI's error body."""
    if isinstance(exc, TritonError):
        exc = from_triton(exc)
    elif isinstance(exc, RequestValidationError):
        exc = _validation_error(exc)
    elif isinstance(exc, HTTPException):
        exc = ApiError(exc.status_code, str(exc.detail))
    elif not isinstance(exc, ApiError):
        log.error("request failed", exc_info=exc)
        exc = ApiError(500, "internal error in the gateway; its log has the details")
    if exc.status >= 500:  # 503: Triton down or restarting, which health probes repeat
        log.log(
            logging.INFO if exc.status == 503 else logging.WARNING,
            "answering %d: %s",
            exc.status,
            exc.message,
        )
    info = ErrorInfo(
        message=exc.message, type=_error_type(exc.status), param=exc.param, code=exc.code
    )
    return exc.status, ErrorResponse(error=info)


def error_response(exc: Exception) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body.model_dump(), status_code=status)


async def handle(request, exc: Exception) -> JSONResponse:
    """The exception handler installed for every error type (api.server)."""
    return error_response(exc)
