"""The chat page's logic: unit tests, then against the real server through the client."""

import itertools
import time
import urllib.request

import pytest

from ui.chat import ChatService, PromptTooLong, Settings, chat_prompt, fit_history


def word_count(prompts):  # a stand-in tokenizer for the trimming arithmetic only
    return [len(p.split()) for p in prompts]


HISTORY = [
    {"role": "user", "content": "Where does the cat go?"},
    {"role": "assistant", "content": "The cat walks to the river."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog runs past the market."},
]


def test_chat_prompt_is_the_documented_transcript():
    assert chat_prompt(HISTORY[:2], "Hi") == (
        "A conversation between a curious User and a helpful Assistant.\n\n"
        "User: Where does the cat go?\nAssistant: The cat walks to the river.\n"
        "User: Hi\nAssistant:"
    )


def test_history_is_trimmed_oldest_first_to_fit():
    full = word_count([chat_prompt(HISTORY, "Hi")])[0]
    assert fit_history(HISTORY, "Hi", full, word_count) == HISTORY
    assert fit_history(HISTORY, "Hi", full - 1, word_count) == HISTORY[1:]
    assert fit_history(HISTORY, "Hi", 14, word_count) == []
    with pytest.raises(PromptTooLong):
        fit_history(HISTORY, "Hi", 3, word_count)


@pytest.fixture()
def service(triton):
    return ChatService(triton.grpc_url)


def test_chat_streams_a_reply_that_stops_at_the_next_user_turn(service):
    replies = list(service.chat("Where does the cat go?", [], Settings(max_tokens=80), "s1"))
    assert len(replies) > 1 and all(b.startswith(a) for a, b in itertools.pairwise(replies))
    assert replies[-1].strip() and "User:" not in replies[-1]
    assert "tokens/s" in service.status_line() and "tiny" in service.status_line()


def test_long_history_is_trimmed_by_the_servers_tokenizer(service, triton):
    long_history = HISTORY * 120  # far more than the tiny model's 1024-token window
    reply = list(service.chat("Hi", long_history, Settings(max_tokens=32), "s2"))[-1]
    assert reply and "context window" not in reply


def test_stop_cancels_the_request_on_the_server(service, triton):
    def cancelled():
        text = urllib.request.urlopen(triton.metrics_url).read().decode()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith('gpt2_requests_total{finish_reason="cancelled"}')
        ]
        return float(lines[0].split()[1]) if lines else 0.0

    before = cancelled()
    settings = Settings(max_tokens=1000, temperature=0, min_tokens=1000)  # surely running
    replies = service.complete("The cat", settings, "s3")
    next(replies)
    next(replies)
    service.stop("s3")
    rest = list(replies)
    assert len(rest) < 5  # the stream ended at once
    time.sleep(1.2)
    assert cancelled() == before + 1


def test_server_down_is_said_in_plain_words(unused_port):
    service = ChatService(f"127.0.0.1:{unused_port}")
    reply = list(service.chat("Hello", [], Settings(), "s4"))[-1]
    assert "not reachable" in reply and "Traceback" not in reply
    assert "not reachable" in service.status_line()
    completion = list(service.complete("Hello", Settings(), "s5"))[-1]
    assert completion.startswith("Hello") and "not reachable" in completion
