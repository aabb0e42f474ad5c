"""What the page does, without Gradio: prompts, history trimming, streaming, stopping.

GPT-2 is not a chat model. Chat mode writes the conversation as a transcript that GPT-2
continues (``gpt2_triton.transcript``, shared with the OpenAI gateway), stops at the next
``User:`` turn (stop words), and drops the oldest exchanges when the transcript would not
leave room for the reply in the context window. Token counts come from the server's own
tokenizer, through the client. What the page says itself (errors, refusals) is shown in
the conversation as a notice and never sent to the model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from client import ClientError, GenerationParams, Gpt2Client, TextStream
from gpt2_triton.transcript import STOP_WORDS, chat_prompt, render_turn, without_a_begun_turn

log = logging.getLogger(__name__)

# Pages whose status timers tick within this long of each other share one probe.
STATUS_REUSE_S = 1.0
# Sessions whose last reply the status line remembers (oldest forgotten first).
REMEMBERED_SESSIONS = 1024
# The most characters of history one token-count call sends (the front door refuses a
# request over 1 MiB): a 1024-token window holds a few thousand characters of it.
COUNT_CALL_CHARS = 64 * 1024


@dataclass(frozen=True)
class PageLimits:
    """How many replies the page streams at once and how long it waits for the server:
    the one source for the queue (ui/app.py), the client calls and the flags."""

    # Replies streaming at once, all users together (chat and completion). The server
    # batches up to MAX_SEQUENCES (16 by default) and queues the rest itself, so the page
    # need not hold users back below that.
    concurrency: int = 16
    # Readiness, model configuration, token counts: milliseconds from a healthy server.
    request_timeout_s: float = 5.0
    # The longest silence before the first or the next piece of a reply; a full server
    # may queue a request for a while before it joins the batch.
    stream_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        for name in ("request_timeout_s", "stream_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:  # an infinite one breaks every call
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")


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


NOTICE_TITLE = "Notice from the page (not sent to the model)"


def reply(text: str) -> dict:
    """The model's reply, as the page's history holds it."""
    return {"role": "assistant", "content": text}


def notice(text: str) -> dict:
    """Words of the page itself (an error, a refusal): shown in the conversation under
    ``NOTICE_TITLE``, which is also how ``conversation`` knows to leave them out."""
    return {"role": "assistant", "content": text, "metadata": {"title": NOTICE_TITLE}}


def is_notice(message: Mapping) -> bool:
    return (message.get("metadata") or {}).get("title") == NOTICE_TITLE


def conversation(history: list[dict]) -> list[dict]:
    """The turns the model is shown: the page's history without its notices, and without
    a user message that got only a notice (the model never answered it)."""
    turns = [m for m in history if not is_notice(m)]
    return [
        turn
        for i, turn in enumerate(turns)
        if turn["role"] != "user" or (i + 1 < len(turns) and turns[i + 1]["role"] != "user")
    ]


def fit_history(
    history: list[dict], message: str, budget: int, count_tokens: Callable[[list[str]], list[int]]
) -> list[dict]:
    """The longest recent part of ``history`` whose prompt fits in ``budget`` tokens.

    Drops whole exchanges (a user turn and the replies after it), oldest first, so the
    transcript never opens with a reply to a question that was dropped. Each turn is
    counted at most once: the prompt is the frame plus its turns (``chat_prompt``), so
    the kept part is found in linear time. Turns are counted newest first, in calls of at
    most COUNT_CALL_CHARS characters, until the budget is spent: the oldest turns of a
    long conversation cannot fit, and sending them all in one call would one day pass
    the front door's limit on a request (1 MiB) and fail every message after it. One more
    count of the chosen prompt guards against a tokenizer that merges across turns.
    """
    exchanges: list[list[dict]] = []
    for turn in history:
        if turn["role"] == "user" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(turn)
    if exchanges and exchanges[0][0]["role"] != "user":
        exchanges.pop(0)  # replies with no question before them: an orphan, never sent

    rendered = [[render_turn(turn) for turn in exchange] for exchange in exchanges]
    frame_text = chat_prompt([], message)
    calls: list[list[int]] = [[]]  # exchange indices, newest first, a call's worth each
    size = len(frame_text)  # the first call carries the frame too
    for i in reversed(range(len(exchanges))):
        chars = sum(map(len, rendered[i]))
        if calls[-1] and size + chars > COUNT_CALL_CHARS:
            calls.append([])
            size = 0
        calls[-1].append(i)
        size += chars
    exchange_counts = [0] * len(exchanges)  # 0: never counted (older than what fits)
    frame = total = -1
    for call in calls:
        texts = [text for i in call for text in rendered[i]]
        counts = iter(count_tokens(([frame_text] if frame < 0 else []) + texts))
        if frame < 0:
            frame = total = next(counts)
            if frame > budget:
                raise PromptTooLong(frame, budget)
        for i in call:
            exchange_counts[i] = sum(next(counts) for _ in rendered[i])
            total += exchange_counts[i]
        if total > budget:  # the older exchanges cannot be kept: not counted
            break

    start, total = len(exchanges), frame
    while start > 0 and total + exchange_counts[start - 1] <= budget:
        start -= 1
        total += exchange_counts[start]
    while start < len(exchanges):
        kept = [turn for exchange in exchanges[start:] for turn in exchange]
        if count_tokens([chat_prompt(kept, message)])[0] <= budget:
            return kept
        start += 1
    return []


class PromptTooLong(Exception):
    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(
            f"Your message alone makes a {tokens}-token prompt; beside the reply's 'max "
            f"tokens' the context window leaves room for {budget}. Shorten it or lower "
            "'max tokens'."
        )


class ReplyInterrupted(Exception):
    """A reply that ended with no final result, and not by its own tab's Stop."""

    def __init__(self) -> None:
        super().__init__(
            "Reply interrupted: another request of this page took its place before it "
            "ended, so the text above is cut short."
        )


