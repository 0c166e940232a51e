"""Batches in the credit scheduler: a slot shared by tickets of one batch key is filled
in the policy's own grant order (contributors first, the optimistic newcomer's slice),
and the trio shell computes each batch with one call."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import trio
import trio.testing

from peer.scheduler import Scheduler, SchedulerConfig, SchedulingPolicy

HIGH = 50_000.0
STEP = 30  # work of a decode step over 30 blocks


def _submit_all(policy: SchedulingPolicy, credits: dict[str, float], per: int, key: object = "span") -> dict[int, str]:
    owners = {}
    for _ in range(per):
        for name, credit in credits.items():
            owners[policy.submit(name, now=0.0, credit=credit, work=STEP, batch=key)] = name
    return owners


def _credits() -> dict[str, float]:
    return {f"new{i}": 0.0 for i in range(8)} | {"contrib0": HIGH, "contrib1": HIGH, "small": 300.0}


def test_a_batch_takes_the_next_tickets_of_the_grant_order() -> None:
    config = SchedulerConfig(capacity=1, seed=3, max_batch=1)
    one, batched = SchedulingPolicy(config), SchedulingPolicy(SchedulerConfig(capacity=1, seed=3, max_batch=4))
    for policy in (one, batched):
        blocker = policy.submit("blocker", now=0.0)
        assert policy.grant(now=0.0) == [blocker]
    owners = _submit_all(one, _credits(), per=3)
    assert _submit_all(batched, _credits(), per=3) == owners
    for policy in (one, batched):
        policy.release(blocker, now=1.0)
    sequential, groups = [], []
    now = 1.0
    while one.waiting:
        (ticket,) = one.grant(now=now)
        sequential.append(ticket)
        one.release(ticket, now=now)
        now += 0.1
    now = 1.0
    while batched.waiting:
        (group,) = batched.grant_groups(now=now)
        assert batched.busy_slots == 1
        assert batched.running == len(group)
        groups.append(group)
        for ticket in group:
            batched.release(ticket, now=now)
        now += 0.1
    assert [len(g) for g in groups] == [4] * 8 + [1]
    assert [t for g in groups for t in g] == sequential
    names = [[owners[t] for t in g] for g in groups]
    # contributors first: both big contributors (twice each) are in the first two batches
    assert names[0][:2] == ["contrib0", "contrib1"]
    assert names[0] == ["contrib0", "contrib1"] * 2
    assert sum(n.startswith("contrib") for g in names[:2] for n in g) == 6
    # the optimistic slice: a newcomer gets in ahead of its turn in the newcomers' flow
    first_newcomers = [n for g in names for n in g if n.startswith("new")]
    assert first_newcomers[0] != "new0"


def test_batches_respect_keys_limits_and_delinquents() -> None:
    policy = SchedulingPolicy(SchedulerConfig(capacity=1, max_batch=3, max_batch_work=2 * STEP + 5))
    blocker = policy.submit("blocker", now=0.0)
    policy.grant(now=0.0)
    a = policy.submit("a", now=0.0, work=STEP, batch="span")
    b = policy.submit("b", now=0.0, work=STEP, batch="other span")
    c = policy.submit("c", now=0.0, work=STEP, batch="span")
    d = policy.submit("d", now=0.0, work=STEP, batch="span")  # over max_batch_work with a and c
    plain = policy.submit("e", now=0.0, work=1)  # no key: never shares a slot
    big = policy.submit("f", now=0.0, work=1000)
    late = policy.submit("late", now=0.0, work=STEP, batch="span", delinquent=True)
    policy.release(blocker, now=1.0)
    seen = []
    while policy.waiting:
        (group,) = policy.grant_groups(now=1.0)
        seen.append(group)
        for ticket in group:
            policy.release(ticket, now=1.0)
    # least work first; d does not fit beside a and c; a delinquent joins no batch while
    # anyone else waits (f), and is served once nobody does
    assert seen == [[plain], [a, c], [b], [d], [big], [late]]
    with pytest.raises(ValueError, match="max_batch and max_batch_work must be at least 1"):
        SchedulerConfig(max_batch=0)


# -- the trio shell ---------------------------------------------------------------------


async def test_steps_arriving_during_a_batch_join_the_next_one(autojump_clock: trio.testing.MockClock) -> None:
    credits = {"first": 0.0, "new0": 0.0, "new1": 0.0, "contrib": HIGH}
    scheduler = Scheduler(capacity=1, credit_of=credits.__getitem__, config=SchedulerConfig(batch_linger=0))
    gates = {"first": threading.Event(), "second": threading.Event()}
    batches: list[list[str]] = []

    def combine(items: list[str]) -> list[str]:
        batches.append(items)
        if len(items) == 1 and items[0] in gates:
            gates[items[0]].wait(10)
        if "boom" in items:
            raise ValueError("the batch failed")
        return [item.upper() for item in items]

    results: dict[str, object] = {}

    async def step(requester: str, item: str, *, cancel_after: float | None = None) -> None:
        with trio.move_on_after(cancel_after if cancel_after is not None else float("inf")):
            try:
                results[item] = await scheduler.run_batch(requester, item, key="span", combine=combine, work=STEP)
            except ValueError as exc:
                results[item] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(step, "first", "first")
        await trio.testing.wait_all_tasks_blocked()
        for name in ("new0", "new1", "contrib"):
            nursery.start_soon(step, name, name)
        nursery.start_soon(functools.partial(step, "new0", "impatient", cancel_after=0.5))
        await trio.sleep(1.0)
        assert scheduler.waiting == 3  # the impatient one left the queue
        gates["first"].set()
    # one batch, the contributor first (trio starts the newcomers' tasks in either order)
    assert batches[0] == ["first"]
    assert len(batches) == 2
    assert batches[1][0] == "contrib"
    assert sorted(batches[1][1:]) == ["new0", "new1"]
    assert results == {"first": "FIRST", "new0": "NEW0", "new1": "NEW1", "contrib": "CONTRIB"}
    assert (scheduler.running, scheduler.waiting) == (0, 0)

    async with trio.open_nursery() as nursery:  # a failing batch fails every step in it
        nursery.start_soon(step, "first", "second")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(step, "new0", "boom")
        nursery.start_soon(step, "new1", "fine")
        await trio.testing.wait_all_tasks_blocked()
        gates["second"].set()
    assert sorted(batches[-1]) == ["boom", "fine"]
    assert isinstance(results["boom"], ValueError)
    assert results["boom"] is results["fine"]
    assert (scheduler.running, scheduler.waiting) == (0, 0)


async def test_a_smaller_batch_lingers_for_the_steps_on_their_way(autojump_clock: trio.testing.MockClock) -> None:
    # Four sessions; one client is quicker than the others: without lingering its step
    # would go alone and the sessions would split into two groups taking turns.
    batches: list[list[str]] = []

    def combine(items: list[str]) -> list[str]:
        batches.append(sorted(items))
        time.sleep(0.02)  # compute: the last batch of the key took 20 ms
        return items

    for linger, expected in ((0.5, [["a", "b", "c", "d"]] * 2), (0.0, [["a", "b", "c", "d"], ["a"], ["b", "c", "d"]])):
        scheduler = Scheduler(capacity=1, config=SchedulerConfig(batch_linger=linger))
        batches.clear()

        async def step(name: str, delay: float, scheduler: Scheduler = scheduler) -> None:
            await trio.sleep(delay)  # the client's round trip
            await scheduler.run_batch(name, name, key="span", combine=combine, work=STEP)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, "hold", 0.0)  # occupies the slot while the four queue
            await trio.testing.wait_all_tasks_blocked()
            for name in "abcd":
                nursery.start_soon(step, name, 0.0)
        del batches[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, "a", 0.0)
            for name in "bcd":
                nursery.start_soon(step, name, 0.005)  # within half of the last batch's 20 ms
        assert batches == expected, linger


async def test_a_lone_step_does_not_wait_for_a_step_due_later(autojump_clock: trio.testing.MockClock) -> None:
    # Two clients share the server at independent phases (their chains go through other
    # hops between their steps here): once their turnarounds are known, neither's lone
    # step waits for the other's, which comes 10 s later, far past the linger bound (a
    # hundredth of the last batch's compute time: real time, which a loaded machine
    # stretches, so the phases are set far apart).
    batches: list[list[str]] = []

    def combine(items: list[str]) -> list[str]:
        batches.append(sorted(items))
        return items

    scheduler = Scheduler(capacity=1, config=SchedulerConfig(batch_linger=0.01))
    gate = threading.Event()

    async def client(name: str, offset: float) -> None:
        await scheduler.run_batch(name, name, key="span", combine=combine, work=STEP)  # together, behind "hold"
        await trio.sleep(offset)
        for _ in range(6):
            await trio.sleep(20.0)  # the rest of its chain
            await scheduler.run_batch(name, name, key="span", combine=combine, work=STEP)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(scheduler.run, "hold", functools.partial(gate.wait, 10), work=STEP))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, "a", 0.0)
        nursery.start_soon(client, "b", 10.0)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert batches == [["a", "b"]] + [["a"], ["b"]] * 6, batches
    # Only while a turnaround was not known yet (a's first lone step; on a loaded machine
    # sometimes one more): waiting for every requester of the last two batches, each of
    # the 12 lone steps would.
    assert scheduler.lingered <= 2


async def test_groups_that_take_turns_merge(autojump_clock: trio.testing.MockClock) -> None:
    # Two pairs of sessions took turns ([c, d], then [a, b]): each batch was as large as
    # the last, so only the last two together show four sessions. The next batch waits
    # for the pair still on its way instead of going without it.
    batches: list[list[str]] = []

    def combine(items: list[str]) -> list[str]:
        batches.append(sorted(items))
        time.sleep(0.02)  # compute: each batch takes 20 ms
        return items

    scheduler = Scheduler(capacity=1)
    gate = threading.Event()

    async def step(name: str, delay: float = 0.0) -> None:
        await trio.sleep(delay)  # the client's round trip
        await scheduler.run_batch(name, name, key="span", combine=combine, work=STEP)

    for pair in ("cd", "ab"):  # each pair queues behind other work, then computes together
        gate.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(scheduler.run, "other", functools.partial(gate.wait, 10), work=STEP))
            await trio.testing.wait_all_tasks_blocked()
            for name in pair:
                nursery.start_soon(step, name)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert batches == [["c", "d"], ["a", "b"]]
    gate.clear()
    async with trio.open_nursery() as nursery:

        async def other_then_cd() -> None:
            await scheduler.run("other", functools.partial(gate.wait, 10), work=STEP)
            for name in "cd":  # set off once [a, b] has the slot
                nursery.start_soon(step, name, 0.005)  # within half of the last batch's 20 ms

        nursery.start_soon(other_then_cd)
        await trio.testing.wait_all_tasks_blocked()
        for name in "ab":
            nursery.start_soon(step, name)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert batches[2:] == [["a", "b", "c", "d"]]
