"""The credit scheduling policy, pure (spec "Credit", "Scheduling policy"); the trio
shell that owns a peer's compute is ``peer.scheduler``.


Theory of operation. A server has ``capacity`` compute slots. ``SchedulingPolicy``
is the pure core: requests are ``submit``-ted with the requester's credit and their
*work* (tokens x blocks, the unit receipts count), ``grant`` says which tickets start
now, ``release`` frees a slot, ``cancel`` withdraws a waiter. It takes ``now`` as an
argument and never reads a clock.

- Work-conserving: a free slot is granted at once whenever anyone waits, so without
  contention nobody waits at all.
- Proportional share of *work* under contention (stride scheduling, Waldspurger 1995,
  charged by work and ordered by virtual finish time as in weighted fair queuing):
  each flow has a *pass*; the waiting flow whose pass plus ``work / weight`` of its
  next request is lowest is served and its pass advances by ``work / weight``, with
  ``weight = 1 + max_boost * normalized_credit(credit)`` (BarterCast arctan, so
  weights lie in [1, 1 + max_boost)). A requester asking for 2,047 tokens is charged
  2,047 times what a decode step is, so over time each contending flow gets compute in
  proportion to its weight, whatever the size of its requests. A flow that becomes
  active joins at the current virtual time, so idling does not bank priority. Ties go
  to the older ticket; the result is deterministic.
- Every requester with credit is a flow of its own; requesters without credit
  (newcomers, free-riders, fresh identities) share one flow of weight 1. Inside it the
  unit of fairness is the requester's *group* (``submit(group=...)``: the server passes
  the address group, /24 or /64, of a remote requester, and the identity itself for one
  of its own groups): groups take turns by work the same way, and the identities of one
  group take turns by work inside their group's turn. So minting identities buys a
  Sybil nothing against contributors (all of them together get one newcomer's share,
  plus the optimistic slice below), and minting them in one subnet buys nothing
  against a newcomer of another subnet either: a thousand identities of one /24 get
  what one newcomer from elsewhere gets.
- Optimistic unchoke (BitTorrent): a fifth (``1 / unchoke_every``) of the work granted
  under contention goes to the optimistic *group*, chosen (seeded RNG) among the groups
  of waiting non-delinquent requesters whose normalized credit is below one half
  (newcomers, low credit); inside it the oldest such ticket is served. The choice is
  re-evaluated every ``reevaluate_interval`` s (a new one if the current one stopped
  waiting) and rotated every ``rotate_interval`` s. Its grants do not advance a pass:
  the share is reserved on top of the proportional one, and what it is owed does not
  accumulate while it is not waiting. With unit work this is one contended grant in
  ``unchoke_every``, as before work was counted. Chosen among groups, not identities,
  the slice reaches an honest newcomer as often with a subnet of Sybils waiting as with
  one Sybil.
- Delinquent requesters (they owe receipts beyond the grace) are served only when no
  one else waits.

A request is granted as a whole; so that a big one cannot hold a slot for long, the
server submits it in pieces of at most a quantum of work (``peer.server``), each its
own ticket, and the honest decode step waits at most one piece.

The small-step slot: a piece cannot be cut below one block of its tokens (a session's
prefill of 2,000 tokens is one piece per block), and a decode step that waits for a
running piece waits its whole remaining time, at every hop of its chain, for every
token. So while big tickets hold regular slots, as many ``small_slots`` (at most 1 by
default) open next to them, which only *small* tickets may take (``submit(small=True)``:
the server marks steps of a few tokens, a decode step), chosen and charged by the same
rules: a decode step waits for other small steps at most, never for a big piece, while
big pieces still get every regular slot. A small ticket takes a regular slot when one
is free, and without big work running no small-step slot is open, so contention among
decode steps (and their credit order) is what it was. What small tickets can take is
bounded by their size: a few tokens each, and the same group fairness among them.

Batches (issue 16): a ticket submitted with a ``batch`` key may share its slot with
other waiting tickets of the same key (decode steps of different sessions over the
same blocks, computed as one forward). When such a ticket is granted, the policy fills
its slot with more tickets of that key, each chosen exactly as the next grant would be
(``_pick`` among the requesters whose next ticket has the key: stride order by virtual
finish time, the optimistic share, delinquents only when nobody else waits), each
charged its own work, up to ``max_batch`` tickets and ``max_batch_work`` work units. So
a batch is the next tickets the policy would have served one by one, taken together:
contributors enter first, the optimistic newcomer gets its slice, and a step that
arrives while a batch computes joins the next one (the grant after the slot frees).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from swarm.credit import normalized_credit

__all__ = ["SchedulerConfig", "SchedulingPolicy"]

SWEEP_AT = 1024  # idle requester states kept before a sweep


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Parameters of the policy. Defaults follow the spec's SHOULDs."""

    capacity: int = 1  # concurrent compute slots
    unchoke_every: int = 5  # 1 in n contended grants is optimistic (0: never)
    reevaluate_interval: float = 10.0  # seconds between optimistic re-evaluations
    rotate_interval: float = 30.0  # seconds an optimistic requester keeps its share
    credit_scale: float = 1024.0  # work units at which normalized credit is 0.5
    max_boost: float = 9.0  # weight of a top contributor is at most 1 + max_boost
    seed: int = 0  # the optimistic choice's RNG seed
    max_batch: int = 16  # tickets (of one batch key) sharing one slot
    max_batch_work: int = 4096  # work units of one batch (its first ticket always fits)
    batch_linger: float = 0.5  # a batch smaller than the last of its key waits this much of its time for more
    small_slots: int = 1  # extra slots only small tickets (decode steps) may take while big ones run (0: none)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if self.unchoke_every < 0 or self.unchoke_every == 1:
            raise ValueError("unchoke_every must be 0 (off) or at least 2")
        if not (self.reevaluate_interval > 0 and self.rotate_interval >= self.reevaluate_interval):
            raise ValueError("intervals must be positive and rotate_interval >= reevaluate_interval")
        if not (self.credit_scale > 0 and self.max_boost >= 0):
            raise ValueError("credit_scale must be positive and max_boost non-negative")
        if self.max_batch < 1 or self.max_batch_work < 1:
            raise ValueError("max_batch and max_batch_work must be at least 1")
        if not 0 <= self.batch_linger <= 1:
            raise ValueError("batch_linger must be in [0, 1]")
        if self.small_slots < 0:
            raise ValueError("small_slots must be non-negative")

    def weight(self, credit: float) -> float:
        return 1.0 + self.max_boost * normalized_credit(credit, self.credit_scale)


