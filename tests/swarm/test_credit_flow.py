"""Pure credit computation: bounded max-flow, normalization, and the Sybil scenario."""

from __future__ import annotations

import math
from collections import deque

from hypothesis import given, strategies as st

from protocol import Identity
from swarm.credit import (
    Credit,
    Ledger,
    WorkGraph,
    countersign,
    credit_of,
    make_receipt,
    max_flow_2hop,
    normalized_credit,
)

HH = bytes(32)


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(32, "big"))


def signed(client: Identity, server: Identity, work: int, seq: int = 1) -> object:
    """A real double-signed record: ``server`` did ``work`` for ``client``."""
    return countersign(server, make_receipt(client, server.public_key, HH, seq, work))


def test_direct_and_transitive_parts() -> None:
    r, s, a, b = b"R", b"S", b"A", b"B"
    g = WorkGraph({(r, s): 5, (r, a): 10, (a, s): 3, (r, b): 2, (b, s): 7})
    c = credit_of(g, r, s)
    assert c == Credit(direct=5, transitive=3 + 2)
    assert c.total == max_flow_2hop(g, r, s) == 10


def test_three_hop_paths_carry_nothing() -> None:
    g = WorkGraph({(b"R", b"A"): 100, (b"A", b"B"): 100, (b"B", b"S"): 100})
    assert credit_of(g, b"R", b"S").total == 0


def test_reverse_edges_carry_nothing() -> None:
    # S served R a lot: that is R's debt, not its credit.
    g = WorkGraph({(b"S", b"R"): 1000})
    assert credit_of(g, b"R", b"S").total == 0


def test_latest_record_replaces_not_adds() -> None:
    g = WorkGraph()
    g.set_work(b"R", b"S", 10)
    g.set_work(b"R", b"S", 12)
    assert g.capacity(b"R", b"S") == 12
    g.set_work(b"R", b"S", 0)
    assert len(g) == 0
    g.set_work(b"R", b"R", 50)  # self-edges never count
    assert credit_of(g, b"R", b"R").total == 0 and len(g) == 0


def test_normalization_is_bounded_arctan() -> None:
    assert normalized_credit(0, 100) == 0.0
    assert normalized_credit(-5, 100) == 0.0
    assert math.isclose(normalized_credit(100, 100), 0.5)
    assert 0.99 < normalized_credit(10**9, 100) < 1.0
    assert normalized_credit(200, 100) < 2 * normalized_credit(100, 100)


def _edmonds_karp(cap: dict[tuple[int, int], int], s: int, t: int) -> int:
    residual: dict[int, dict[int, int]] = {}
    for (u, v), c in cap.items():
        residual.setdefault(u, {})[v] = residual.get(u, {}).get(v, 0) + c
        residual.setdefault(v, {}).setdefault(u, 0)
    flow = 0
    while True:
        parent = {s: s}
        queue = deque([s])
        while queue and t not in parent:
            u = queue.popleft()
            for v, c in residual.get(u, {}).items():
                if c > 0 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if t not in parent:
            return flow
        path, v = [], t
        while v != s:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= push
            residual[v][u] += push
        flow += push


@given(st.dictionaries(st.tuples(st.integers(0, 6), st.integers(0, 6)), st.integers(1, 50), max_size=30))
def test_matches_general_max_flow_on_two_hop_subgraph(edges: dict[tuple[int, int], int]) -> None:
    edges = {k: v for k, v in edges.items() if k[0] != k[1]}
    source, sink = 0, 1
    g = WorkGraph({(bytes([u]), bytes([v])): c for (u, v), c in edges.items()})
    # Keeping only edges out of the source and into the sink leaves exactly the
    # paths of at most two hops, so a general max-flow there is the oracle.
    sub = {(u, v): c for (u, v), c in edges.items() if (u == source or v == sink) and v != source and u != sink}
    assert max_flow_2hop(g, bytes([source]), bytes([sink])) == _edmonds_karp(sub, source, sink)


def test_sybil_cluster_buys_nothing_at_honest_server() -> None:
    server = ident(1)
    honest = [ident(10 + i) for i in range(3)]
    attacker = ident(99)
    sybils = [ident(100 + i) for i in range(10)]
    ledger = Ledger(server.public_key)
    # Honest neighbours did real work for the server (the server countersigned),
    # and the server did work for them.
    own = [signed(server, h, 500) for h in honest] + [signed(h, server, 300) for h in honest]
    # Honest neighbours also worked for each other.
    third = [signed(honest[0], honest[1], 400), signed(honest[1], honest[2], 200)]
    # The Sybil cluster: huge mutual receipts, and receipts "from" the attacker, and
    # receipts saying the Sybils worked for the attacker.
    huge = 10**12
    fake = [signed(a, b, huge) for a in sybils for b in sybils if a is not b]
    fake += [signed(s, attacker, huge) for s in sybils] + [signed(attacker, s, huge) for s in sybils]
    for reporter_records in (own, third, fake):
        result = ledger.merge_remote(reporter_records)
        assert not result.rejected
    assert ledger.credit(attacker.public_key).total == 0
    assert all(ledger.credit(s.public_key).total == 0 for s in sybils)
    # Honest peers do get credit, directly and transitively.
    assert ledger.credit(honest[0].public_key) == Credit(direct=500, transitive=0)
    assert ledger.credit(honest[1].public_key) == Credit(direct=500, transitive=400)

    # Even a graph that keeps every fake record (no relevance filter) gives nothing.
    g = WorkGraph.from_records(own + third + fake)
    assert credit_of(g, attacker.public_key, server.public_key).total == 0


