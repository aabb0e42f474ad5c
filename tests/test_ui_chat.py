"""The chat page's logic: unit tests, then against the real server through the client."""

import itertools
import threading
import time

import gradio as gr
import pytest
from conftest import gpt2_metrics, wait_until, wait_until_idle

from gpt2_triton.transcript import render_turn, without_a_begun_turn
from ui.chat import (
    ChatService,
    PageLimits,
    PromptTooLong,
    ReplyInterrupted,
    Settings,
    chat_prompt,
    conversation,
    fit_history,
    is_notice,
    notice,
    reply,
)

HISTORY = [
    {"role": "user", "content": "Where does the cat go?"},
    {"role": "assistant", "content": "The cat walks to the river."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog runs past the market."},
]


class CountingTokenizer:
    """The tiny model's real tokenizer, counting the characters it is given: the cost of
    trimming, which must grow with the transcript, not with its square."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.characters = 0
        self.largest_call = 0  # characters

    def __call__(self, texts: list[str]) -> list[int]:
        self.characters += sum(len(t) for t in texts)
        self.largest_call = max(self.largest_call, sum(len(t) for t in texts))
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]


@pytest.fixture()
def count_tokens(tiny_tokenizer) -> CountingTokenizer:
    return CountingTokenizer(tiny_tokenizer)


def test_chat_prompt_is_the_documented_transcript():
    assert chat_prompt(HISTORY[:2], "Hi") == (
        "A conversation between a curious User and a helpful Assistant.\n\n"
        "User: Where does the cat go?\nAssistant: The cat walks to the river.\n"
        "User: Hi\nAssistant:"
    )


@pytest.mark.parametrize("call_chars", [None, 1], ids=["one-call", "a-call-an-exchange"])
def test_history_is_trimmed_by_whole_exchanges_oldest_first_to_fit(
    count_tokens, monkeypatch, call_chars
):
    """For every budget, the kept turns are the longest run of recent exchanges whose
    whole prompt (counted by the real tokenizer) fits; a reply never opens it alone.
    The same whether the turns are counted in one call or an exchange a call."""
    if call_chars is not None:
        monkeypatch.setattr("ui.chat.COUNT_CALL_CHARS", call_chars)
    history = [
        {"role": "assistant", "content": "Welcome! Ask me anything."},  # no question before it
        *HISTORY,
        {"role": "user", "content": "  Is it naïve to ask — twice?  "},
        {"role": "assistant", "content": "No.\n\nIt is fine: 日本, 😀, 42..."},
        {"role": "user", "content": "One more"},
        {"role": "assistant", "content": "A short one."},
        {"role": "assistant", "content": "And a second reply to it."},
    ]
    exchanges = [1, 3, 5, 7]  # where each exchange (a user turn, then its replies) starts
    frame = count_tokens([chat_prompt([], "Hi")])[0]
    full = count_tokens([chat_prompt(history[1:], "Hi")])[0]
    for budget in range(frame, full + 2):
        kept = fit_history(history, "Hi", budget, count_tokens)
        fitting = [
            start
            for start in exchanges
            if count_tokens([chat_prompt(history[start:], "Hi")])[0] <= budget
        ]
        assert kept == (history[fitting[0] :] if fitting else []), budget
        assert not kept or kept[0]["role"] == "user"
    with pytest.raises(PromptTooLong):
        fit_history(history, "Hi", frame - 1, count_tokens)


def test_trimming_counts_each_turn_once(count_tokens):
    long_history = HISTORY * 120  # ~6,000 tokens: far more than the 1024-token window
    prompt = chat_prompt(long_history, "Hi")
    kept = fit_history(long_history, "Hi", 1024 - 64, count_tokens)
    assert 0 < len(kept) < len(long_history) and kept[0]["role"] == "user"
    # The frame and each turn once, then the kept prompt once: at most about twice the
    # whole prompt. Counting every candidate transcript, as before, was ~120 times it.
    assert count_tokens.characters <= 2 * len(prompt) + len(chat_prompt([], "Hi"))


def test_a_long_conversation_is_counted_newest_first_in_calls_of_bounded_size(count_tokens):
    """A conversation of megabytes (a day of pasted text): counting it whole in one call
    passed the front door's 1 MiB limit and failed every message after it. Only what
    can fit is counted, newest first, a bounded call at a time."""
    from ui.chat import COUNT_CALL_CHARS

    pasted = "The cat walks to the river and back again. " * 500  # ~22 KB a message
    long_history = [{"role": "user", "content": pasted}, reply("Yes.")] * 60  # ~1.3 MB
    long_history += HISTORY
    assert sum(len(m["content"]) for m in long_history) > 1024 * 1024
    kept = fit_history(long_history, "Hi", 1024 - 64, count_tokens)
    assert kept == HISTORY  # the pasted exchanges do not fit beside the reply
    assert count_tokens.largest_call <= COUNT_CALL_CHARS
    assert count_tokens.characters < 4 * COUNT_CALL_CHARS  # not the whole conversation
    # and a conversation that fits whole is still kept whole, at any call size
    assert fit_history(HISTORY * 3, "Hi", 1024 - 64, count_tokens) == HISTORY * 3


def test_a_prompt_counts_as_its_frame_plus_its_turns(count_tokens):
    """What lets trimming count each turn once: the real tokenizer counts a transcript
    as its frame plus its turns, whatever the turns hold."""
    odd = "naïve\n\n 日本 😀 \t's!!  User: Assistant:"
    history = [*HISTORY, {"role": "user", "content": odd}, reply(""), reply(odd)]
    parts = count_tokens([chat_prompt([], odd), *map(render_turn, history)])
    assert count_tokens([chat_prompt(history, odd)])[0] == sum(parts)


def test_notices_are_shown_but_never_sent_to_the_model():
    history = [
        {"role": "user", "content": "Where does the cat go?"},
        notice("Triton is not reachable at 127.0.0.1:8001."),  # the question went unanswered
        {"role": "user", "content": "Where does the cat go?"},
        reply("The cat walks to the river."),
        {"role": "user", "content": "And the dog?"},
        reply("The dog runs"),  # the stream broke here: the text so far stays
        notice("Generation failed: the connection to Triton broke"),
        notice("'max tokens' (2000) leaves no room for the conversation"),
    ]
    assert conversation(history) == [history[2], history[3], history[4], history[5]]
    prompt = chat_prompt(conversation(history), "Hi")
    assert "Triton" not in prompt and "max tokens" not in prompt
    assert prompt.count("User: Where does the cat go?") == 1


def test_a_notice_stays_a_notice_through_the_page():
    """The mark survives the Chatbot's round trip through the browser (Gradio's own
    postprocess and preprocess), so the next turn still leaves the notice out."""
    chatbot = gr.Chatbot()
    history = [{"role": "user", "content": "Hi"}, notice("Triton is not reachable.")]
    back = chatbot.preprocess(chatbot.postprocess(history))
    assert [is_notice(m) for m in back] == [False, True]
    assert conversation(back) == []


@pytest.fixture()
def service(triton):
    return ChatService(triton.grpc_url)


def test_chat_streams_a_reply_that_stops_at_the_next_user_turn(service):
    # greedy: a sampled first draw can end the reply at once (end-of-text or a stop word)
    settings = Settings(max_tokens=80, temperature=0)
    answers = list(service.chat("Where does the cat go?", [], settings, "s1"))
    assert all(len(answer) == 1 and not is_notice(answer[0]) for answer in answers)
    # each update extends the last; how many there are depends on how far sending lagged
    # (pieces that wait join: a short reply can come whole), so their number is not checked
    replies = [answer[0]["content"] for answer in answers]
    assert replies and all(b.startswith(a) for a, b in itertools.pairwise(replies))
    assert replies[-1].strip() and "User:" not in replies[-1]
    assert "tokens/s" in service.status_line("s1") and "tiny" in service.status_line("s1")
    assert "tokens/s" not in service.status_line("another user's session")


def test_a_reply_cut_as_it_begins_the_next_turn_ends_before_it(service, triton):
    """A reply whose token limit fell inside the next turn's "\nUser:" ended with
    "\nUser": the server held it back as a possible stop word and let it out at the end."""
    from conftest import cut_as_the_next_turn_begins

    message = "Where does the cat go?"
    limit, raw = cut_as_the_next_turn_begins(triton.grpc_url, message)
    # the page's sampling off: the helper's greedy reply (no penalty, no top-k)
    plain = dict(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    answers = list(service.chat(message, [], Settings(max_tokens=limit, **plain), "s-cut"))
    content = answers[-1][0]["content"]
    assert content == without_a_begun_turn(raw) != raw, (content, raw)


def test_long_history_is_trimmed_by_the_servers_tokenizer(service, triton):
    long_history = HISTORY * 120  # far more than the tiny model's 1024-token window
    answer = list(service.chat("Hi", long_history, Settings(max_tokens=32), "s2"))[-1]
    assert len(answer) == 1 and not is_notice(answer[0])


def test_stop_cancels_the_request_on_the_server(service, triton):
    """Stop ends the page's stream at once and cancels the request on the server. The tiny
    model runs 1000 tokens in a few seconds, so on a busy machine the server can finish
    before this test's Stop reaches it: such an attempt shows nothing and another runs.
    Only a cancel counted, of a request that never ran to its end, passes."""
    cancelled, ran_out = (
        f'gpt2_requests_total{{finish_reason="{reason}"}}' for reason in ("cancelled", "length")
    )
    settings = Settings(max_tokens=1000, temperature=0, min_tokens=1000)
    attempts = []
    for attempt in range(4):
        baseline = wait_until_idle(triton.metrics_url)  # no other request is counted after it
        replies = service.complete(f"The cat, take {attempt}", settings, "s3")
        next(replies)
        next(replies)
        service.stop("s3", "completion")
        rest = list(replies)
        assert len(rest) < 5  # the page's stream ended at once, whatever the server did
        # The cancel goes to Triton; the loop sees it at its next check and publishes twice
        # a second: wait for the request to be counted, the deadline only a hang guard.
        after: dict[str, float] = {}

        def ended(after=after, baseline=baseline) -> bool:
            after.update(gpt2_metrics(triton.metrics_url))
            done = sum(after.get(s, 0) - baseline.get(s, 0) for s in (cancelled, ran_out))
            return done >= 1 and after.get("gpt2_active_sequences") == 0

        assert wait_until(ended, timeout=600), f"the request never ended: {after}"
        generated = after["gpt2_output_tokens_total"] - baseline.get("gpt2_output_tokens_total", 0)
        counts = [after.get(s, 0) - baseline.get(s, 0) for s in (cancelled, ran_out)]
        attempts.append((*counts, generated))
        if counts == [1, 0]:  # this request, cancelled before its end
            assert generated < 1000, f"{generated:.0f} tokens: the stream ran to its end"
            return
        assert counts == [0, 1], f"one request, counted once: {attempts}"
    pytest.fail(f"every request ran to its end before Stop reached the server: {attempts}")


def test_server_down_is_said_in_plain_words(unused_port):
    service = ChatService(f"127.0.0.1:{unused_port}")
    (answer,) = list(service.chat("Hello", [], Settings(), "s4"))
    assert len(answer) == 1 and is_notice(answer[0])
    assert "not reachable" in answer[0]["content"] and "Traceback" not in answer[0]["content"]
    assert "not reachable" in service.status_line()
    completion = list(service.complete("Hello", Settings(), "s5"))[-1]
    assert completion.startswith("Hello") and "not reachable" in completion


def test_a_server_that_never_answers_gets_a_timeout_notice_quickly(silent_server):
    """A server that takes the connection and then says nothing (stuck, or hostile):
    every path of the page gives up after its own short timeout and says so."""
    limits = PageLimits(request_timeout_s=1, stream_timeout_s=1)
    service = ChatService(silent_server, limits=limits)
    started = time.monotonic()
    (answer,) = list(service.chat("Hello", [], Settings(), "s6"))
    assert len(answer) == 1 and is_notice(answer[0])
    assert f"Triton at {silent_server} did not answer within 1 s" in answer[0]["content"]
    assert "not answering" in service.status_line("s6")
    assert "did not answer within 1 s" in list(service.complete("Hello", Settings(), "s7"))[-1]
    # Three calls, each given up after 1 s; without timeouts each took 20 s or more.
    assert time.monotonic() - started < 15


def test_a_completion_cut_by_a_silent_server_keeps_what_streamed_before_the_notice():
    """As a chat reply does: the words that arrived stay on the page, the reason after."""
    from test_client_http import TWO_EVENTS, Script, sse_server

    with sse_server(Script(TWO_EVENTS, then_silent=True)) as url:
        limits = PageLimits(stream_timeout_s=1)
        service = ChatService(url, protocol="http", limits=limits)
        *_, last = service.complete("The cat", Settings(), "s")
    assert last.startswith("The cat walks to\n\n") and "did not answer within 1 s" in last


def test_a_silent_server_ties_up_one_status_probe_not_one_per_page(silent_server):
    """Every open page asks for the status every few seconds. While one probe waits on a
    silent server, the other pages get the last known status at once instead of waiting
    in line, each holding one of the page's worker threads that replies need."""
    service = ChatService(silent_server, limits=PageLimits(request_timeout_s=30))
    first_page = threading.Thread(target=service.status_line, daemon=True)
    first_page.start()
    while not service._probe_lock.locked():  # the first page's probe is under way
        time.sleep(0.01)
    assert service.status_line("another page") == "connecting…"
    assert first_page.is_alive()  # its probe still waits: the other page did not


