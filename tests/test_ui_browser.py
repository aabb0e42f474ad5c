"""End to end in a real headless Chromium (Debian's package, driven by Playwright):
type a prompt, watch streamed text appear, press Stop, and check the server cancelled;
several pages chatting at once are served at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import gpt2_metrics, wait_until_idle

from client import GenerationParams, Gpt2Client
from client.core import grpc_inputs, own_connection_args

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def ui_url(triton, artifacts):
    from conftest import _free_ports

    port = _free_ports(1)[0]
    log = open(artifacts / "logs" / "ui.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ui",
            "--port",
            str(port),
            "--triton-url",
            triton.grpc_url,
            # A page's request may wait in the queue behind a full batch of 1000-token
            # streams for as long as the machine takes to run them; the page's own waits
            # must not end it first.
            "--request-timeout",
            "120",
            "--stream-timeout",
            "600",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"the UI exited (code {process.returncode}); see {log.name}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the UI did not answer within 60 s")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium: apt-get install chromium (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, ui_url):
    """A new page in its own browser context: to the chat page, another user."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(ui_url)
    page.wait_for_selector("#chat-input textarea", timeout=30_000)
    # The textarea is in the first HTML; the page takes input only once its script has
    # connected to the UI's queue. The status line's load event is the sign: it runs
    # through that queue and replaces "connecting…".
    page.wait_for_function(
        "() => !document.querySelector('#status').innerText.includes('connecting')",
        timeout=60_000,
    )
    return page


@pytest.fixture(scope="module")
def page(browser, ui_url):
    page = open_page(browser, ui_url)
    yield page
    page.close()


def finished_requests(triton, reason: str) -> float:
    return metric(triton, f'gpt2_requests_total{{finish_reason="{reason}"}}')


def metric(triton, series: str) -> float:
    """One series' value on Triton's metrics port (0 before it is first published)."""
    return gpt2_metrics(triton.metrics_url).get(series, 0.0)


def cancelled_requests(triton) -> float:
    return finished_requests(triton, "cancelled")


def set_sampling(page, **values: str) -> None:
    """Set the sampling panel's controls (by elem_id, "_" for "-") through their number
    boxes, opening the panel first if it is closed (a click on an open one lands inside)."""
    if not page.locator("#max-tokens input[type='number']").is_visible():
        page.click("#sampling")
    for name, value in values.items():
        box = page.locator(f"#{name.replace('_', '-')} input[type='number']")
        box.wait_for(state="visible")
        deadline = time.monotonic() + 60  # the panel is still opening: set until it sticks
        while True:
            box.fill(value)
            box.press("Tab")
            if box.input_value() == value or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert box.input_value() == value, name


def test_chat_reply_streams_into_the_page(page, artifacts):
    # greedy: a sampled first draw can end the reply at once, and an empty one shows nothing
    set_sampling(page, temperature="0")
    page.fill("#chat-input textarea", "Where does the cat go?")
    page.keyboard.press("Enter")
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    bot.wait_for(timeout=120_000)
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.includes('tokens/s')",
        timeout=120_000,
    )
    assert bot.inner_text().strip()
    assert "model tiny" in page.inner_text("#status")
    page.screenshot(path=str(artifacts / "ui-chat.png"), full_page=True)


def test_stop_cancels_generation_on_the_server(page, triton, tiny_tokenizer):
    # 1000 tokens with no early end-of-text: still running when Stop is pressed
    set_sampling(page, max_tokens="1000", min_tokens="1000")
    page.get_by_role("tab", name="Completion").click()
    # The page must press Stop while its request still generates; how fast the tiny model
    # runs relative to the browser depends on the machine's load. So each attempt ends in
    # one of two observed states: the server counted a cancel (the test's claim), or the
    # whole completion arrived before Stop (the page was too slow: try again, with more
    # load on the server). Only the first counts as a pass.
    for attempt in range(4):
        outcome = _stop_mid_generation(
            page, triton, tiny_tokenizer, attempt, background_streams=12 + 2 * attempt
        )
        if outcome == "cancelled":
            return
    pytest.fail("in 4 attempts the completion always finished before Stop reached the server")


def ended_requests(triton) -> float:
    return sum(finished_requests(triton, r) for r in ("cancelled", "length", "stop", "error"))