def test_sybils_gain_at_most_their_real_edges() -> None:
    # One Sybil did 7 units of real work for an honest neighbour that works for S.
    s_, h, attacker, sybil = b"S", b"H", b"A", b"Y"
    g = WorkGraph({(h, s_): 1000, (sybil, h): 7, (attacker, sybil): 10**9, (sybil, attacker): 10**9})
    assert credit_of(g, attacker, s_).total == 0  # 3 hops away: A -> Y -> H -> S
    g.set_work(attacker, h, 5)  # the attacker's own real work for H
    assert credit_of(g, attacker, s_).total == 5


# -- conservation and decay (issue 11) -----------------------------------------------------


@given(st.dictionaries(st.tuples(st.integers(0, 7), st.integers(0, 7)), st.integers(1, 10**6), max_size=40))
def test_transitive_credit_through_a_peer_never_exceeds_its_contribution(edges: dict[tuple[int, int], int]) -> None:
    """Summed over every requester, the credit that flows through one intermediate is at
    most what that intermediate did for the server (capacities are conserved)."""
    g = WorkGraph({(bytes([u]), bytes([v])): c for (u, v), c in edges.items() if u != v})
    sink = bytes([0])
    nodes = {bytes([n]) for pair in edges for n in pair}
    total = sum(credit_of(g, r, sink).transitive for r in nodes)
    contributed = sum(g.capacity(i, sink) for i in nodes if i != sink)
    assert total <= contributed + len(nodes)  # + rounding of each requester's credit
    for r in nodes:  # and nobody gets more than the per-requester 2-hop flow
        c = credit_of(g, r, sink)
        assert c.total <= max_flow_2hop(g, r, sink) + 1


def test_a_fan_out_of_sybil_receipts_shares_one_real_contribution() -> None:
    s, x = b"S", b"X"
    g = WorkGraph({(x, s): 5000})
    sybils = [bytes([i]) * 2 for i in range(50)]
    for y in sybils:
        g.set_work(y, x, 5000)  # "y served X 5,000 units", signed by X
    assert sum(credit_of(g, y, s).total for y in sybils) == 5000  # not 50 x 5,000
    assert sum(max_flow_2hop(g, y, s) for y in sybils) == 250_000  # what the old rule gave
    g.set_work(b"R", x, 5000 * 50)  # an honest requester that did as much as all of them together
    assert credit_of(g, b"R", s).total == 2500 and sum(credit_of(g, y, s).total for y in sybils) == 2500


def test_recorded_work_decays_with_age() -> None:
    week = 7 * 86400.0
    g = WorkGraph(half_life=week)
    g.add_work(b"R", b"S", 1000, now=0.0)
    assert credit_of(g, b"R", b"S", now=0.0).direct == 1000
    assert credit_of(g, b"R", b"S", now=week).direct == 500
    g.add_work(b"R", b"S", 1000, now=week)  # new work counts in full
    assert credit_of(g, b"R", b"S", now=week).direct == 1500
    assert credit_of(g, b"R", b"S", now=3 * week).direct == 375
    g.add_work(b"A", b"B", 8, now=300 * week)  # far in the future: the reference time moves on
    assert credit_of(g, b"R", b"S", now=300 * week).direct == 0
    assert credit_of(g, b"A", b"B", now=301 * week).direct == 4


def test_ledger_decay_survives_a_restart(tmp_path) -> None:
    server, client = ident(1), ident(2)
    ledger = Ledger(server.public_key, path=tmp_path / "l", half_life=100.0)
    ledger.store(signed(client, server, 800), now=0.0)  # server did 800 for client
    record = countersign(client, make_receipt(server, client.public_key, HH, 1, 400))  # client did 400 for server
    ledger.store(record, now=0.0)
    assert ledger.credit(client.public_key, now=100.0).direct == 200
    ledger.store(countersign(client, make_receipt(server, client.public_key, HH, 2, 600)), now=100.0)
    assert ledger.credit(client.public_key, now=100.0).direct == 400  # 200 left + the 200 new units
    ledger.save()
    again = Ledger.open(tmp_path / "l", server.public_key)
    again_credit = Ledger.from_bytes((tmp_path / "l").read_bytes(), server.public_key, half_life=100.0, now=200.0)
    assert again.latest(server.public_key, client.public_key).work == 600
    assert again_credit.credit(client.public_key, now=200.0).direct == 200  # kept decaying across the restart