# A completion that runs about a second on the tiny model (seconds on a busy machine): no
# stop words on that tab, and min_tokens holds end-of-text back. (A chat reply cannot be
# held as long: a stop word may end it after a few tokens, and then within its first piece.)
LONG = Settings(max_tokens=1000, temperature=0, min_tokens=1000)


def finish_reasons(triton, baseline: dict[str, float]) -> dict[str, int]:
    after = wait_until_idle(triton.metrics_url)
    reasons = ("stop", "length", "cancelled")
    series = {r: f'gpt2_requests_total{{finish_reason="{r}"}}' for r in reasons}
    return {r: int(after.get(s, 0) - baseline.get(s, 0)) for r, s in series.items()}


def test_one_tab_leaves_the_other_tabs_reply_alone(service, triton):
    """A chat sent, and the Chat tab's Stop pressed, while a completion streams in the same
    page must not cut the completion: each tab has its own request and its own Stop. A
    completion that ended before the chat did (a slow machine) tests nothing: again."""
    for _ in range(4):
        baseline = wait_until_idle(triton.metrics_url)
        completion = service.complete("The cat", LONG, "s8")
        answers = [next(completion)]  # the completion streams
        list(service.chat("Where does the cat go?", [], Settings(max_tokens=8), "s8"))
        service.stop("s8", "chat")
        still_running = ("s8", "completion") in service._active
        answers += list(completion)
        if not still_running:
            continue
        assert "Reply interrupted" not in answers[-1]
        # both ran to their ends on the server: neither was cancelled
        assert finish_reasons(triton, baseline)["cancelled"] == 0
        return
    pytest.fail("in 4 attempts the completion always ended before the chat")


