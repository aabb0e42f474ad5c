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
from conftest import gpt2_metrics

from client import GenerationParams, Gpt2Client

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
        [sys.executable, "-m", "ui", "--port", str(port), "--triton-url", triton.grpc_url],
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


def test_chat_reply_streams_into_the_page(page, artifacts):
    page.fill("#chat-input textarea", "Where does the cat go?")
    page.keyboard.press("Enter")
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    bot.wait_for(timeout=30_000)
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.includes('tokens/s')",
        timeout=30_000,
    )
    assert bot.inner_text().strip()
    assert "model tiny" in page.inner_text("#status")
    page.screenshot(path=str(artifacts / "ui-chat.png"), full_page=True)


def test_stop_cancels_generation_on_the_server(page, triton, tiny_tokenizer):
    page.click("#sampling")  # open the sampling panel
    # 1000 tokens with no early end-of-text: still running when Stop is pressed
    for control, value in (("#max-tokens", "1000"), ("#min-tokens", "1000")):
        box = page.locator(f"{control} input[type='number']")
        box.wait_for(state="visible")
        deadline = time.monotonic() + 60  # the panel is still opening: set until it sticks
        while True:
            box.fill(value)
            box.press("Tab")
            if box.input_value() == value or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert box.input_value() == value
    page.get_by_role("tab", name="Completion").click()
    # The page must press Stop while its request still generates; how fast the tiny model
    # runs relative to the browser depends on the machine's load. So each attempt ends in
    # one of two observed states: the server counted a cancel (the test's claim), or the
    # whole completion arrived before Stop (the page was too slow: try again, with more
    # load on the server). Only the first counts as a pass.
    for attempt in range(4):
        outcome = _stop_mid_generation(
            page, triton, tiny_tokenizer, background_streams=12 + 2 * attempt
        )
        if outcome == "cancelled":
            return
    pytest.fail("in 4 attempts the completion always finished before Stop reached the server")


def ended_requests(triton) -> float:
    return sum(finished_requests(triton, r) for r in ("cancelled", "length", "stop", "error"))