@dataclass(slots=True)
class _Requester:
    key: Hashable
    group: Hashable  # its fairness group (an address group, or its own key)
    credit: float
    weight: float
    delinquent: bool
    pass_: float  # a creditor's pass; a newcomer's turn inside its group's turn
    waiting: deque[int] = field(default_factory=deque)
    running: int = 0

    @property
    def newcomer(self) -> bool:
        return self.credit <= 0.0


@dataclass(slots=True)
class _Flow:
    """The one flow all requesters without credit share."""

    pass_: float = 0.0
    vtime: float = 0.0  # turn of the last group served: where newly active groups join


@dataclass(slots=True)
class _Group:
    """The newcomers of one group: their share of the newcomers' flow."""

    pass_: float = 0.0  # its turn inside the newcomers' flow
    vtime: float = 0.0  # turn of its last member served: where newly active members join


class SchedulingPolicy:
    """The pure scheduling core. Tickets are ints, increasing in submission order."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._rng = random.Random(self.config.seed)
        self._requesters: dict[Hashable, _Requester] = {}
        self._owner: dict[int, _Requester] = {}  # ticket -> requester (waiting or running)
        self._work: dict[int, int] = {}  # ticket -> its work units
        self._running: set[int] = set()
        self._batch: dict[int, Hashable] = {}  # ticket -> its batch key (batchable tickets only)
        self._slot_of: dict[int, int] = {}  # running ticket -> the first ticket of its slot
        self._slot_left: dict[int, int] = {}  # first ticket of a busy slot -> its tickets still running
        self._small: set[int] = set()  # small tickets (waiting or running)
        self._small_busy: set[int] = set()  # first tickets of the busy small-step slots
        self._big_busy: set[int] = set()  # first tickets of the regular slots running big tickets
        self._next_ticket = 0
        self._vtime = 0.0  # pass of the last stride grant: where newly active flows join
        self._newcomers = _Flow()
        self._groups: dict[Hashable, _Group] = {}  # newcomers' groups (active, or whose turn is ahead)
        self._owed = 0  # optimistic work owed, times (unchoke_every - 1)
        self._owed_cap = 1
        self._optimistic: Hashable | None = None
        self._next_evaluation = float("-inf")
        self._rotate_at = float("-inf")

    # -- inspection ---------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._owner) - len(self._running)

    @property
    def busy_slots(self) -> int:
        """Slots in use (a batch is one slot however many tickets it holds)."""
        return len(self._slot_left)

    @property
    def optimistic(self) -> Hashable | None:
        """The group currently holding the optimistic-unchoke share, if any (a requester
        submitted without a group is its own group)."""
        return self._optimistic

    def is_waiting(self, ticket: int) -> bool:
        return ticket in self._owner and ticket not in self._running

    # -- transitions --------------------------------------------------------------

    def submit(self, requester: Hashable, *, now: float, credit: float = 0.0, delinquent: bool = False,
               work: int = 1, batch: Hashable | None = None, group: Hashable | None = None,
               small: bool = False) -> int:
        """Queue ``work`` units (tokens x blocks, at least 1) for ``requester``; returns
        its ticket. With a ``batch`` key, the ticket may share a slot with other tickets
        of that key (``grant_groups``). ``group`` is the requester's fairness group (the
        newcomers of one group share one turn; default: the requester alone). A
        ``small`` ticket (a step of a few tokens) may also take a small-step slot. Call
        ``grant`` next."""
        if len(self._requesters) > SWEEP_AT + 2 * len(self._owner):
            self._sweep()
        credit = max(0.0, float(credit))
        group = requester if group is None else group
        state = self._requesters.get(requester)
        newcomer = credit <= 0.0
        if newcomer:
            if not self._newcomers_active():
                self._newcomers.pass_ = max(self._newcomers.pass_, self._vtime)
            if not self._group_active(group):  # no banking of a group's idle time either
                turn = self._groups.setdefault(group, _Group(pass_=self._newcomers.vtime))
                turn.pass_ = max(turn.pass_, self._newcomers.vtime)
            joins_at = self._groups[group].vtime
        else:
            joins_at = self._vtime
        if state is None:
            state = self._requesters[requester] = _Requester(
                key=requester, group=group, credit=credit, weight=1.0, delinquent=False, pass_=joins_at)
        elif (not state.waiting and not state.running) or state.newcomer != newcomer or state.group != group:
            # no banking of idle time; a newcomer that earned credit joins the creditors now
            state.pass_ = max(state.pass_, joins_at)
        state.group = group
        state.credit = credit
        state.weight = self.config.weight(state.credit)
        state.delinquent = delinquent
        ticket = self._next_ticket
        self._next_ticket += 1
        state.waiting.append(ticket)
        self._owner[ticket] = state
        self._work[ticket] = max(1, int(work))
        if batch is not None:
            self._batch[ticket] = batch
        if small:
            self._small.add(ticket)
        return ticket

    def grant(self, *, now: float) -> list[int]:
        """Tickets that start now (the caller runs them), while slots are free; the
        tickets of one batch come in a row (``grant_groups`` says which share a slot)."""
        return [ticket for group in self.grant_groups(now=now) for ticket in group]

    def grant_groups(self, *, now: float) -> list[list[int]]:
        """The slots that start now, while slots are free: each a list of tickets in
        grant order, more than one only for a batch (see the module docstring)."""
        groups: list[list[int]] = []
        config = self.config
        while self.waiting:
            if len(self._slot_left) - len(self._small_busy) < config.capacity:
                state, small_slot = self._pick(now), False
                assert state is not None
            elif len(self._small_busy) < min(config.small_slots, len(self._big_busy)):
                state, small_slot = self._pick(now, among=self._small_head), True
                if state is None:
                    break
            else:
                break
            group = [state.waiting.popleft()]
            self._slot_left[group[0]] = 0
            if small_slot:
                self._small_busy.add(group[0])
            elif group[0] not in self._small:
                self._big_busy.add(group[0])
            self._start(group[0], group)
            groups.append(group + self.extend(group[0], now=now))
        return groups

    def _small_head(self, state: _Requester) -> bool:
        return state.waiting[0] in self._small

    def extend(self, first: int, *, now: float) -> list[int]:
        """More waiting tickets of the batch key of the busy slot ``first`` (a ticket
        ``grant_groups`` started), chosen as ``grant_groups`` fills a batch, within the
        limits with those already in it: the tickets added, which start now. For a slot
        that lingers a moment for steps on their way before it computes."""
        key = self._batch.get(first)
        if key is None or first not in self._slot_left:
            return []
        config = self.config
        members = [t for t, f in self._slot_of.items() if f == first]
        size, work = len(members), sum(self._work[t] for t in members)
        added: list[int] = []
        small_only = first in self._small_busy
        while size < config.max_batch:
            room = config.max_batch_work - work

            def fits(s: _Requester, key: Hashable = key, room: int = room) -> bool:
                head = s.waiting[0]
                return (self._batch.get(head) == key and self._work[head] <= room
                        and (not small_only or head in self._small))

            joining = self._pick(now, among=fits)
            if joining is None:
                break
            ticket = joining.waiting.popleft()
            self._start(first, [ticket])
            added.append(ticket)
            size, work = size + 1, work + self._work[ticket]
        return added

    def _start(self, first: int, tickets: list[int]) -> None:
        for ticket in tickets:
            self._owner[ticket].running += 1
            self._running.add(ticket)
            self._slot_of[ticket] = first
        self._slot_left[first] += len(tickets)

    def release(self, ticket: int, *, now: float) -> None:
        """A granted ticket finished (or failed); its slot is free. Call ``grant`` next."""
        if ticket not in self._running:
            raise KeyError(f"ticket {ticket} is not running")
        self._running.discard(ticket)
        first = self._slot_of.pop(ticket)
        self._slot_left[first] -= 1
        if not self._slot_left[first]:
            del self._slot_left[first]
            self._small_busy.discard(first)
            self._big_busy.discard(first)
        state = self._owner.pop(ticket)
        self._work.pop(ticket, None)
        self._batch.pop(ticket, None)
        self._small.discard(ticket)
        state.running -= 1
        self._forget_if_idle(state)

    def cancel(self, ticket: int) -> bool:
        """Withdraw a waiting ticket. Returns False if it is not waiting (running or gone)."""
        if not self.is_waiting(ticket):
            return False
        state = self._owner.pop(ticket)
        self._work.pop(ticket, None)
        self._batch.pop(ticket, None)
        self._small.discard(ticket)
        state.waiting.remove(ticket)
        self._forget_if_idle(state)
        return True

    # -- policy -------------------------------------------------------------------

    def _pick(self, now: float, among: Callable[[_Requester], bool] | None = None) -> _Requester | None:
        """The requester served next (its head ticket); with ``among``, the next one of
        those it accepts (filling a batch), or None if there is none to add."""
        active = [s for s in self._requesters.values() if s.waiting and (among is None or among(s))]
        normal = [s for s in active if not s.delinquent]
        if not normal:  # only delinquents wait: idle capacity serves them, oldest first
            if not active or (among is not None and any(s.waiting and not s.delinquent
                                                        for s in self._requesters.values())):
                return None
            return min(active, key=lambda s: s.waiting[0])
        if len(normal) == 1:
            return self._advance(normal[0])
        # the optimistic choice is made among everyone waiting, whatever batch is filled
        self._evaluate_optimistic(now, normal if among is None else
                                  [s for s in self._requesters.values() if s.waiting and not s.delinquent])
        every = self.config.unchoke_every
        chosen = self._requesters.get(self._optimistic) if self._optimistic is not None else None
        members = [s for s in normal if s.group == self._optimistic and self._eligible(s)] \
            if self._optimistic is not None else []
        chosen = min((s for s in members if among is None or among(s)), key=lambda s: s.waiting[0], default=None)
        if every and chosen is not None:
            head = self._work[chosen.waiting[0]]
            self._owed_cap = head
            if self._owed >= head * (every - 1):
                self._owed -= head * (every - 1)
                return chosen  # reserved share: the pass is not advanced
        state = self._stride(normal)
        self._owed += self._work[state.waiting[0]]
        if every and not members:
            self._owed = min(self._owed, self._owed_cap * (every - 1))  # no banking while it is away
        return self._advance(state)

    def _stride(self, normal: list[_Requester]) -> _Requester:
        """The waiting requester the proportional share serves next: the least virtual
        finish time (pass plus the head ticket's work over the weight), so that of flows
        at the same pass the one asking for less goes first, and a decode step that joins
        at the virtual time never waits behind a round of big pieces."""
        work = self._work
        newcomers = [s for s in normal if s.newcomer]
        creditors = [s for s in normal if not s.newcomer]
        best = None
        if creditors:
            best = min(creditors, key=lambda s: (s.pass_ + work[s.waiting[0]] / s.weight, s.waiting[0]))
            best_key = (best.pass_ + work[best.waiting[0]] / best.weight, best.waiting[0])
        if newcomers:
            # each group's next member (least finish time in the group), then the group
            # whose turn finishes first
            heads: dict[Hashable, _Requester] = {}
            for s in newcomers:
                other = heads.get(s.group)
                if other is None or (s.pass_ + work[s.waiting[0]], s.waiting[0]) < \
                        (other.pass_ + work[other.waiting[0]], other.waiting[0]):
                    heads[s.group] = s
            groups = self._groups
            first = min(heads.values(), key=lambda s: (groups[s.group].pass_ + work[s.waiting[0]], s.waiting[0]))
            if best is None or (self._newcomers.pass_ + work[first.waiting[0]], first.waiting[0]) < best_key:
                return first
        assert best is not None
        return best

    def _advance(self, state: _Requester) -> _Requester:
        work = self._work[state.waiting[0]]
        if state.newcomer:
            flow, group = self._newcomers, self._groups[state.group]
            self._vtime = max(self._vtime, flow.pass_)
            flow.pass_ += work  # the flow's weight is 1
            flow.vtime = max(flow.vtime, group.pass_)
            group.pass_ += work
            group.vtime = max(group.vtime, state.pass_)
            state.pass_ += work
        else:
            self._vtime = max(self._vtime, state.pass_)
            state.pass_ += work / state.weight
        return state

    def _newcomers_active(self) -> bool:
        return any(s.waiting or s.running for s in self._requesters.values() if s.newcomer)

    def _group_active(self, group: Hashable) -> bool:
        return group in self._groups and any(s.waiting or s.running for s in self._requesters.values()
                                             if s.newcomer and s.group == group)

    def _evaluate_optimistic(self, now: float, normal: list[_Requester]) -> None:
        current = self._optimistic
        still_fine = current is not None and any(s.group == current and self._eligible(s) for s in normal)
        if now < self._next_evaluation and still_fine:
            return
        if now >= self._next_evaluation:
            self._next_evaluation = now + self.config.reevaluate_interval
        if still_fine and now < self._rotate_at:
            return
        oldest: dict[Hashable, int] = {}  # eligible group -> its oldest waiting ticket
        for s in normal:
            if self._eligible(s):
                oldest[s.group] = min(oldest.get(s.group, s.waiting[0]), s.waiting[0])
        candidates = sorted(oldest, key=oldest.__getitem__)
        if current is not None and len(candidates) > 1:
            candidates = [g for g in candidates if g != current]  # rotate to another group
        if candidates:
            self._optimistic = self._rng.choice(candidates)
            self._rotate_at = now + self.config.rotate_interval
        elif not still_fine:
            self._optimistic = None

    def _eligible(self, state: _Requester) -> bool:
        return not state.delinquent and normalized_credit(state.credit, self.config.credit_scale) < 0.5

    def _sweep(self) -> None:
        # Idle requesters whose pass is ahead of vtime would otherwise stay forever;
        # forgetting one gives it back at most one quantum (1 / weight) on return.
        for key in [k for k, s in self._requesters.items() if not s.waiting and not s.running]:
            del self._requesters[key]
        used = {s.group for s in self._requesters.values()}
        for group in [g for g in self._groups if g not in used]:
            del self._groups[group]

    def _forget_if_idle(self, state: _Requester) -> None:
        # A requester with nothing queued whose pass is not ahead would rejoin at
        # vtime anyway: dropping it bounds memory by the active requesters.
        if state.waiting or state.running:
            return
        group = self._groups.get(state.group) if state.newcomer else None
        vtime = (group.vtime if group is not None else self._newcomers.vtime) if state.newcomer else self._vtime
        if state.pass_ <= vtime and self._requesters.get(state.key) is state:
            del self._requesters[state.key]
        if (group is not None and group.pass_ <= self._newcomers.vtime and not self._group_active(state.group)
                and not any(s.group == state.group and s.newcomer for s in self._requesters.values())):
            del self._groups[state.group]  # it would rejoin at the flow's vtime anyway
