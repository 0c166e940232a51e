"""Credit-ordered compute scheduling (spec "Credit", "Scheduling policy").

Theory of operation. The policy (which request a free compute slot serves, how a batch
is filled, what each is charged) is the pure ``SchedulingPolicy`` of
``peer._scheduling``; see it for the rules.

``Scheduler`` is the thin trio shell, and the one owner of a peer's compute: every
step a server computes and every fraud proof it verifies goes through
``await scheduler.run(requester, fn, work=...)``, which waits for a slot granted by
the policy (``slot``) and runs ``fn`` in a worker thread; ``capacity`` threads compute
at once, so the grant order is the order compute starts in. A cancelled waiter leaves
the queue; a slot granted to a waiter cancelled at the same moment is passed on.
``await scheduler.run_batch(requester, item, key=..., combine=...)`` is the batched
form: the items of the tickets granted one slot together are computed by one call of
``combine(items) -> results`` in a worker thread, made by the first of them.

Lingering: every step needs a round trip to its client, so under a steady load the
sessions can split into groups that take turns (one batch computes while the other's
steps travel), each step then waiting for the other group's batch. A batch with fewer
steps than requesters its key's last two batches had between them therefore waits,
before it computes, up to ``batch_linger`` times the last one's compute time for more
steps of its key (``SchedulingPolicy.extend`` lets them in, in policy order): the groups
merge into one batch, which costs little more than either. Two batches, not one: groups
of equal size that take turns each look complete on their own. It never waits when it
holds them all, and requesters that stop are forgotten after two batches, so sessions
that end cost at most two short waits.

It waits only for the requesters whose next step is due within that bound: each
requester's turnaround at a key (from its step's answer to its next step there) is
remembered, and one whose step comes back later (its chain goes through other hops
first) is not waited for. Two clients sharing a server at independent phases would
otherwise have each lone step wait the whole bound for a step that comes tens of ms
later (measured in bench/churn.py: 2.5 ms a step beside 2.2 ms of compute). A
requester with no turnaround yet counts as due, and so does one whose last gap was
over twice the one before (a pause: a new generation, a failover), which would
otherwise keep a batch of many sessions from waiting for it (bench/batching.py's
clients, between runs) and split them into groups taking turns.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

import trio

from swarm.bulk import allow_bulk_threads, run_bulk
from ._scheduling import SWEEP_AT, SchedulerConfig, SchedulingPolicy

__all__ = ["SchedulerConfig", "SchedulingPolicy", "Scheduler"]

_WAITS_KEPT = 1024  # recent waits kept per requester (status and tests)

T = TypeVar("T")
I = TypeVar("I")


@dataclass(frozen=True, slots=True)
class _LastBatches:
    """What a batch key's last two batches were: who was in each, what the last took."""

    requesters: frozenset[Hashable]  # of the last batch
    before: frozenset[Hashable]  # of the one before it
    seconds: float  # the last batch's compute time


@dataclass(slots=True)
class _Cadence:
    """A requester's rhythm at a batch key: when its last step there was answered, and
    how long it took from an answer to its next step (None: not known, or it paused)."""

    answered: float
    turnaround: float | None = None

    def due_by(self, deadline: float) -> bool:
        return self.turnaround is None or self.answered + self.turnaround <= deadline


@dataclass(eq=False, slots=True, kw_only=True)
class _Member:
    """One ``run_batch`` call: its item, and once granted, what its slot computed."""

    item: object
    combine: Callable[[list], list]
    key: Hashable
    requester: Hashable
    work: int
    granted: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    group: list[_Member] | None = None  # set on the first ticket of a slot: everyone in it
    tickets: list[int] = field(default_factory=list)
    result: object = None
    error: BaseException | None = None


