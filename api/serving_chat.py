"""``POST /v1/chat/completions``: the conversation as the chat page's transcript.

GPT-2 is not a chat model: the messages are rendered with the project's one transcript
template (``gpt2_triton.transcript``, the chat page's too), GPT-2 continues it after
``Assistant:`` and the transcript's stop words end the reply at the next turn. System
(and developer) messages replace the transcript's preamble; the last message must be the
user's. The reply loses its leading whitespace (the space after ``Assistant:``).
A conversation too long for the context window is refused by the model; its message is
turned into OpenAI's ``context_length_exceeded`` error with the numbers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.errors import TRITON_PARAMS, ApiError
from api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    DeltaMessage,
)
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
from gpt2_triton import names
from gpt2_triton.request import MAX_STOP_WORDS
from gpt2_triton.transcript import CHAT_PREAMBLE, STOP_WORDS, chat_prompt, without_a_begun_turn


def transcript(request: ChatCompletionRequest) -> str:
    """The prompt GPT-2 continues for these messages."""
    system = [m.text.strip() for m in request.messages if m.role in ("system", "developer")]
    turns = [m for m in request.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise ApiError(
            400,
            "the last message must be the user's: GPT-2 continues the transcript with the "
            "assistant's reply",
            "messages",
        )
    history = [{"role": m.role, "content": m.text} for m in turns[:-1]]
    preamble = "\n".join(text for text in system if text) or CHAT_PREAMBLE
    return chat_prompt(history, turns[-1].text, preamble)


def stop_words(request: ChatCompletionRequest) -> tuple[str, ...]:
    words = tuple(dict.fromkeys((*STOP_WORDS, *request.stop_words)))
    if len(words) > MAX_STOP_WORDS:
        raise ApiError(
            400,
            f"stop: at most {MAX_STOP_WORDS - len(STOP_WORDS)} stop sequences in chat (the "
            f"transcript uses {len(STOP_WORDS)} of the model's {MAX_STOP_WORDS})",
            "stop",
        )
    return words


class _Reply:
    """Drops a reply's leading whitespace, across pieces when streaming, and from its last
    piece the start of a next turn (``without_a_begun_turn``: what the server held back as
    a possible stop word comes out whole in that piece)."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str, last: bool = False) -> str:
        if last:
            text = without_a_begun_turn(text)
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


class OpenAIServingChat(OpenAIServing):
    id_prefix = "chatcmpl"

    async def create(
        self, request: ChatCompletionRequest, authorization: str | None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        model = await self.models.check(request.model, authorization)
        self.check_sampling(request, request.max_new_tokens, request.max_tokens_param)
        prompt, words = transcript(request), stop_words(request)
        generations = [
            generation(request, prompt, index, request.max_new_tokens, words)
            for index in range(request.n)
        ]
        params = TRITON_PARAMS | {
            names.TEXT_INPUT: "messages",
            names.MAX_TOKENS: request.max_tokens_param,
        }
        choices = await self.start(generations, authorization, params)
        if request.stream:
            return self._stream(request, model, choices, params)
        replies = [_Reply() for _ in range(request.n)]
        texts = dict.fromkeys(range(request.n), "")
        finals: dict[int, Piece] = {}
        try:
            async for index, piece in choices:
                texts[index] += replies[index](piece.text, last=bool(piece.finish_reason))
                if piece.finish_reason:
                    finals[index] = piece
        finally:
            choices.close()
        response_id, created = self.new_id()
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=texts[i]),
                    finish_reason=finals[i].finish_reason,
                )
                for i in range(request.n)
            ],
            usage=usage(finals, request.n),
        )

    async def _stream(
        self, request: ChatCompletionRequest, model: str, choices: Choices, params
    ) -> AsyncIterator[str]:
        response_id, created = self.new_id()

        def chunk(items: list[ChatStreamChoice], counts=None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=response_id, created=created, model=model, choices=items, usage=counts
                )
            )

        text_chunk = TextChunks(
            lambda index, text: ChatCompletionChunk(
                id=response_id,
                created=created,
                model=model,
                choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=text))],
            )
        )
        replies = [_Reply() for _ in range(request.n)]
        finals: dict[int, Piece] = {}
        try:
            for index in range(request.n):  # OpenAI's first delta names the role
                role = DeltaMessage(role="assistant", content="")
                yield chunk([ChatStreamChoice(index=index, delta=role)])
            async for index, piece in choices:
                text = replies[index](piece.text, last=bool(piece.finish_reason))
                if text:
                    yield text_chunk(index, text)
                if piece.finish_reason:
                    finals[index] = piece
                    end = ChatStreamChoice(
                        index=index, delta=DeltaMessage(), finish_reason=piece.finish_reason
                    )
                    yield chunk([end])
            if request.include_usage:
                yield chunk([], usage(finals, request.n))
            yield DONE
        except Exception as exc:  # after status 200: the error goes in the stream
            yield sse_error(exc, params)
            yield DONE
        finally:
            choices.close()
