"""The chat transcript GPT-2 continues: one template for the chat page and the OpenAI gateway.

GPT-2 is not a chat model. A conversation is written as a transcript (a preamble, then
``User:`` / ``Assistant:`` lines) ending with ``Assistant:``; GPT-2 continues it and the
stop words end the reply where it would start writing the next turn. Documented in
docs/UI.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gpt2_triton.detokenizer import longest_stop_prefix

CHAT_PREAMBLE = "A conversation between a curious User and a helpful Assistant."
CHAT_TEMPLATE = "{preamble}\n\n{turns}User: {message}\nAssistant:"
TURN_TEMPLATE = "{role}: {content}\n"
STOP_WORDS = ("\nUser:", "\nAssistant:", "User:")
# the stop words that begin a new line of the transcript: the start of a next turn
TURN_STARTS = tuple(word for word in STOP_WORDS if word.startswith("\n"))


def chat_prompt(history: Iterable[Mapping], message: str, preamble: str = CHAT_PREAMBLE) -> str:
    """The transcript for ``history`` (dicts with ``role`` and ``content``; "user" is the
    User, any other role the Assistant) followed by the user's new ``message``.

    It is the frame ``chat_prompt([], message)`` with ``render_turn(turn)`` of each turn
    spliced in after the preamble, every piece ending in a newline before a letter, where
    GPT-2's tokenizer always splits: its token count is the frame's plus the turns'. The
    chat page relies on that to count each turn once when it trims a conversation."""
    turns = "".join(render_turn(turn) for turn in history)
    return CHAT_TEMPLATE.format(
        preamble=preamble.strip(), turns=turns, message=content_text(message).strip()
    )


def without_a_begun_turn(reply: str) -> str:
    """``reply`` without the start of a next turn it ends with ("...\nUs"): a reply that
    its token limit cut just as the model began a new ``User:`` or ``Assistant:`` line
    (the server holds back a possible stop word until it is sure, and lets that text out
    at the end). Only the newline-led stop words: a reply may well end in "Use"."""
    begun = longest_stop_prefix(reply, TURN_STARTS)
    return reply[: len(reply) - begun]


def render_turn(turn: Mapping) -> str:
    """One ``User: ...`` or ``Assistant: ...`` line of the transcript, newline included."""
    return TURN_TEMPLATE.format(
        role="User" if turn["role"] == "user" else "Assistant",
        content=content_text(turn["content"]).strip(),
    )


def content_text(content) -> str:
    """A message's text: a string, or a list of parts (``{"type": "text", "text": ...}`` in
    OpenAI's messages and newer Gradio versions)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)