def test_a_reply_cut_by_another_request_says_so(service, triton):
    """A second request of the same tab while a reply streams takes its place; the first
    reply ends without its final result and gets a notice, never passing as whole. One's
    own Stop is no interruption: no notice. A first or third request that ran to its end
    before its cut reached the server (a slow machine) tests nothing there: again."""
    short = Settings(max_tokens=8, temperature=0, min_tokens=8)  # never empty: it streams
    for _ in range(4):
        baseline = wait_until_idle(triton.metrics_url)
        first = service.complete("The cat", LONG, "s9")
        next(first)
        second = service.complete("The dog", short, "s9")
        second_answers = [next(second)]  # it runs: the first is replaced
        rest = list(first)
        assert rest and rest[-1].endswith(str(ReplyInterrupted())), rest[-1:]
        second_answers += list(second)
        assert "Reply interrupted" not in second_answers[-1]
        third = service.complete("The cat", LONG, "s9")
        next(third)
        service.stop("s9", "completion")
        assert not any("Reply interrupted" in answer for answer in third)
        reasons = finish_reasons(triton, baseline)
        if reasons["length"] == 1:  # the second's alone: the first and the third were cut
            assert reasons["cancelled"] == 2, reasons
            return
    pytest.fail("in 4 attempts the first or the third always ran to its end")


