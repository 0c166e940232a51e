"""Pure parts of collusion resistance: operators, weighted draws, the weighted vote,
long-lived history and the audit rate of new peers (spec 13.2, 13.6)."""

from __future__ import annotations

import random

import pytest

from verify import AuditPolicy, Auditor, Ballot, History, Reputation, VoteResult, draw_voter, operator_of, tally
from verify._reputation import ESTABLISHED_AGE, FRESH_WEIGHT

A, B, C, D, E, F = (bytes([i]) * 20 for i in range(1, 7))
DAY = 86400.0


def test_operators_are_networks_and_local_addresses_are_their_own():
    assert operator_of(A, "8.8.4.7:4000") == operator_of(B, "8.8.4.200:5000")  # one /24
    assert operator_of(A, "8.8.4.7:4000") != operator_of(B, "8.8.5.7:4000")
    assert operator_of(A, "[2a00:1450:1:2::5]:4000") == operator_of(B, "[2a00:1450:1:2:ffff::1]:1")  # one /64
    assert operator_of(A, "[2a00:1450:1:2::5]:4000") != operator_of(B, "[2a00:1450:1:3::5]:4000")
    for local in ("127.0.0.1:4000", "10.1.2.3:4000", "192.168.1.9:1", "203.0.113.7:1", "[::1]:4000",
                  "[fe80::1]:2", "host:1", None):
        assert operator_of(A, local) != operator_of(B, local)  # nothing to group by: one operator per identity


def test_draws_are_weighted_and_one_per_operator():
    rng = random.Random(0)
    candidates = [(A, "op1"), (B, "op1"), (C, "op2"), (D, "op3")]
    weights = {A: 1.0, B: 1.0, C: 0.1, D: 0.0}
    counts = {A: 0, B: 0, C: 0}
    for _ in range(4000):
        counts[candidates[draw_voter(candidates, weights.__getitem__, set(), rng)][0]] += 1
    assert counts[C] < 0.1 * (counts[A] + counts[B])  # ~1/21 of the draws; D (weight 0) never
    assert candidates[draw_voter(candidates, weights.__getitem__, {"op1"}, rng)][0] == C
    assert draw_voter(candidates, weights.__getitem__, {"op1", "op2"}, rng) is None


def _vote(weights, groups):
    """Ballots of ``weights`` (the first is the hop's); answers agree iff in the same group."""
    ballots = [Ballot(bytes([i]) * 20, w, is_hop=i == 0) for i, w in enumerate(weights)]
    return tally(ballots, lambda i, j: groups[i] == groups[j])


def test_a_vote_of_fresh_identities_never_outweighs_an_established_peer():
    fresh = FRESH_WEIGHT
    # an established honest hop against four fresh colluders that agree with each other
    assert _vote([1.0, fresh, fresh, fresh, fresh], "hcccc").result is VoteResult.NO_MAJORITY
    # the same colluders as the hop's side, the established peer alone against them
    assert _vote([fresh, fresh, fresh, fresh, 1.0], "ccccH").result is VoteResult.NO_MAJORITY
    # two established voters outvote a fresh hop and its fresh friends
    vote = _vote([fresh, fresh, 1.0, 1.0], "ccHH")
    assert vote.result is VoteResult.HOP_LOSES and set(vote.winners) == {bytes([2]) * 20, bytes([3]) * 20}
    # one against one is never a majority, whatever the weights
    assert _vote([fresh, 1.0], "cH").result is VoteResult.NO_MAJORITY
    assert _vote([1.0, 1.0, fresh], "hhc").result is VoteResult.HOP_WINS


def test_history_establishment_and_weight_persist(tmp_path):
    rep = Reputation()
    now = 10 * DAY
    assert rep.establishment(A, now) == 0 and rep.weight(A, now) == pytest.approx(FRESH_WEIGHT)
    rep.history[A] = History(first_seen=now - 2 * ESTABLISHED_AGE, passes=40.0, updated=now)
    assert rep.establishment(A, now) == 1.0 and rep.weight(A, now) == pytest.approx(1.0)
    rep.record_audit_pass(B, now - 0.5 * DAY, n=40)  # enough passes, known for half a day
    assert rep.establishment(B, now) == pytest.approx(0.5)
    rep.record_mismatch(A, now)
    assert rep.weight(A, now) < 0.2  # a mismatch weighs in through the score
    path = tmp_path / "rep.cbor"
    rep.save(path)
    again = Reputation.load(path)
    assert again.history == rep.history and again.establishment(B, now) == pytest.approx(0.5)
    rep.ban(C, now, reason="x")
    assert rep.weight(C, now) == 0


def test_reputation_files_of_version_1_still_load(tmp_path):
    from protocol import cbor_encode

    path = tmp_path / "v1.cbor"
    path.write_bytes(cbor_encode([1, 3600.0, [[A, 1.0, 0.0, 0.0, 0.0, 5.0]], [[B, 1.0, "old", None]]]))
    rep = Reputation.load(path)
    assert rep.is_banned(B) and rep.standing(A, 5.0).successes == 1.0 and rep.history == {}


def test_new_and_unknown_peers_are_audited_more():
    rep = Reputation()
    auditor = Auditor(None, None, rep, policy=AuditPolicy(rate=0.05, probation=2.0))  # type: ignore[arg-type]
    assert auditor.rate_for(A) == 1.0 and auditor.on_probation(A)  # never seen: every step
    rep.history[B] = History(first_seen=0.0, passes=100.0, updated=auditor.clock())
    assert auditor.rate_for(B) == 0.05 and not auditor.on_probation(B)
    rep.record_mismatch(B, auditor.clock())  # a mark sends it back to probation
    assert auditor.rate_for(B) > 0.05 and auditor.on_probation(B)
    assert Auditor(None, None, rep, policy=AuditPolicy(rate=0.05, probation=0)).rate_for(A) == 0.05  # type: ignore
