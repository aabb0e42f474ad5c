"""What the page does, without Gradio: prompts, history trimming, streaming, stopping.

GPT-2 is not a chat model. Chat mode writes the conversation as a transcript that GPT-2
continues (``gpt2_triton.transcript``, shared with the OpenAI gateway), stops at the next
``User:`` turn (stop words), and
drops the oldest turns when the transcript would not leave room for the reply in the
context window. Token counts come from the server's own tokenizer, through the client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from client import ClientError, GenerationParams, Gpt2Client, TextStream
from gpt2_triton.transcript import STOP_WORDS, chat_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    max_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int = 0  # 0: a fresh seed per reply
    min_tokens: int = 0  # no end-of-text before this many tokens

    def params(self, stop_words: tuple[str, ...] = ()) -> GenerationParams:
        return GenerationParams(
            max_tokens=int(self.max_tokens),
            temperature=float(self.temperature),
            top_k=int(self.top_k),
            top_p=float(self.top_p),
            repetition_penalty=float(self.repetition_penalty),
            seed=int(self.seed or 0),
            stop_words=stop_words,
            min_length=min(int(self.min_tokens), int(self.max_tokens)),
        )


def fit_history(
    history: list[dict], message: str, budget: int, count_tokens: Callable[[list[str]], list[int]]
) -> list[dict]:
    """The longest recent part of ``history`` whose prompt fits in ``budget`` tokens.

    Drops whole turns, oldest first; all candidate prompts are counted in one call.
    """
    candidates = [history[start:] for start in range(len(history) + 1)]
    counts = count_tokens([chat_prompt(h, message) for h in candidates])
    for kept, count in zip(candidates, counts, strict=True):
        if count <= budget:
            return kept
    raise PromptTooLong(counts[-1], budget)


class PromptTooLong(Exception):
    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(
            f"Your message alone is {tokens} tokens; with the reply's {budget} it must fit "
            "the model's context window. Shorten it or lower 'max tokens'."
        )


class ChatService:
    """One per page server. Streams replies and cancels them on the server when asked."""

    def __init__(self, url: str, protocol: str = "grpc") -> None:
        self.url = url
        self.protocol = protocol
        self._active: dict[str, TextStream] = {}
        self._lock = threading.Lock()
        self._info: dict | None = None
        self.last_reply = ""

    def client(self) -> Gpt2Client:
        return Gpt2Client(self.url, self.protocol)

    # -- generation -------------------------------------------------------------------------
    def chat(
        self, message: str, history: list[dict], settings: Settings, session: str
    ) -> Iterator[str]:
        """Yield the reply so far, growing, as it streams."""
        with self.client() as client:
            try:
                window = int(self.info(client)["context_window"])
                budget = window - settings.max_tokens
                if budget < 1:
                    yield (
                        f"'max tokens' ({settings.max_tokens}) leaves no room for the "
                        f"conversation in the context window ({window} tokens)."
                    )
                    return
                kept = fit_history(history, message, budget, client.count_tokens)
                prompt = chat_prompt(kept, message)
                yield from self._stream(client, prompt, settings.params(STOP_WORDS), session)
            except PromptTooLong as exc:
                yield str(exc)
            except ClientError as exc:
                yield self.explain(exc)
            except Exception:  # the page shows words, never a traceback
                log.exception("chat failed")
                yield "Something went wrong on the page's side; the log has the details."

    def complete(self, prompt: str, settings: Settings, session: str) -> Iterator[str]:
        """Completion mode: yield the prompt followed by its continuation so far."""
        with self.client() as client:
            try:
                for text in self._stream(client, prompt, settings.params(), session):
                    yield prompt + text
            except ClientError as exc:
                yield prompt + "\n\n" + self.explain(exc)
            except Exception:
                log.exception("completion failed")
                yield prompt + "\n\nSomething went wrong on the page's side; see the log."

    def stop(self, session: str) -> None:
        """Cancel this session's running request on the server."""
        with self._lock:
            stream = self._active.pop(session, None)
        if stream is not None:
            log.info("cancelling the running request of session %s", session)
            stream.cancel()

    def _stream(
        self, client: Gpt2Client, prompt: str, params: GenerationParams, session: str
    ) -> Iterator[str]:
        self.stop(session)  # one request per page session at a time
        stream = client.stream(prompt, params)
        with self._lock:
            self._active[session] = stream
        text = ""
        try:
            for piece in stream:
                text += piece
                yield text
        finally:
            with self._lock:
                if self._active.get(session) is stream:
                    del self._active[session]
            if stream.result is None:  # left early (Stop, closed page): cancel server-side
                stream.cancel()
        result = stream.result
        if result is not None:
            self.last_reply = (
                f"last reply: {result.num_output_tokens} tokens, "
                f"{result.tokens_per_s:.1f} tokens/s ({result.finish_reason})"
            )

    # -- status -----------------------------------------------------------------------------
    def info(self, client: Gpt2Client) -> dict:
        if self._info is None:
            self._info = client.model_info()
        return self._info

    def status_line(self) -> str:
        with self.client() as client:
            if not client.is_ready():
                self._info = None  # the server may come back with another model
                return (
                    f"**Triton is not reachable** at {self.url}. It may be starting or "
                    "restarting; this page checks again every few seconds."
                )
            try:
                info = self.info(client)
            except ClientError as exc:
                return f"**Triton is up but the model is not answering**: {exc}"
        parts = [
            f"Connected: model **{info['model']}**",
            f"engine **{info['engine']}**",
            f"context {info['context_window']} tokens",
        ]
        if self.last_reply:
            parts.append(self.last_reply)
        return " · ".join(parts)

    def explain(self, exc: ClientError) -> str:
        if exc.status == "UNAVAILABLE":
            self._info = None
            return (
                f"Triton is not reachable at {self.url}. It may be starting or "
                "restarting: send your message again in a moment."
            )
        if exc.status in {"INVALID_ARG", "INVALID_ARGUMENT"} or "must be" in str(exc):
            return f"The server refused the request: {exc}"
        log.warning("generation failed: %s", exc)
        return f"Generation failed: {exc}"