def test_clear_stops_the_streaming_reply_that_would_write_the_conversation_back(unused_port):
    """Clear while a reply streams: the reply's next piece carried the whole conversation
    from before the Clear back onto the page, and it ran on for nobody on the server. The
    Clear cancels the chat event and stops that session's chat request, nothing else."""

    from client import Gpt2Client
    from ui.app import build
    from ui.chat import _Reply

    service = ChatService(f"127.0.0.1:{unused_port}")
    page = build(service)
    dependencies = page.get_config_file()["dependencies"]
    (chat,) = [d for d in dependencies if d["api_name"] == "chat"]
    (clear,) = [d for d in dependencies if d["api_name"] == "clear_chat"]
    # Gradio runs a cancel as an event of its own, on the same trigger
    cancelling = [d for d in dependencies if d["targets"] == clear["targets"] and d["cancels"]]
    assert [d["cancels"] for d in cancelling] == [[chat["id"]]]
    # the Clear's function stops the session's streaming chat reply (a stream not yet
    # sent: cancelled, it never leaves), and leaves its completion and other sessions be
    streams = {
        key: Gpt2Client(f"127.0.0.1:{unused_port}").stream("x")
        for key in [("s1", "chat"), ("s1", "completion"), ("s2", "chat")]
    }
    service._active.update({key: _Reply(stream) for key, stream in streams.items()})
    request = gr.Request(session_hash="s1")
    assert page.fns[clear["id"]].fn(request) == []
    cancelled = {key for key, stream in streams.items() if stream._cancel.requested.is_set()}
    assert cancelled == {("s1", "chat")}


def test_enter_and_send_are_one_event_that_runs_once_at_a_time(unused_port):
    """Enter then Send while a reply streams: as two events, each allowed one run, and the
    second started from the first's cut reply as if it were whole (the page's "once" is
    per event). One event for both triggers, "once": a press while a reply streams is
    ignored, and the text typed stays in the box."""
    from ui.app import build

    page = build(ChatService(f"127.0.0.1:{unused_port}"))
    chat = [d for d in page.get_config_file()["dependencies"] if d["api_name"] == "chat"]
    assert len(chat) == 1
    assert sorted(kind for _, kind in chat[0]["targets"]) == ["click", "submit"]
    assert chat[0]["trigger_mode"] == "once"
