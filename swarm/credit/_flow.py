"""Transitive credit over double-signed receipts (spec "Credit", "Credit computation").

Theory of operation. Every double-signed receipt (client C, server V, work w) is an
edge V -> C of capacity w in a directed *work graph*: "V did w units of work for C".
A record is cumulative, so an edge's capacity is what the latest record of the pair
says, not a sum; and old work fades: each increase of a record counts from when this
peer learned of it and halves every ``half_life`` seconds (a peer that stopped
contributing a month ago does not keep its priority for ever).

The credit of a requester R as seen by a server S (BarterCast, Meulpolder et al.,
2009) is its *direct* credit ``c(R, S)``, work R did for S, plus *transitive* credit
through intermediates i that R worked for and that worked for S. Per requester, the
bounded max-flow over paths R -> i -> S is ``sum_i min(c(R, i), c(i, S))``; but that
lets one intermediate pass its whole contribution ``c(i, S)`` on to every requester,
so i can multiply it by signing receipts for any number of fresh identities (50
Sybils, 50 x the credit). Capacities must be conserved across requesters (Tribler's
max-flow over a shared graph): i's contribution to S is split among everyone who
worked for i, in proportion to what each did for it,

    share(R, i, S) = c(i, S) * c(R, i) / sum over R' not in {i, S} of c(R', i)
    transitive(R, S) = sum over i not in {R, S} of min(c(R, i), share(R, i, S))

so that, summed over all requesters, the credit that flows through i is at most
``c(i, S)``: a cluster of fake identities around i gains at most the work i really
did for S, however many identities it has, and none if it did no real work.

The result is raw work units, unbounded. ``normalized_credit`` maps it to [0, 1) with
BarterCast's arctan, so that schedulers can give a bounded proportional advantage:
twice the work is not twice the priority, and a huge (possibly colluding) neighbour
cannot starve everyone else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_HALF_LIFE", "Credit", "WorkGraph", "max_flow_2hop", "credit_of", "normalized_credit"]


#: Default half-life of recorded work (seconds): a week.
DEFAULT_HALF_LIFE = 7 * 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit:
    """Credit of ``requester`` at ``server``, in whole work units (blocks x tokens)."""

    direct: int  # work the requester did for the server itself
    transitive: int  # its share of work routed over one intermediate (conserved 2-hop flow)

    def __post_init__(self) -> None:
        if self.direct < 0 or self.transitive < 0:
            raise ValueError("credit components are non-negative")

    @property
    def total(self) -> int:
        return self.direct + self.transitive

    def normalized(self, scale: float) -> float:
        """``normalized_credit(self.total, scale)``: in [0, 1)."""
        return normalized_credit(self.total, scale)


def normalized_credit(credit: float, scale: float) -> float:
    """BarterCast's arctan normalization: 0 for no credit, 0.5 at ``scale`` units, -> 1.

    Raises ValueError if ``scale`` is not positive. Negative credit maps to 0.
    """
    if not scale > 0:
        raise ValueError("scale must be positive")
    if credit <= 0:
        return 0.0
    return math.atan(credit / scale) * 2.0 / math.pi


class WorkGraph:
    """Directed graph of work: ``capacity(u, v, now)`` = work u did for v, decayed.

    Nodes are Ed25519 public keys (any hashable works). Adjacency is kept both ways so
    that the 2-hop flow visits only min(out-degree(R), in-degree(S)) intermediates,
    with the total work into each node kept up to date for the conserved shares.

    Decay without rewriting every edge: an edge stores its value scaled to a common
    reference time ``epoch`` (value x 2^((t - epoch) / half_life)), so one factor
    2^(-(now - epoch) / half_life) turns every stored value into its value at ``now``;
    the reference moves forward when the scaled values would grow too large.
    ``half_life`` None: no decay (simulations, tests).
    """

    __slots__ = ("_out", "_in", "_into", "half_life", "_epoch")

    _REBASE = 256.0  # half-lives between the reference time and an update before rebasing

    def __init__(self, edges: Mapping[tuple[bytes, bytes], float] | None = None, *,
                 half_life: float | None = None) -> None:
        if half_life is not None and not half_life > 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self._epoch: float | None = None
        self._out: dict[bytes, dict[bytes, float]] = {}
        self._in: dict[bytes, dict[bytes, float]] = {}
        self._into: dict[bytes, float] = {}  # node -> sum of its stored in-edges
        for (u, v), work in (edges or {}).items():
            self.set_work(u, v, work)

    # -- time -------------------------------------------------------------------------------

    def _scale(self, now: float | None) -> float:
        """The factor from a value at ``now`` to its stored (epoch-scaled) form."""
        if self.half_life is None or now is None:
            return 1.0
        if self._epoch is None:
            self._epoch = now
        elif (now - self._epoch) / self.half_life > self._REBASE:
            self._rebase(now)
        return 2.0 ** ((now - self._epoch) / self.half_life)

    def _factor(self, now: float | None) -> float:
        """The factor from stored values to values at ``now``."""
        if self.half_life is None or now is None or self._epoch is None:
            return 1.0
        return 2.0 ** (-(now - self._epoch) / self.half_life)

    def _rebase(self, now: float) -> None:
        factor = self._factor(now)
        for outs in self._out.values():
            for v in outs:
                outs[v] *= factor
        for ins in self._in.values():
            for u in ins:
                ins[u] *= factor
        for v in self._into:
            self._into[v] *= factor
        self._epoch = now

    # -- edges ------------------------------------------------------------------------------

    def set_work(self, worker: bytes, beneficiary: bytes, work: float, now: float | None = None) -> None:
        """Set the edge ``worker -> beneficiary`` to ``work`` as of ``now`` (replaces)."""
        if work < 0:
            raise ValueError("work is non-negative")
        if worker == beneficiary:
            return  # a self-receipt is meaningless and never carries flow
        self._put(worker, beneficiary, work * self._scale(now))

    def add_work(self, worker: bytes, beneficiary: bytes, work: float, now: float | None = None) -> None:
        """Raise the edge by ``work`` units done at ``now`` (a newer record's increase)."""
        if work < 0:
            raise ValueError("work is non-negative")
        if worker == beneficiary or work == 0:
            return
        scale = self._scale(now)
        self._put(worker, beneficiary, self._out.get(worker, {}).get(beneficiary, 0.0) + work * scale)

    def _put(self, worker: bytes, beneficiary: bytes, stored: float) -> None:
        old = self._out.get(worker, {}).get(beneficiary, 0.0)
        into = self._into.get(beneficiary, 0.0) - old + stored
        if stored <= 0:
            self._out.get(worker, {}).pop(beneficiary, None)
            self._in.get(beneficiary, {}).pop(worker, None)
        else:
            self._out.setdefault(worker, {})[beneficiary] = stored
            self._in.setdefault(beneficiary, {})[worker] = stored
        if self._in.get(beneficiary):
            self._into[beneficiary] = max(into, 0.0)
        else:
            self._into.pop(beneficiary, None)

    def capacity(self, worker: bytes, beneficiary: bytes, now: float | None = None) -> float:
        return self._out.get(worker, {}).get(beneficiary, 0.0) * self._factor(now)

    def served_by(self, worker: bytes, now: float | None = None) -> dict[bytes, float]:
        """Beneficiaries of ``worker`` and how much it did for each (decayed to ``now``)."""
        f = self._factor(now)
        return {v: w * f for v, w in self._out.get(worker, {}).items()}

    def served_to(self, beneficiary: bytes, now: float | None = None) -> dict[bytes, float]:
        """Workers that did work for ``beneficiary`` and how much (decayed to ``now``)."""
        f = self._factor(now)
        return {u: w * f for u, w in self._in.get(beneficiary, {}).items()}

    def work_into(self, beneficiary: bytes, now: float | None = None) -> float:
        """All work done for ``beneficiary`` (decayed to ``now``)."""
        return self._into.get(beneficiary, 0.0) * self._factor(now)

    def edges(self, now: float | None = None) -> Iterator[tuple[bytes, bytes, float]]:
        f = self._factor(now)
        for u, outs in self._out.items():
            for v, work in outs.items():
                yield u, v, work * f

    def copy(self) -> WorkGraph:
        graph = WorkGraph(half_life=self.half_life)
        graph._epoch = self._epoch
        for u, v, stored in self.edges():
            graph._put(u, v, stored)
        return graph

    def __len__(self) -> int:
        return sum(len(outs) for outs in self._out.values())

    @classmethod
    def from_records(cls, records: Iterable[object]) -> WorkGraph:
        """A graph from ReceiptRecords (the caller has verified them); latest per pair wins."""
        latest: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        for r in records:
            key = (r.server, r.client)  # type: ignore[attr-defined]
            seq, work = r.seq, r.work  # type: ignore[attr-defined]
            if key not in latest or seq > latest[key][0]:
                latest[key] = (seq, work)
        return cls({key: work for key, (_, work) in latest.items()})


def max_flow_2hop(graph: WorkGraph, source: bytes, sink: bytes, now: float | None = None) -> float:
    """Maximum flow from ``source`` to ``sink`` over paths of at most two edges, for
    this one pair (not conserved across requesters: ``credit_of`` is)."""
    if source == sink:
        return 0
    outs, ins = graph.served_by(source, now), graph.served_to(sink, now)
    return outs.get(sink, 0) + sum(min(w, ins[i]) for i, w in outs.items() if i in ins and i not in (source, sink))


def credit_of(graph: WorkGraph, requester: bytes, server: bytes, now: float | None = None) -> Credit:
    """Credit of ``requester`` at ``server``: direct work plus its conserved share of
    2-hop transitive flow (module docstring), in whole units, decayed to ``now``.

    ``graph`` should be the server's own view (its ledger plus verified remote records).
    A peer has no credit with itself.
    """
    if requester == server:
        return Credit(direct=0, transitive=0)
    direct, transitive = _flow_parts(graph, requester, server, now)
    return Credit(direct=round(direct), transitive=round(transitive))


def _flow_parts(graph: WorkGraph, source: bytes, sink: bytes, now: float | None) -> tuple[float, float]:
    outs = graph.served_by(source, now)
    ins = graph.served_to(sink, now)
    direct = outs.get(sink, 0.0)
    # Each intermediate i passes on min(c(source, i), share); iterate the smaller side
    # so that a Sybil with thousands of fake edges costs little here.
    small, large = (outs, ins) if len(outs) <= len(ins) else (ins, outs)
    transitive = 0.0
    for node in small:
        if node == source or node == sink or node not in large:
            continue
        worked_for_i, i_for_sink = outs[node], ins[node]
        # everyone's work for i but the sink's own (the sink's work for i is no flow to it)
        pool = graph.work_into(node, now) - graph.capacity(sink, node, now)
        if pool <= 0:
            continue
        transitive += min(worked_for_i, i_for_sink * min(worked_for_i / pool, 1.0))
    return direct, transitive
