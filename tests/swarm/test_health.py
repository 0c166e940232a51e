"""The client's failure memory and measurements (swarm/health.py): pure, no trio."""

from __future__ import annotations

import pytest

from swarm.health import BASE_BACKOFF, MAX_BACKOFF, PeerHealth, TimeoutPolicy

A, B = b"a" * 20, b"b" * 20


def test_backoff_starts_at_15_s_and_doubles_on_each_failure_in_a_row():
    health = PeerHealth()
    assert health.failed(A, 100.0) == BASE_BACKOFF == 15.0
    assert health.backed_off(A, 114.9)
    assert not health.backed_off(A, 115.0)
    assert health.failed(A, 120.0) == 30.0
    assert health.failed(A, 160.0) == 60.0
    assert health.backoff_left(A, 160.0) == 60.0
    for t in range(10):
        health.failed(A, 300.0 + t)
    assert health.backoff_left(A, 309.0) == MAX_BACKOFF
    assert health.excluded(200.0) == frozenset({A})
    assert health.excluded(200.0, [B]) == frozenset()


def test_a_success_ends_the_streak_and_the_backoff():
    health = PeerHealth()
    health.failed(A, 0.0)
    health.failed(A, 1.0)
    health.succeeded(A, 2.0)
    assert not health.backed_off(A, 2.0)
    assert health.failed(A, 3.0) == BASE_BACKOFF  # the streak started again
    assert health.record(A).failures == 3
    assert health.record(A).successes == 1


def test_retry_after_is_honoured_without_growing_the_streak():
    health = PeerHealth()
    assert health.failed(A, 0.0, retry_after=1.0) == 1.0  # BUSY: come back in a second
    assert health.backed_off(A, 0.5)
    assert not health.backed_off(A, 1.0)
    assert health.failed(A, 2.0, retry_after=1.0) == 1.0
    assert health.record(A).streak == 0
    assert health.failed(A, 5.0) == BASE_BACKOFF  # a real failure starts the doubling afresh
    assert health.failed(A, 6.0, retry_after=float("nan")) == 30.0  # a nonsense retry_after is ignored


def test_a_ping_proves_life_but_does_not_lift_a_backoff():
    """A tarpit answers PING and never FORWARD: it stays backed off."""
    health = PeerHealth()
    health.failed(A, 0.0)
    health.observe_rtt(A, 0.02, 1.0)
    health.alive(A, 2.0)
    assert health.backed_off(A, 2.0)
    assert health.snapshot(5.0)[A]["last_seen_ago"] == 3.0
    # a probe answered likewise only proves life
    health.observe_step(A, 3.0, seconds=0.1, blocks=2, tokens=1, success=False)
    assert health.backed_off(A, 3.0)
    assert health.measured(A)


def test_an_announcement_published_after_the_failure_lifts_the_backoff():
    """A restarted server publishes at once; a dead or hung one cannot publish at all."""
    health = PeerHealth()
    health.failed(A, 10.0)
    assert not health.republished(A, 12.0, published_ago=5.0)  # published at 7.0: before the failure
    assert health.backed_off(A, 12.0)
    assert health.republished(A, 12.0, published_ago=1.0)  # at 11.0: it came back
    assert not health.backed_off(A, 12.0)
    assert health.failed(A, 13.0) == 30.0  # the streak stands: failing again costs more
    assert not health.republished(B, 13.0, published_ago=0.0)  # never failed: nothing to lift


def test_rtt_is_a_running_mean_and_goes_stale():
    health = PeerHealth(rtt_max_age=60.0)
    assert health.needs_rtt(A, 0.0)
    assert health.rtt(A) is None
    health.observe_rtt(A, 0.100, 0.0)
    health.observe_rtt(A, 0.200, 1.0)
    assert health.rtt(A) == pytest.approx(0.7 * 0.1 + 0.3 * 0.2)
    assert not health.needs_rtt(A, 61.0)
    assert health.needs_rtt(A, 61.1)


def test_compute_comes_from_one_token_steps_minus_the_rtt():
    health = PeerHealth()
    health.observe_rtt(A, 0.010, 0.0)
    health.observe_step(A, 1.0, seconds=0.050, blocks=4, tokens=1)
    assert health.block_seconds(A) == pytest.approx(0.010)
    health.observe_step(A, 2.0, seconds=5.0, blocks=4, tokens=100)  # a prefill says little of decode
    assert health.block_seconds(A) == pytest.approx(0.010)
    health.observe_step(A, 3.0, seconds=0.001, blocks=4, tokens=1)  # faster than the RTT: zero compute
    assert health.block_seconds(A) == pytest.approx(0.7 * 0.010)


def test_deadlines_derive_from_measurements_within_a_floor_and_a_cap():
    policy = TimeoutPolicy(slack=4.0, floor=2.0, cap=60.0, hedge_slack=2.0, hedge_floor=1.0, unmeasured=10.0)
    health = PeerHealth(timeouts=policy)
    assert health.step_timeout(A, blocks=4, tokens=1) == 10.0  # never measured
    assert health.step_timeout(A, blocks=4, tokens=1, cap=5.0) == 5.0
    assert health.hedge_delay(A, blocks=4, tokens=1) is None
    health.observe_rtt(A, 0.1, 0.0)
    health.observe_step(A, 0.0, seconds=0.5, blocks=4, tokens=1)  # 0.1 s per block
    assert health.expected(A, blocks=4, tokens=1) == pytest.approx(0.5)
    assert health.step_timeout(A, blocks=4, tokens=1) == pytest.approx(4 * 0.5 + 2.0)
    assert health.step_timeout(A, blocks=2, tokens=3) == pytest.approx(4 * (0.1 + 0.6) + 2.0)
    assert health.step_timeout(A, blocks=4, tokens=1000) == 60.0  # the cap
    assert health.hedge_delay(A, blocks=4, tokens=1) == pytest.approx(2 * 0.5 + 1.0)
    assert health.open_timeout(A) == pytest.approx(4 * 0.2 + 2.0)
    assert health.open_hedge_delay(A) == pytest.approx(2 * 0.2 + 1.0)
    assert health.open_timeout(B) == 10.0
    assert health.open_hedge_delay(B) == 1.0


def test_bad_parameters():
    with pytest.raises(ValueError, match="base_backoff <= max_backoff"):
        PeerHealth(base_backoff=0)
    with pytest.raises(ValueError, match="base_backoff <= max_backoff"):
        PeerHealth(base_backoff=20, max_backoff=10)
    with pytest.raises(ValueError, match="the cap positive"):
        TimeoutPolicy(cap=0)
