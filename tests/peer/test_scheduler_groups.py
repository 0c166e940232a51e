"""The scheduling policy's fairness unit is the address group (issue 10 item 4): the
identities of one /24 share one turn of the newcomers' flow and one chance at the
optimistic slice. Pure, simulated time (the simulators of test_scheduler.py)."""

from __future__ import annotations

import statistics
from collections.abc import Hashable

from peer._scheduling import SWEEP_AT
from peer.scheduler import SchedulerConfig, SchedulingPolicy

from test_scheduler import HIGH, simulate_work


class Grouped(SchedulingPolicy):
    """The policy with each requester's group read from its name (``group:identity``),
    as the server passes the address group of a remote requester."""

    def submit(self, requester: Hashable, **kw) -> int:  # type: ignore[override]
        return super().submit(requester, group=str(requester).split(":")[0], **kw)


def test_a_subnet_of_sybils_gets_one_newcomers_turn() -> None:
    # 20 identities of one /24 and one newcomer of another, all without credit, all
    # asking for pieces of the same size: per identity, the honest one got 1/21 of the
    # compute; per group it gets half.
    requesters = {f"sybils:{i}": (0.0, 64, 0.0) for i in range(20)} | {"honest:0": (0.0, 64, 0.0)}
    _, served = simulate_work(Grouped(SchedulerConfig(capacity=1)), requesters, duration=200.0)
    total = sum(served.values())
    assert 0.4 < served["honest:0"] / total < 0.6
    # and the Sybils take turns inside their group's share
    sybil = [served[f"sybils:{i}"] for i in range(20)]
    assert min(sybil) > 0.5 * statistics.mean(sybil)
    # without groups every identity is its own: the honest one is one of 21
    _, flat = simulate_work(SchedulingPolicy(SchedulerConfig(capacity=1)), requesters, duration=200.0)
    assert flat["honest:0"] / sum(flat.values()) < 0.1


def test_contributors_still_come_first() -> None:
    requesters = ({"contrib:0": (HIGH, 64, 0.0)} | {f"sybils:{i}": (0.0, 64, 0.0) for i in range(20)}
                  | {"honest:0": (0.0, 64, 0.0)})
    _, served = simulate_work(Grouped(SchedulerConfig(capacity=1)), requesters, duration=300.0)
    total = sum(served.values())
    assert served["contrib:0"] / total > 0.6
    assert served["honest:0"] > 0.5 * sum(served[f"sybils:{i}"] for i in range(20))


def test_the_optimistic_slice_is_drawn_among_groups() -> None:
    # Contributors keep the machine busy; newcomers live on the optimistic fifth (and the
    # newcomers' flow). Drawn among identities, 20 Sybils of one /24 left an honest
    # newcomer about 1/21 of the slice; drawn among groups it gets about half.
    config = SchedulerConfig(capacity=1, rotate_interval=10.0, reevaluate_interval=10.0)
    requesters = ({f"contrib{i}:0": (HIGH, 64, 0.0) for i in range(4)}
                  | {f"sybils:{i}": (0.0, 64, 0.0) for i in range(20)} | {"honest:0": (0.0, 64, 0.0)})
    _, served = simulate_work(Grouped(config), requesters, duration=2000.0)
    newcomers = served["honest:0"] + sum(served[f"sybils:{i}"] for i in range(20))
    assert served["honest:0"] / newcomers > 0.3
    _, flat = simulate_work(SchedulingPolicy(config), requesters, duration=2000.0)
    flat_newcomers = flat["honest:0"] + sum(flat[f"sybils:{i}"] for i in range(20))
    assert flat["honest:0"] / flat_newcomers < 0.15


def test_a_decode_step_is_served_next_whatever_the_subnet_floods() -> None:
    # issue 10 item 4, once-flood: six identities of one /24 keep a 512-unit piece queued
    # each; the honest client's 4-unit step (then 20 ms elsewhere) waits for the piece
    # running and at most one more.
    requesters = {f"sybils:{i}": (0.0, 512, 0.0) for i in range(6)} | {"honest:0": (0.0, 4, 0.02)}
    waits, _ = simulate_work(Grouped(SchedulerConfig(capacity=1)), requesters, duration=60.0)
    assert len(waits["honest:0"]) > 50
    assert max(waits["honest:0"]) <= 2 * 0.512 + 1e-9
    assert statistics.median(waits["honest:0"]) <= 0.512 + 1e-9


def test_idle_groups_are_forgotten() -> None:
    # as idle requesters are: memory is bounded by the active ones (plus the sweep's slack)
    policy = Grouped(SchedulerConfig(capacity=1))
    for i in range(3 * SWEEP_AT):
        ticket = policy.submit(f"g{i}:x", now=float(i), work=8)
        assert policy.grant(now=float(i)) == [ticket]
        policy.release(ticket, now=i + 0.5)
    assert len(policy._groups) <= SWEEP_AT + 1  # noqa: SLF001
    assert len(policy._requesters) <= SWEEP_AT + 1  # noqa: SLF001


def test_a_small_step_never_waits_for_a_big_piece() -> None:
    # A session's prefill is cut by blocks only (a piece of 2,000 tokens over one block
    # is one piece), so a decode step that shared the slots with pieces waited for the
    # one running at every hop. With the small-step slot it waits for small steps at most.
    policy = SchedulingPolicy(SchedulerConfig(capacity=1))
    big = [policy.submit(f"sybil{i}", now=0.0, work=4000) for i in range(3)]
    assert policy.grant(now=0.0) == [big[0]]
    step = policy.submit("honest", now=0.0, work=2, small=True)
    assert policy.grant(now=0.0) == [step]  # the small-step slot, while the piece runs
    late = policy.submit("sybil-small", now=0.0, work=2, small=True)
    assert policy.grant(now=0.0) == []  # one small-step slot: small steps take turns in it
    policy.release(step, now=0.001)
    assert policy.grant(now=0.001) == [late]
    policy.release(late, now=0.002)
    assert policy.grant(now=0.002) == []  # big pieces never take the small-step slot
    policy.release(big[0], now=1.0)
    assert policy.grant(now=1.0) == [big[1]]
    # a small step takes a regular slot when one is free, and with no big piece running
    # no small-step slot opens: decode steps contend (in credit order) as they did
    idle = SchedulingPolicy(SchedulerConfig(capacity=1))
    first = idle.submit("a", now=0.0, work=2, small=True)
    second = idle.submit("b", now=0.0, work=2, small=True)
    assert idle.grant(now=0.0) == [first]
    assert idle.busy_slots == 1
    idle.release(first, now=0.001)
    assert idle.grant(now=0.001) == [second]
    off = SchedulingPolicy(SchedulerConfig(capacity=1, small_slots=0))
    off.submit("x", now=0.0, work=4000)
    assert len(off.grant(now=0.0)) == 1
    off.submit("y", now=0.0, work=2, small=True)
    assert off.grant(now=0.0) == []
