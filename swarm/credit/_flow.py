"""Transitive credit over double-signed receipts (spec "Credit", "Credit computation").

Theory of operation. Every double-signed receipt (client C, server V, work w) is an
edge V -> C of capacity w in a directed *work graph*: "V did w units of work for C".
Only the latest record per (client, server) pair counts, so an edge's capacity is the
``work`` of that record, never a sum.

The credit of a requester R as seen by a server S (BarterCast, Meulpolder et al.,
2009) is the maximum flow from R to S in that graph, restricted to paths of at most
two hops. Paths of length <= 2 from R to S are R -> S and R -> i -> S for each
intermediate i; no two of them share an edge, so the bounded max-flow is exactly

    c(R, S) + sum over i of min(c(R, i), c(i, S))

which we split into ``direct`` (the first term, work R did for S, known from S's own
ledger) and ``transitive`` (the sum). Why this resists Sybils: any flow into S passes
through an edge i -> S, and such an edge exists only if S itself countersigned a
receipt saying it received that work from i. A cluster of fake identities can sign
arbitrary receipts among themselves and for an attacker, but every path from the
attacker to S must still cross an edge that S or one of S's real neighbours signed,
so the cluster gains at most the capacity of its real edges (none if it did no work).

The result is raw work units, unbounded. ``normalized_credit`` maps it to [0, 1) with
BarterCast's arctan, so that schedulers can give a bounded proportional advantage:
twice the work is not twice the priority, and a huge (possibly colluding) neighbour
cannot starve everyone else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = ["Credit", "WorkGraph", "max_flow_2hop", "credit_of", "normalized_credit"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit:
    """Credit of ``requester`` at ``server``, in work units (blocks x tokens)."""

    direct: int  # work the requester did for the server itself
    transitive: int  # work routed over one intermediate (BarterCast 2-hop flow)

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
    """Directed graph of work: ``capacity(u, v)`` = work u did for v (latest record).

    Nodes are Ed25519 public keys (any hashable works). Adjacency is kept both ways so
    that the 2-hop flow visits only min(out-degree(R), in-degree(S)) intermediates.
    """

    __slots__ = ("_out", "_in")

    def __init__(self, edges: Mapping[tuple[bytes, bytes], int] | None = None) -> None:
        self._out: dict[bytes, dict[bytes, int]] = {}
        self._in: dict[bytes, dict[bytes, int]] = {}
        for (u, v), work in (edges or {}).items():
            self.set_work(u, v, work)

    def set_work(self, worker: bytes, beneficiary: bytes, work: int) -> None:
        """Set the edge ``worker -> beneficiary`` (replaces, never adds: records are cumulative)."""
        if work < 0:
            raise ValueError("work is non-negative")
        if worker == beneficiary:
            return  # a self-receipt is meaningless and never carries flow
        if work == 0:
            self._out.get(worker, {}).pop(beneficiary, None)
            self._in.get(beneficiary, {}).pop(worker, None)
            return
        self._out.setdefault(worker, {})[beneficiary] = work
        self._in.setdefault(beneficiary, {})[worker] = work

    def add_work(self, worker: bytes, beneficiary: bytes, work: int) -> None:
        """Raise the edge by ``work`` units (simulations; ledgers use ``set_work``)."""
        self.set_work(worker, beneficiary, self.capacity(worker, beneficiary) + work)

    def capacity(self, worker: bytes, beneficiary: bytes) -> int:
        return self._out.get(worker, {}).get(beneficiary, 0)

    def served_by(self, worker: bytes) -> Mapping[bytes, int]:
        """Beneficiaries of ``worker`` and how much it did for each."""
        return self._out.get(worker, {})

    def served_to(self, beneficiary: bytes) -> Mapping[bytes, int]:
        """Workers that did work for ``beneficiary`` and how much."""
        return self._in.get(beneficiary, {})

    def edges(self) -> Iterator[tuple[bytes, bytes, int]]:
        for u, outs in self._out.items():
            for v, work in outs.items():
                yield u, v, work

    def copy(self) -> WorkGraph:
        graph = WorkGraph()
        for u, v, work in self.edges():
            graph.set_work(u, v, work)
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


def max_flow_2hop(graph: WorkGraph, source: bytes, sink: bytes) -> int:
    """Maximum flow from ``source`` to ``sink`` over paths of at most two edges."""
    return sum(_flow_parts(graph, source, sink))


def credit_of(graph: WorkGraph, requester: bytes, server: bytes) -> Credit:
    """Credit of ``requester`` at ``server``: direct work plus 2-hop transitive flow.

    ``graph`` should be the server's own view (its ledger plus verified remote records).
    A peer has no credit with itself.
    """
    if requester == server:
        return Credit(direct=0, transitive=0)
    direct, transitive = _flow_parts(graph, requester, server)
    return Credit(direct=direct, transitive=transitive)


def _flow_parts(graph: WorkGraph, source: bytes, sink: bytes) -> tuple[int, int]:
    if source == sink:
        return 0, 0
    outs = graph.served_by(source)
    ins = graph.served_to(sink)
    direct = outs.get(sink, 0)
    # Each intermediate i contributes min(c(source, i), c(i, sink)); iterate the
    # smaller side so that a Sybil with thousands of fake edges costs little here.
    small, large = (outs, ins) if len(outs) <= len(ins) else (ins, outs)
    transitive = 0
    for node, work in small.items():
        if node == source or node == sink:
            continue
        other = large.get(node)
        if other:
            transitive += min(work, other)
    return direct, transitive