def _stop_mid_generation(page, triton, tokenizer, attempt: int, background_streams: int) -> str:
    wait_until_idle(triton.metrics_url, timeout=600)  # a baseline after every earlier end
    counts_before = (cancelled_requests(triton), finished_requests(triton, "length"))
    # Other clients keep the server busy, so the page's request is still generating when
    # the page shows its first words: each step then sends a response per stream.
    background = [
        Gpt2Client(triton.grpc_url).stream(
            "The dog", GenerationParams(max_tokens=1000, min_length=1000)
        )
        for _ in range(background_streams)
    ]
    consumers = [
        threading.Thread(target=lambda s=s: [None for _ in s], daemon=True) for s in background
    ]
    for consumer in consumers:
        consumer.start()
    try:
        outcome = _press_stop(page, triton, tokenizer, attempt, background_streams, counts_before)
    finally:
        for stream in background:
            stream.cancel()
    # The next attempt counts cancels afresh: a request of this one still running then
    # could be counted as its cancel. So it waits until the model is idle (a background
    # stream cancelled before it was sent never comes).
    wait_until_idle(triton.metrics_url, timeout=600)
    return outcome


def _press_stop(page, triton, tokenizer, attempt, background_streams, counts_before) -> str:
    cancelled_before, ran_out_before = counts_before
    # A prompt of this attempt's own: until this request's first words arrive, the box
    # still shows the last attempt's completion, and a Stop then would cancel a request
    # that never left the page.
    prompt = f"The cat, take {attempt + 1}"
    page.fill("#completion-input textarea", prompt)
    page.click("#complete")
    output = page.locator("#completion-output textarea")
    page.wait_for_function(
        """prompt => {
            const shown = document.querySelector('#completion-output textarea').value;
            return shown.startsWith(prompt) && shown.length > prompt.length + 5;
        }""",
        arg=prompt,
        timeout=600_000,  # behind a full batch it waits for a place; a hang guard only
    )
    # a click event straight away: no waiting for the streaming page to settle
    page.locator("#stop-completion").dispatch_event("click")
    # Wait for one of the two end states: the server counted the cancel, or the page's
    # request ran to max_tokens. The page's request, admitted after the background
    # streams, ends after them: it ran out only if they all did too. Both take at most
    # the 1000 steps of a stream; the deadline only turns a hang into a failure.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if cancelled_requests(triton) >= cancelled_before + 1:
            break
        if finished_requests(triton, "length") - ran_out_before >= background_streams + 1:
            return "finished first"
        time.sleep(0.25)
    assert cancelled_requests(triton) >= cancelled_before + 1, (
        "Stop was pressed mid-generation but in 600 s the server counted no cancel, and "
        f"{finished_requests(triton, 'length') - ran_out_before:.0f} of the "
        f"{background_streams + 1} requests ran to max_tokens"
    )
    # The page may still show text generated before the Stop (its updates trail the
    # server); then it settles, well short of max_tokens.
    stopped, settled, deadline = None, False, time.monotonic() + 60
    while not settled and time.monotonic() < deadline:
        now = output.input_value()
        settled, stopped = now == stopped, now
        time.sleep(1.0)
    assert settled, "the text kept growing for 60 s after Stop"
    tokens = len(tokenizer(stopped).input_ids)
    assert tokens < 900, f"the page shows {tokens} tokens: it ran to max_tokens (1000)"
    return "cancelled"


PAGES = 3  # users chatting at once
BATCH = 16  # the triton fixture's max_sequences: how many sequences share a step
ATTEMPTS = 4


