"""Integration: a one-minute soak of the shared service (the issue asks for it in make test)."""

from __future__ import annotations

import json

import pytest
from conftest import wait_until_idle

from benchmarks import soak

pytestmark = pytest.mark.integration

SECONDS = 60
WARMUP_SECONDS = 20


def test_a_minute_of_mixed_load_has_no_error_and_no_memory_growth(triton, tmp_path):
    out = tmp_path / "soak.json"
    # the soak's count of requests starts from the page it reads first: the earlier tests'
    # requests must all be counted there already, or the late ones count as the soak's
    wait_until_idle(triton.metrics_url)
    code = soak.main(
        [
            f"--http-url={triton.http_url}",
            f"--grpc-url={triton.grpc_url}",
            f"--metrics-url={triton.metrics_url}",
            f"--triton-pid={triton.triton.process.pid}",
            "--clients=8",
            f"--seconds={SECONDS}",
            f"--warmup-seconds={WARMUP_SECONDS}",
            "--seed=1",
            f"--out={out}",
        ]
    )
    summary = json.loads(out.read_text())
    assert summary["errors"] == {}, summary["errors"]
    assert summary["requests"] > 0 and summary["succeeded"] == summary["requests"]
    assert set(summary["by_kind"]) == {"grpc-stream", "grpc-whole", "http-stream", "http-whole"}
    for key in ("p50", "p90", "p99"):
        assert summary["latency_ms"][key] > 0
    assert summary["ttft_ms"]["p50"] is not None and summary["tokens_per_s"] > 0
    assert summary["shm"]["start"]["files"] >= 0 and summary["shm"]["end"]["files"] >= 0
    # Every request the clients sent was seen, and ended, by the server.
    assert summary["server"]["requests_counted"] == summary["requests"]
    assert not any(summary["server"]["sequences_held_at_end"].values())
    # Growth is only measured when the run outlasts the warm-up (caches and arenas fill
    # first) by several samples; a minute with 20 s of warm-up does.
    rss = summary["rss_mb"]
    assert rss["start"] and rss["after_warmup"] and rss["end"]
    assert rss["growth_after_warmup_pct"] is not None
    assert rss["growth_after_warmup_pct"] < soak.MAX_RSS_GROWTH_PCT, summary["samples"]
    assert code == 0, summary["failures"]


def _summary(outcomes: list, counted: int) -> dict:
    run = soak.Soak(outcomes=outcomes, samples=[soak.Sample(0.0, 2**30, 3, 0, 0)] * 2)
    args = soak.parse_args(["--seconds", "60"])
    counter = 'gpt2_requests_total{finish_reason="length"}'
    return soak.summarize(run, args, 60.0, {counter: 5.0}, {counter: 5.0 + counted})


def test_a_soak_that_sent_nothing_or_lost_requests_fails():
    """No request sent (every client failed to start) was a pass; so was a server that
    counted fewer requests than were sent."""
    sent = [soak.Outcome("grpc", True, 1.0, 0.1, tokens=8) for _ in range(10)]
    assert _summary(sent, 10)["ok"]
    assert _summary([], 0)["failures"] == ["no request was sent"]
    lost = _summary(sent, 3)
    assert "the server counted 3 requests, fewer than the 10 answered" in lost["failures"]
    # a request that failed may never have reached the server: its failure is the finding
    failed = sent[:8] + [soak.Outcome("grpc", True, 1.0, 0.1, error="UNAVAILABLE: x")] * 2
    assert _summary(failed, 8)["failures"] == ["2 request(s) failed"]


def test_the_soak_counts_the_requests_of_every_replica(capsys):
    one = soak.parse_args([])
    assert one.metrics_url == ["http://127.0.0.1:8002/metrics"]
    two = ["--metrics-url", "http://127.0.0.1:8002/metrics"]
    two += ["--metrics-url", "http://127.0.0.1:8012/metrics"]
    assert len(soak.parse_args(two).metrics_url) == 2
    with pytest.raises(SystemExit):
        soak.parse_args(["--metrics-url", "http://10.1.2.3:8002/metrics"])


def test_the_soak_takes_the_addresses_its_clients_take(capsys):
    with pytest.raises(SystemExit):
        soak.parse_args(["--http-url", "http://127.0.0.1:8000"])
    assert "without a scheme" in capsys.readouterr().err
