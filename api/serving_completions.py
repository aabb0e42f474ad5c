"""``POST /v1/completions``: prompts continued by GPT-2, one Triton request per choice.

Choice ``i * n + j`` is prompt ``i``'s ``j``-th (OpenAI's order). ``echo`` puts the prompt
before the text (the gateway adds it: the model never streams the prompt back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.errors import ApiError
from api.protocol import MAX_CHOICES, CompletionChoice, CompletionRequest, CompletionResponse
from api.serving_engine import (
    DONE,
    Choices,
    OpenAIServing,
    TextChunks,
    generation,
    sse,
    sse_error,
    usage,
)
from api.triton import Piece


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl"

    async def create(
        self, request: CompletionRequest, authorization: str | None
    ) -> CompletionResponse | AsyncIterator[str]:
        model = await self.models.check(request.model, authorization)
        self.check_sampling(request, request.max_tokens, "max_tokens")
        if request.best_of not in (None, request.n):
            raise ApiError(400, "best_of other than n is not supported", "best_of")
        if len(request.prompts) * request.n > MAX_CHOICES:
            # each choice is a Triton request: one call must not take everyone's budget
            raise ApiError(
                400,
                f"{len(request.prompts)} prompts x n={request.n} choices: at most "
                f"{MAX_CHOICES} choices per request",
                "n",
            )
        prompts = [p for p in request.prompts for _ in range(request.n)]  # one per choice
        generations = [
            generation(request, prompt, index, request.max_tokens, request.stop_words)
            for index, prompt in enumerate(prompts)
        ]
        choices = await self.start(generations, authorization)
        if request.stream:
            return self._stream(request, model, prompts, choices)
        texts = dict.fromkeys(range(len(prompts)), "")
        finals: dict[int, Piece] = {}
        try:
            async for index, piece in choices:
                texts[index] += piece.text
                if piece.finish_reason:
                    finals[index] = piece
        finally:
            choices.close()
        response_id, created = self.new_id()
        return CompletionResponse(
            id=response_id,
            created=created,
            model=model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=(prompts[i] if request.echo else "") + texts[i],
                    finish_reason=finals[i].finish_reason,
                )
                for i in range(len(prompts))
            ],
            usage=usage(finals, request.n),
        )

    async def _stream(
        self, request: CompletionRequest, model: str, prompts: list[str], choices: Choices
    ) -> AsyncIterator[str]:
        response_id, created = self.new_id()

        def chunk(items: list[CompletionChoice], counts=None) -> str:
            return sse(
                CompletionResponse(
                    id=response_id, created=created, model=model, choices=items, usage=counts
                )
            )

        text_chunk = TextChunks(
            lambda index, text: CompletionResponse(
                id=response_id,
                created=created,
                model=model,
                choices=[CompletionChoice(index=index, text=text)],
            )
        )
        echoed: set[int] = set()
        finals: dict[int, Piece] = {}
        try:
            async for index, piece in choices:
                text = piece.text
                if request.echo and index not in echoed:
                    echoed.add(index)
                    text = prompts[index] + text
                if piece.finish_reason:
                    finals[index] = piece
                if piece.finish_reason:
                    item = CompletionChoice(
                        index=index, text=text, finish_reason=piece.finish_reason
                    )
                    yield chunk([item])
                elif text:
                    yield text_chunk(index, text)
            if request.include_usage:
                yield chunk([], usage(finals, request.n))
            yield DONE
        except Exception as exc:  # after status 200: the error goes in the stream
            yield sse_error(exc)
            yield DONE
        finally:
            choices.close()