class FullBatch:
    """``count`` requests of 1000 tokens sent at once over one gRPC stream: no client
    set-up between them, so they reach the server together however slow this process is,
    and join the batch within a step or two of each other."""

    def __init__(self, url: str, count: int) -> None:
        import tritonclient.grpc as grpcclient

        self.errors: list = []  # before cancel(): the batch did not stay full
        self.cancelled = False
        self.client = grpcclient.InferenceServerClient(url, channel_args=own_connection_args())
        self.client.start_stream(callback=self._on_response)
        inputs = grpc_inputs("The dog", GenerationParams(max_tokens=1000, min_length=1000))
        for _ in range(count):
            self.client.async_stream_infer("gpt2", inputs)

    def _on_response(self, result, error) -> None:
        if error is not None and not self.cancelled:
            self.errors.append(error)

    def cancel(self) -> None:
        """Cancel every request of the stream (those still running end as cancelled)."""
        self.cancelled = True
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def test_several_pages_chatting_at_once_reach_the_server_at_once(browser, ui_url, triton):
    """Three users send a message at once; all three requests must be at the server at
    the same time. A chat reply from the tiny model takes milliseconds, too short to see
    overlap in, so background streams first fill the server's batch exactly: the pages'
    requests then wait in the server's queue, where ``gpt2_waiting_requests`` counts them.
    No other client of the model runs meanwhile (the page's token counts go to the
    ``tokenizer`` model), so one reading of 3 is 3 of the pages' requests at the server at
    one instant. A page that served one user at a time would let at most one
    of them through until the first reply was done.

    The batch stays full until the first background stream ends (1000 steps); the server
    counts that end. If the pages' requests had not all arrived by then, that attempt
    shows nothing either way (the machine ran the server fast against the browser): the
    next attempt fills the batch again. Only a reading of 3 passes."""
    pages = [open_page(browser, ui_url) for _ in range(PAGES)]
    for page in pages:  # greedy: a sampled reply can end at once and show no message
        set_sampling(page, temperature="0")
    most_waiting: list[float | None] = []  # per attempt; None: the batch was never seen full
    shown, broken = False, []  # broken: attempts whose background batch failed (void)
    for attempt in range(ATTEMPTS):
        wait_until_idle(triton.metrics_url, timeout=600)  # a baseline after every earlier end
        ended_before = ended_requests(triton)

        def batch_left_full(before=ended_before) -> bool:
            """No background stream has ended: no place in the batch came free."""
            return ended_requests(triton) == before

        # Typed before the batch fills, so that sending them is three key presses.
        for number, page in enumerate(pages):
            page.fill("#chat-input textarea", f"Where does cat {number} go ({attempt})?")
        background = FullBatch(triton.grpc_url, BATCH)
        try:
            # Every background request in the batch, so none of them waits in the queue;
            # if one has already ended, this attempt can show nothing.
            wait_for(
                lambda: (
                    not batch_left_full()
                    or (
                        metric(triton, "gpt2_active_sequences") >= BATCH
                        and metric(triton, "gpt2_waiting_requests") == 0
                    )
                ),
                "a full batch",
                timeout_s=600,
            )
            most = None
            if batch_left_full() and not background.errors:
                for page in pages:
                    page.keyboard.press("Enter")
                most, deadline = 0.0, time.monotonic() + 600  # a hang guard only
                while not shown and batch_left_full():
                    assert time.monotonic() < deadline, "the full batch never moved in 600 s"
                    waiting = metric(triton, "gpt2_waiting_requests")
                    most = max(most, waiting)
                    shown = waiting >= PAGES
                    time.sleep(0.1)
            most_waiting.append(most)
        finally:
            background.cancel()
        if background.errors:
            # The batch is this test's scaffolding: a broken one shows nothing either way.
            # Seen once in CI (c4e3826): every stream of its one connection through the
            # door reset at once (docs/RELIABILITY.md); again, at most ATTEMPTS times.
            broken.append(str(background.errors[0]))
            shown = False
            continue
        if shown:
            break
    assert len(broken) < ATTEMPTS, f"the background batch failed in every attempt: {broken}"
    shown_on_pages = [page.inner_text("#chatbot")[-300:] for page in pages]
    assert shown, (
        f"in {ATTEMPTS} attempts, while the batch was full, at most {most_waiting} of the "
        f"{PAGES} pages' requests were at the server at once (per attempt; None: the batch "
        f"was never seen full). 1 in every attempt: the page let one through at a time; "
        f"0: they came after the batch had moved (the pages show: {shown_on_pages})"
    )
    # the status line shows the last reply of the page's own session
    for page in pages:
        page.wait_for_function(
            "() => document.querySelector('#status').innerText.includes('tokens/s')",
            timeout=60_000,
        )
        assert page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").count()
    for page in pages:
        page.close()


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    """Poll a server state; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.1)