def _stop_mid_generation(page, triton, tokenizer, background_streams: int) -> str:
    ended_before = ended_requests(triton)
    before = cancelled_requests(triton)
    ran_out_before = finished_requests(triton, "length")
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
        page.fill("#completion-input textarea", "The cat")
        page.click("#complete")
        output = page.locator("#completion-output textarea")
        page.wait_for_function(
            "() => document.querySelector('#completion-output textarea').value.length > 12",
            timeout=60_000,
        )
        # a click event straight away: no waiting for the streaming page to settle
        page.locator("#stop-completion").dispatch_event("click")
        # Wait for one of the two end states: the server counted the cancel, or the page's
        # request ran to max_tokens. The page's request, admitted after the background
        # streams, ends after them: it ran out only if they all did too.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if cancelled_requests(triton) >= before + 1:
                break
            if finished_requests(triton, "length") - ran_out_before >= background_streams + 1:
                return "finished first"
            time.sleep(0.25)
        assert cancelled_requests(triton) >= before + 1, (
            "Stop was pressed mid-generation but the server counted no cancel in 120 s"
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
    finally:
        for stream in background:
            stream.cancel()
        # The next attempt counts cancels afresh: wait until this one's requests (the
        # background streams and the page's) have all ended on the server.
        deadline = time.monotonic() + 60
        while ended_requests(triton) < ended_before + background_streams + 1:
            if time.monotonic() > deadline:  # an error above is the one to report
                break
            time.sleep(0.25)


PAGES = 3  # users chatting at once
BATCH = 16  # the triton fixture's max_sequences: how many sequences share a step
# The model publishes its gauges every METRICS_INTERVAL_S (gpt2/1/model.py); a reading is
# taken as at most METRIC_AGE_BOUND_S old.
METRICS_INTERVAL_S = 0.5
METRIC_AGE_BOUND_S = 2.0


class Background:
    """Keeps ``2 * batch`` equal long streams in flight until cancelled: when one ends
    another starts, so the server's batch stays full and ``batch`` streams wait in its
    queue, for as long as the test needs, however slow the machine or the page. Each stream
    records when its first piece arrived: from then on it is no longer waiting in the
    server's queue, so it can no longer be counted in ``gpt2_waiting_requests``."""

    def __init__(self, url: str, batch: int) -> None:
        self.params = GenerationParams(max_tokens=1000, min_length=1000)
        self.lock = threading.Lock()
        self.cancelled = False
        self.streams: list = []
        self.first_piece_at: list[float | None] = []
        self.errors: list[Exception] = []
        self.clients = [Gpt2Client(url) for _ in range(2 * batch)]
        self.threads = [
            threading.Thread(target=self._keep_streaming, args=(client,), daemon=True)
            for client in self.clients
        ]
        for thread in self.threads:
            thread.start()

    def _keep_streaming(self, client) -> None:
        try:
            while True:
                # A stream made after cancel() would not be cancelled; one made before and
                # first iterated after it sends nothing (the client checks).
                with self.lock:
                    if self.cancelled:
                        return
                    stream = client.stream("The dog", self.params)
                    self.streams.append(stream)
                    self.first_piece_at.append(None)
                    index = len(self.streams) - 1
                for _ in stream:
                    if self.first_piece_at[index] is None:
                        self.first_piece_at[index] = time.monotonic()
        except Exception as exc:  # reported by the test: the batch no longer stays full
            self.errors.append(exc)

    def admitted(self) -> int:
        """Streams that got a piece: each of them ends on the server, by length or cancel.
        (One cancelled before its request left may never reach the server.)"""
        with self.lock:
            return sum(1 for t in self.first_piece_at if t is not None)

    def not_started_by(self, moment: float) -> int:
        """Streams with no piece by ``moment``: an upper bound on those of them that were
        still waiting in the server's queue at any time after ``moment``."""
        with self.lock:
            return sum(1 for t in self.first_piece_at if t is None or t > moment)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            for stream in self.streams:
                stream.cancel()

    def close(self) -> None:
        for thread in self.threads:
            thread.join(30)
        for client in self.clients:
            client.close()


def test_several_pages_chatting_at_once_reach_the_server_at_once(browser, ui_url, triton):
    """Three users send a message at once; all three requests must be at the server at
    the same time. A chat reply from the tiny model takes milliseconds, too short to see
    overlap in, so background streams first fill the server's batch: the pages' requests
    then wait in the server's queue, where ``gpt2_waiting_requests`` counts them. A page
    that served one user at a time would let at most one of them through until the first
    reply was done, however long the background streams ran.

    The background keeps the batch full and ``BATCH`` streams queued until the test is
    done, so a page's request waits at least one whole stream length behind them, on a
    machine of any speed. Background streams waiting are told apart from the pages' by the
    clients' own record: a reading counts only what the background cannot account for."""
    pages = [open_page(browser, ui_url) for _ in range(PAGES)]
    wait_for(lambda: metric(triton, "gpt2_active_sequences") == 0, "earlier requests to end")
    ended_before = ended_requests(triton)
    background = Background(triton.grpc_url, BATCH)
    try:
        wait_for(lambda: metric(triton, "gpt2_active_sequences") >= BATCH, "a full batch")
        for number, page in enumerate(pages):
            page.fill("#chat-input textarea", f"Where does cat number {number} go?")
            page.keyboard.press("Enter")
        # The readings must show it for longer than one publishing interval, so that at
        # least two publications agree: one could be older than the bound if a step ran long.
        # The deadline only turns a hang into a failure.
        most_waiting, shown_since, shown = 0.0, None, False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not background.errors:
            moment = time.monotonic() - METRIC_AGE_BOUND_S  # before the reading is taken
            pages_waiting = metric(triton, "gpt2_waiting_requests") - background.not_started_by(
                moment
            )
            most_waiting = max(most_waiting, pages_waiting)
            if pages_waiting < PAGES:
                shown_since = None
            elif shown_since is None:
                shown_since = time.monotonic()
            elif time.monotonic() - shown_since > METRICS_INTERVAL_S:
                shown = True
                break
            time.sleep(0.1)
        asked = [
            page.locator("#chatbot .message.user, #chatbot [data-testid='user']").count()
            for page in pages
        ]
        assert not background.errors, f"a background stream failed: {background.errors[0]!r}"
        assert shown, (
            f"while the batch was full, at most {most_waiting:.0f} of the {PAGES} pages' "
            f"requests reached the server at once: the page held the others back (messages "
            f"shown on each page: {asked})"
        )
    finally:
        background.cancel()
        background.close()
    # Admitted once the background streams leave, every page gets its own reply: the
    # status line shows the last reply of its own session only.
    for page in pages:
        page.wait_for_function(
            "() => document.querySelector('#status').innerText.includes('tokens/s')",
            timeout=60_000,
        )
        assert page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").count()
    wait_for(
        lambda: (
            ended_requests(triton) >= ended_before + background.admitted() + PAGES
            and metric(triton, "gpt2_active_sequences") == 0
            and metric(triton, "gpt2_waiting_requests") == 0
        ),
        "every request to end",
    )
    for page in pages:
        page.close()


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    """Poll a server state; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.1)
