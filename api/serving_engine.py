"""What the completion and chat endpoints share: one request's choices run on Triton.

Each choice is its own Triton request, all started at once: the model batches them in
flight. Their responses are merged into one stream of ``(choice index, piece)``. Closing
it before every choice has finished (a client gone, a choice that failed) cancels the
choices still running, so Triton drops them at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping

from api.errors import TRITON_PARAMS, ApiError, error_body, from_triton
from api.protocol import SamplingRequest, UsageInfo
from api.serving_models import ServingModels
from api.triton import Generation, Piece, TritonClient, TritonError
from gpt2_triton.sampling import MAX_SEED

# Tasks the event loop only holds weakly: kept here until they end.
_RUNNING: set[asyncio.Task] = set()


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index`` draws with ``seed + index``, so that the choices differ and each
    is reproducible. 0 means "a fresh random seed" to the model, so the model's seed is
    that plus one, wrapping round within [1, MAX_SEED]: one to one for the OpenAI seeds
    [0, MAX_SEED - 1] (protocol.MAX_OPENAI_SEED), and n <= 16 choices never meet."""
    if seed is None:
        return None
    return (seed + index) % MAX_SEED + 1


def generation(
    request: SamplingRequest,
    prompt: str,
    index: int,
    max_tokens: int | None,
    stop_words: tuple[str, ...],
) -> Generation:
    """One choice of ``request`` as a gpt2 request (docs/API.md has the mapping)."""
    return Generation(
        prompt=prompt,
        stream=request.stream,
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
        seed=choice_seed(request.seed, index),
        stop_words=stop_words,
        min_length=request.min_tokens or None,
    )


class Choices:
    """The merged responses of several Triton requests; ``close()`` cancels the rest."""

    def __init__(
        self, triton: TritonClient, generations: list[Generation], authorization: str | None
    ) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._running = len(generations)
        self._first: tuple[int, Piece] | None = None
        self._tasks = []
        for index, item in enumerate(generations):
            task = asyncio.create_task(self._pump(triton, index, item, authorization))
            _RUNNING.add(task)
            task.add_done_callback(_RUNNING.discard)
            self._tasks.append(task)

    async def _pump(self, triton, index, item, authorization) -> None:
        try:
            async with contextlib.aclosing(triton.generate(item, authorization)) as pieces:
                async for piece in pieces:
                    self._queue.put_nowait((index, piece, None))
        except Exception as exc:  # Triton's refusal, or a bug of ours: this request fails
            self._queue.put_nowait((index, None, exc))

    def __aiter__(self) -> AsyncIterator[tuple[int, Piece]]:
        return self

    async def __anext__(self) -> tuple[int, Piece]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._running == 0:
            raise StopAsyncIteration
        index, piece, error = await self._queue.get()
        if error is not None:
            self.close()  # one choice failed: the response fails, the others stop
            raise error
        if piece.finish_reason:
            self._running -= 1
        return index, piece

    async def wait_first(self) -> None:
        """Wait for the first response (raising a failure); the iteration still yields it."""
        self._first = await self.__anext__()

    def close(self) -> None:
        """Cancel the choices still running (synchronous: safe in a cancelled task)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()


class OpenAIServing:
    """Base of the endpoint handlers: the model check, the choices, ids and errors."""

    id_prefix = "cmpl"

    def __init__(self, triton: TritonClient, models: ServingModels) -> None:
        self.triton = triton
        self.models = models

    def new_id(self) -> tuple[str, int]:
        return f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    async def start(
        self,
        generations: list[Generation],
        authorization: str | None,
        params: Mapping[str, str] = TRITON_PARAMS,
    ) -> Choices:
        """Start every choice and wait for the first response, so that a request Triton
        refuses (a prompt too long, a full queue) gets its HTTP status, not a stream."""
        try:
            await self.triton.check_caller(authorization)
        except TritonError as exc:
            raise from_triton(exc, params) from None
        choices = Choices(self.triton, generations, authorization)
        try:
            await choices.wait_first()
        except TritonError as exc:
            raise from_triton(exc, params) from None
        except BaseException:  # cancelled while waiting: the client is gone
            choices.close()
            raise
        return choices

    @staticmethod
    def check_sampling(request: SamplingRequest, max_tokens: int | None, max_param: str) -> None:
        """Checks across fields (pydantic checks each field alone)."""
        if max_tokens is not None and request.min_tokens > max_tokens:
            raise ApiError(
                400,
                f"min_tokens ({request.min_tokens}) must be at most {max_param} ({max_tokens})",
                "min_tokens",
            )
        if request.stream_options is not None and not request.stream:
            raise ApiError(
                400, "stream_options is only allowed with stream: true", "stream_options"
            )


def usage(finals: Mapping[int, Piece], n: int) -> UsageInfo:
    """Token counts from the final responses (by choice index); a prompt counts once
    whatever ``n`` is, as in OpenAI's usage."""
    prompt = sum(piece.num_input_tokens for i, piece in finals.items() if i % n == 0)
    completion = sum(piece.num_output_tokens for piece in finals.values())
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def sse(payload) -> str:
    """One server-sent event; pydantic models as OpenAI's JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


class TextChunks:
    """Server-sent events of one stream's text chunks, without a pydantic model a token.

    The stream's text chunks differ only in their text, so the event is rendered once per
    choice by pydantic (the one shape, from api/protocol.py) with a placeholder, and each
    chunk is that event with the placeholder's JSON string replaced by the text's.
    """

    _PLACEHOLDER = "\ue000"  # a private-use character: no model field's value contains it

    def __init__(self, render) -> None:
        self._render = render  # (choice index, text) -> the pydantic payload
        self._templates: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        template = self._templates.get(index)
        if template is None:
            event = sse(self._render(index, self._PLACEHOLDER))
            quoted = json.dumps(self._PLACEHOLDER, ensure_ascii=False)
            before, placeholder, after = event.partition(quoted)
            if not placeholder or quoted in after:
                raise AssertionError(f"the placeholder is not once in {event!r}")
            template = self._templates[index] = (before, after)
        before, after = template
        return before + json.dumps(text, ensure_ascii=False) + after


def sse_error(exc: Exception, params: Mapping[str, str] = TRITON_PARAMS) -> str:
    """An error after the stream began (status 200 already sent): an event with the
    error body, as OpenAI's SDK reads it (then ``[DONE]``)."""
    if isinstance(exc, TritonError):
        exc = from_triton(exc, params)
    return sse(error_body(exc)[1])


DONE = "data: [DONE]\n\n"