# The page's tabs: each streams one reply per session, and its Stop stops only that one.
CHAT_TAB = "chat"
COMPLETION_TAB = "completion"


@dataclass
class _Reply:
    """A reply streaming for one tab of one session."""

    stream: TextStream
    stopped: bool = False  # by its own tab's Stop: an end the user asked for


class ChatService:
    """One per page server, shared by every user: streams replies and cancels them on the
    server when asked; a user is known by the page session."""

    def __init__(self, url: str, protocol: str = "grpc", limits: PageLimits = PageLimits()):
        self.url = url
        self.protocol = protocol
        self.limits = limits
        self._active: dict[tuple[str, str], _Reply] = {}  # by (session, tab)
        self._lock = threading.Lock()
        self._info: dict | None = None
        self._last_replies: OrderedDict[str, str] = OrderedDict()
        self._probe_lock = threading.Lock()
        self._status = ("connecting…", False)  # (the words, whether the server is up)
        self._status_at = float("-inf")

    def client(self) -> Gpt2Client:
        return Gpt2Client(
            self.url,
            self.protocol,
            timeout_s=self.limits.stream_timeout_s,
            request_timeout_s=self.limits.request_timeout_s,
        )

    # -- generation -------------------------------------------------------------------------
    def chat(
        self, message: str, history: list[dict], settings: Settings, session: str
    ) -> Iterator[list[dict]]:
        """Yield the messages that answer ``message`` so far: the reply, growing as it
        streams; or a notice (with the reply so far before it, if any) when it fails.

        ``history`` is the page's conversation before ``message``, notices included."""
        text = ""
        with self.client() as client:
            try:
                window = int(self.info(client)["context_window"])
                budget = window - settings.max_tokens
                if budget < 1:
                    yield [
                        notice(
                            f"'max tokens' ({settings.max_tokens}) leaves no room for the "
                            f"conversation in the context window ({window} tokens)."
                        )
                    ]
                    return
                turns = fit_history(conversation(history), message, budget, client.count_tokens)
                prompt = chat_prompt(turns, message)
                params = settings.params(STOP_WORDS)
                for text in self._stream(client, prompt, params, session, CHAT_TAB):
                    yield [reply(text)]
                trimmed = without_a_begun_turn(text)
                if not text or trimmed != text:
                    # the model ended at once (the user still sees an answer), or its token
                    # limit cut it as it began the next turn (held back till the end)
                    yield [reply(trimmed)]
                return
            except (PromptTooLong, ReplyInterrupted) as exc:
                problem = str(exc)
            except ClientError as exc:
                problem = self.explain(exc)
            except Exception:  # the page shows words, never a traceback
                log.exception("chat failed")
                problem = "Something went wrong on the page's side; the log has the details."
        yield ([reply(text)] if text else []) + [notice(problem)]

    def complete(self, prompt: str, settings: Settings, session: str) -> Iterator[str]:
        """Completion mode: yield the prompt followed by its continuation so far."""
        text = ""  # what streamed before a failure stays, the reason after it (as in chat)
        with self.client() as client:
            try:
                for text in self._stream(
                    client, prompt, settings.params(), session, COMPLETION_TAB
                ):
                    yield prompt + text
            except ReplyInterrupted as exc:
                yield prompt + text + "\n\n" + str(exc)
            except ClientError as exc:
                yield prompt + text + "\n\n" + self.explain(exc)
            except Exception:
                log.exception("completion failed")
                yield prompt + text + "\n\nSomething went wrong on the page's side; see the log."

    def stop(self, session: str, tab: str) -> None:
        """Cancel this session's running request in ``tab`` on the server (its Stop)."""
        with self._lock:
            running = self._active.pop((session, tab), None)
            if running is not None:
                running.stopped = True
        if running is not None:
            log.info("cancelling the running %s request of session %s", tab, session)
            running.stream.cancel()

    def _stream(
        self, client: Gpt2Client, prompt: str, params: GenerationParams, session: str, tab: str
    ) -> Iterator[str]:
        """The reply's text so far, growing; raises ReplyInterrupted if it ends with no
        final result while nobody pressed its Stop."""
        key = (session, tab)
        running = _Reply(client.stream(prompt, params))
        with self._lock:  # one request per tab of a page session at a time
            previous = self._active.get(key)
            self._active[key] = running
        if previous is not None:  # not stopped by its user: that reply will say so
            previous.stream.cancel()
        text = ""
        try:
            for piece in running.stream:
                text += piece
                yield text
        finally:
            with self._lock:
                if self._active.get(key) is running:
                    del self._active[key]
            if running.stream.result is None:  # left early (Stop, closed page): cancel
                running.stream.cancel()
        result = running.stream.result
        if result is None:
            if running.stopped:
                return
            raise ReplyInterrupted()
        self._remember_reply(
            session,
            f"last reply: {result.num_output_tokens} tokens, "
            f"{result.tokens_per_s:.1f} tokens/s ({result.finish_reason})",
        )

    def _remember_reply(self, session: str, summary: str) -> None:
        with self._lock:
            self._last_replies[session] = summary
            self._last_replies.move_to_end(session)
            while len(self._last_replies) > REMEMBERED_SESSIONS:
                self._last_replies.popitem(last=False)

    # -- status -----------------------------------------------------------------------------
    def info(self, client: Gpt2Client) -> dict:
        if self._info is None:
            self._info = client.model_info()
        return self._info

    def status_line(self, session: str = "") -> str:
        """The server's state, and this session's last reply while the server is up."""
        server, up = self._server_status()
        with self._lock:
            last_reply = self._last_replies.get(session)
        return f"{server} · {last_reply}" if up and last_reply else server

    def _server_status(self) -> tuple[str, bool]:
        # Every open page asks every few seconds. One probe at a time serves them all:
        # against a silent server each probe waits out its timeout, and pages waiting in
        # line for one would hold the page's worker threads that replies need.
        if not self._probe_lock.acquire(blocking=False):
            return self._status
        try:
            if time.monotonic() - self._status_at >= STATUS_REUSE_S:
                self._status = self._probe()
                self._status_at = time.monotonic()
            return self._status
        finally:
            self._probe_lock.release()

    def _probe(self) -> tuple[str, bool]:
        with self.client() as client:
            try:
                client.check_ready()
            except ClientError as exc:
                self._info = None  # the server may come back with another model
                if exc.status == "DEADLINE_EXCEEDED":
                    return (
                        f"**Triton is not answering**: {exc}. This page checks again soon.",
                        False,
                    )
                if exc.status != "UNAVAILABLE":  # an answer: a key refused
                    return f"**Triton refused the page's check** ({exc.status}): {exc}", False
                return (
                    f"**Triton is not reachable** at {self.url}. It may be starting or "
                    "restarting; this page checks again every few seconds."
                ), False
            try:
                info = self.info(client)
            except ClientError as exc:
                return f"**Triton is up but the model is not answering**: {exc}", False
        words = (
            f"Connected: model **{info['model']}** · engine **{info['engine']}** · "
            f"context {info['context_window']} tokens"
        )
        return words, True

    def explain(self, exc: ClientError) -> str:
        if exc.status == "UNAVAILABLE":
            self._info = None
            return (
                f"Triton is not reachable at {self.url}. It may be starting or "
                "restarting: send your message again in a moment."
            )
        if exc.status == "DEADLINE_EXCEEDED":
            self._info = None
            return f"{exc}. It may be overloaded or stuck: send your message again later."
        if exc.status in {"INVALID_ARG", "INVALID_ARGUMENT"} or "must be" in str(exc):
            return f"The server refused the request: {exc}"
        log.warning("generation failed: %s", exc)
        return f"Generation failed: {exc}"