class Scheduler:
    """A peer's compute: ``await scheduler.run(peer_id, fn)`` runs ``fn`` in a worker
    thread once ``SchedulingPolicy`` grants ``peer_id`` a slot.

    Args:
        capacity: concurrent compute slots, each a worker thread (overrides ``config.capacity``).
        credit_of: requester -> credit in work units (e.g. ``ledger.credit_of_peer(p).total``).
        delinquent_of: requester -> True if it owes receipts beyond the grace.
        config: policy parameters.

    Attributes:
        waits: requester -> recent (trio time granted, seconds waited) per slot.
    """

    def __init__(
        self,
        capacity: int,
        *,
        credit_of: Callable[[Hashable], float] | None = None,
        delinquent_of: Callable[[Hashable], bool] | None = None,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.policy = SchedulingPolicy(replace(config or SchedulerConfig(), capacity=capacity))
        self._credit_of = credit_of or (lambda _requester: 0.0)
        self._delinquent_of = delinquent_of or (lambda _requester: False)
        self._events: dict[int, trio.Event] = {}
        self._members: dict[int, _Member] = {}  # ticket -> its run_batch call
        self._last: dict[Hashable, _LastBatches] = {}  # batch key -> its last two batches
        self._arrivals: dict[Hashable, trio.Event] = {}  # batch key -> set when one of its steps comes
        self._cadence: dict[tuple[Hashable, Hashable], _Cadence] = {}  # (batch key, requester) -> its rhythm
        self.lingered = 0  # batches that waited for more steps
        # The policy never grants more than its slots (``capacity`` and the small-step
        # slots), so this limiter never makes anyone wait (and so never reorders
        # grants); it only keeps trio's default thread limiter, shared with everything
        # else, out of the way.
        self._threads = trio.CapacityLimiter(self.policy.config.capacity + self.policy.config.small_slots)
        allow_bulk_threads(self.policy.config.capacity + 1)  # every slot's bulk ticket and a big input's decode
        self.waits: dict[Hashable, list[tuple[float, float]]] = {}

    @property
    def capacity(self) -> int:
        return self.policy.config.capacity

    async def run(self, requester: Hashable, fn: Callable[[], T], *, work: int = 1,
                  group: Hashable | None = None, small: bool = False) -> T:
        """``fn()`` computed for ``requester`` in a worker thread, once the policy grants
        it a slot (at once if one is free); ``work`` is what it costs in work units
        (tokens x blocks), what the policy charges; ``group`` its fairness group (the
        requester's address group; default: the requester alone); ``small`` marks a
        step of a few tokens, which may also take a small-step slot. Other work runs in
        a thread of lower OS priority (``swarm.bulk``), so that the small steps computing
        beside it get the cores first.

        Cancellation: a waiter leaves the queue; once ``fn`` runs, it runs to the end
        (a worker thread cannot be interrupted; its slot is held until it returns) and
        the caller's cancellation is delivered after.
        """
        async with self.slot(requester, work=work, group=group, small=small):
            if small:
                return await trio.to_thread.run_sync(fn, limiter=self._threads)
            return await run_bulk(fn)

    @asynccontextmanager
    async def slot(
        self, requester: Hashable, *, now: float | None = None, credit: float | None = None, work: int = 1,
        group: Hashable | None = None, small: bool = False,
    ) -> AsyncIterator[None]:
        """Wait for a compute slot, hold it for the body, release it on exit (``run`` is
        this around a worker thread; compute goes through ``run``).

        ``credit`` overrides ``credit_of(requester)``; ``now`` defaults to trio's clock.
        Cancellation: a cancelled waiter leaves the queue (and hands a slot it was just
        granted to the next waiter); the slot is always released when the body exits.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        policy = self.policy
        asked = trio.current_time()
        when = asked if now is None else now
        ticket = policy.submit(
            requester,
            now=when,
            credit=self._credit_of(requester) if credit is None else credit,
            delinquent=self._delinquent_of(requester),
            work=work,
            group=group,
            small=small,
        )
        event = self._events[ticket] = trio.Event()
        self._dispatch(when)
        try:
            if not event.is_set():
                await event.wait()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException:
            self._events.pop(ticket, None)
            if not policy.cancel(ticket):  # granted just before the cancellation landed
                policy.release(ticket, now=trio.current_time())
            self._dispatch(trio.current_time())
            raise
        self._events.pop(ticket, None)
        granted = trio.current_time()
        waits = self.waits.setdefault(requester, [])
        waits.append((granted, granted - asked))
        del waits[:-_WAITS_KEPT]
        try:
            yield
        finally:
            policy.release(ticket, now=trio.current_time())
            self._dispatch(trio.current_time())

    async def run_batch(self, requester: Hashable, item: I, *, key: Hashable,
                        combine: Callable[[list[I]], list[T]], work: int = 1, group: Hashable | None = None,
                        small: bool = False) -> T:
        """``item``'s result, computed in a batch: once the policy grants this ticket a
        slot, together with the other waiting tickets of batch ``key`` it lets in
        (``SchedulingPolicy.grant_groups``), one worker thread calls ``combine(items)``
        (the first ticket's ``combine``: one per key) and each caller gets its result, or
        the exception ``combine`` raised. ``work`` is this item's own work units,
        ``group`` its requester's fairness group and ``small`` as for ``run``.

        Cancellation: a waiter leaves the queue; once its batch is granted the item is
        computed to the end and the cancellation is delivered after.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        policy = self.policy
        asked = trio.current_time()
        ticket = policy.submit(requester, now=asked, credit=self._credit_of(requester),
                               delinquent=self._delinquent_of(requester), work=work, batch=key,
                               group=group, small=small)
        me = self._members[ticket] = _Member(item=item, combine=combine, key=key, requester=requester, work=work)
        cadence = self._cadence.get((key, requester))
        if cadence is not None:
            gap = asked - cadence.answered
            # Much longer than its last: a pause (a new generation, a failover), not its rhythm.
            paused = cadence.turnaround is not None and gap > 2 * cadence.turnaround
            cadence.turnaround = None if paused else gap
        arrived = self._arrivals.pop(key, None)
        if arrived is not None:
            arrived.set()
        self._dispatch(asked)
        try:
            if not me.granted.is_set():
                await me.granted.wait()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException:
            if policy.cancel(ticket):
                del self._members[ticket]
                self._dispatch(trio.current_time())
                raise
            with trio.CancelScope(shield=True):  # granted meanwhile: the batch counts on it
                await self._finish(requester, me, asked)
            raise
        return await self._finish(requester, me, asked)  # type: ignore[return-value]

    async def _finish(self, requester: Hashable, me: _Member, asked: float) -> object:
        granted = trio.current_time()
        waits = self.waits.setdefault(requester, [])
        waits.append((granted, granted - asked))
        del waits[:-_WAITS_KEPT]
        with trio.CancelScope(shield=True):  # the compute runs to the end either way
            if me.group is not None:  # the first of its slot: compute the batch
                group, tickets = me.group, me.tickets
                try:
                    await self._linger(me)
                    t0 = time.perf_counter()
                    results = await trio.to_thread.run_sync(me.combine, [m.item for m in group],
                                                            limiter=self._threads)
                    if len(self._last) > SWEEP_AT:
                        self._last.clear()
                    last = self._last.get(me.key)
                    self._last[me.key] = _LastBatches(frozenset(m.requester for m in group),
                                                      last.requesters if last is not None else frozenset(),
                                                      time.perf_counter() - t0)
                    if len(results) != len(group):
                        raise RuntimeError(f"a batch of {len(group)} items gave {len(results)} results")
                    for m, result in zip(group, results):
                        m.result = result
                except BaseException as exc:  # noqa: BLE001 - every member gets it
                    for m in group:
                        m.error = exc
                finally:
                    now = trio.current_time()
                    if len(self._cadence) > SWEEP_AT:
                        self._cadence.clear()
                    for m in group:
                        cadence = self._cadence.setdefault((m.key, m.requester), _Cadence(now))
                        cadence.answered = now
                    for ticket in tickets:
                        self._members.pop(ticket, None)
                        self.policy.release(ticket, now=now)
                    self._dispatch(now)
                    for m in group:
                        m.done.set()
            else:
                await me.done.wait()
        if me.error is not None:
            raise me.error
        return me.result

    async def _linger(self, first: _Member) -> None:
        """Wait (a bounded moment) for more steps of a batch that holds fewer than its
        key's last two batches had requesters, if their steps are due within it."""
        assert first.group is not None
        last = self._last.get(first.key)
        if last is None:
            return
        config = self.policy.config
        bound = config.batch_linger * last.seconds
        if bound <= 0:
            return
        deadline = trio.current_time() + bound
        present = {m.requester for m in first.group}
        due = sum(1 for r in (last.requesters | last.before) - present
                  if (cadence := self._cadence.get((first.key, r))) is None or cadence.due_by(deadline))
        # The steps of one key are alike (its tokens are part of it): as many as fit.
        size = min(len(present) + due, config.max_batch, config.max_batch_work // max(first.work, 1))
        if len(first.group) >= size:
            return
        self.lingered += 1
        with trio.move_on_after(bound):
            while len(first.group) < size:
                arrived = self._arrivals.setdefault(first.key, trio.Event())
                await arrived.wait()
                self._join(first)
        self._join(first)

    def _join(self, first: _Member) -> None:
        assert first.group is not None
        for ticket in self.policy.extend(first.tickets[0], now=trio.current_time()):
            member = self._members[ticket]
            first.group.append(member)
            first.tickets.append(ticket)
            member.granted.set()

    def _dispatch(self, now: float) -> None:
        for group in self.policy.grant_groups(now=now):
            first = self._members.get(group[0])
            if first is None:  # a plain slot
                self._events[group[0]].set()
                continue
            first.group = [self._members[ticket] for ticket in group]
            first.tickets = group
            for member in first.group:
                member.granted.set()

    @property
    def running(self) -> int:
        return self.policy.running

    @property
    def waiting(self) -> int:
        return self.policy.waiting
