"""Lookup bookkeeping (swarm/dht/_lookup.py) and the routing table adapter
(swarm/dht/_routing.py): pure data, no trio, no sockets."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from protocol import Identity, NodeInfo
from swarm.dht import Contact, Lookup, PeerState, RoutingTable, Termination, distance


def contact(seed: int) -> Contact:
    identity = Identity.from_seed(seed.to_bytes(32, "big"))
    return Contact(NodeInfo(peer_id=identity.peer_id, public_key=identity.public_key, addrs=(f"127.0.0.1:{seed}",)))


NETWORK = [contact(i) for i in range(1, 301)]


def table_of(me: Contact, k: int = 20) -> RoutingTable:
    table = RoutingTable(me.id, k=k)
    for c in NETWORK:
        table.add_contact(c)
    return table


def simulate(target: bytes, start: Contact, *, k=20, alpha=3, beta=3, dead=frozenset(), tables=None):
    """Drive a Lookup against an in-memory network where every node answers with the k
    closest contacts of its own routing table. Returns the lookup and the queries made."""
    tables = tables if tables is not None else {}

    def table(c):
        if c.id not in tables:
            tables[c.id] = table_of(c, k)
        return tables[c.id]

    lookup = Lookup(target, table(start).closest(target, k), k=k, alpha=alpha, beta=beta, self_id=start.id)
    asked = []
    while lookup.termination() is None:
        batch = lookup.next_queries()
        assert len(batch) <= alpha and lookup.waiting <= alpha
        assert batch or lookup.waiting, "a live lookup always has a query out"
        for c in batch:
            asked.append(c.id)
            if c.id in dead:
                lookup.on_failure(c.id)
            else:
                lookup.on_response(c.id, table(c).closest(target, k, exclude=start.id))
    return lookup, asked


def true_closest(target: bytes, n: int, *, exclude=()):
    return [c.id for c in sorted(NETWORK, key=lambda c: distance(c.id, target)) if c.id not in exclude][:n]


def test_state_transitions_and_alpha():
    target = NETWORK[0].id
    seeds = NETWORK[1:8]
    lookup = Lookup(target, seeds, k=5, alpha=2, beta=2)
    first = lookup.next_queries()
    assert len(first) == 2 and lookup.next_queries() == []  # alpha slots busy
    assert all(lookup.state(c.id) is PeerState.WAITING for c in first)
    lookup.on_failure(first[0].id)
    assert lookup.state(first[0].id) is PeerState.UNREACHABLE and lookup.failures == 1
    lookup.on_response(first[1].id, [NETWORK[0]])
    assert lookup.state(first[1].id) is PeerState.QUERIED
    assert lookup.state(NETWORK[0].id) is PeerState.HEARD
    # the target itself is now the closest and is asked next
    assert NETWORK[0] in lookup.next_queries()
    # late or duplicate reports are ignored
    lookup.on_response(first[0].id, [])
    assert lookup.state(first[0].id) is PeerState.UNREACHABLE


def test_exhausted_without_seeds_or_when_all_fail():
    assert Lookup(NETWORK[0].id, [], k=3).termination() is Termination.EXHAUSTED
    lookup = Lookup(NETWORK[0].id, NETWORK[1:3], k=3, alpha=3, beta=1)
    for c in lookup.next_queries():
        lookup.on_failure(c.id)
    assert lookup.termination() is Termination.EXHAUSTED and lookup.closest() == []
    with pytest.raises(ValueError):
        Lookup(NETWORK[0].id, [], k=3, beta=4)


@pytest.mark.parametrize("beta", [3, 20])
def test_lookup_finds_the_true_closest(beta):
    rng = random.Random(beta)
    tables: dict = {}
    for _ in range(10):
        start, target = rng.choice(NETWORK), rng.randbytes(20)
        lookup, asked = simulate(target, start, beta=beta, tables=tables)
        assert lookup.termination() is Termination.CONVERGED
        want = true_closest(target, beta, exclude={start.id})
        assert [c.id for c in lookup.closest(beta)] == want
        assert lookup.messages == len(asked) and lookup.hops >= 1


def test_lookup_routes_around_dead_peers():
    rng = random.Random(7)
    dead = frozenset(c.id for c in rng.sample(NETWORK, 90))
    alive = [c for c in NETWORK if c.id not in dead]
    tables: dict = {}
    for _ in range(10):
        start, target = rng.choice(alive), rng.randbytes(20)
        # every table still lists the dead peers: they fail when asked
        lookup, asked = simulate(target, start, beta=20, dead=dead, tables=tables)
        got = [c.id for c in lookup.closest(20)]
        assert not set(got) & dead and lookup.failures == len(set(asked) & dead) > 0
        assert got[:3] == true_closest(target, 3, exclude=dead | {start.id})
        assert got == sorted(got, key=lambda i: distance(i, target))


def test_self_is_never_queried():
    me = NETWORK[3]
    lookup, asked = simulate(me.id, me)
    assert me.id not in asked and me.id not in [c.id for c in lookup.closest()]


# --- routing table adapter ----------------------------------------------------------


def test_full_bucket_queues_a_liveness_check_instead_of_an_asyncio_task(monkeypatch):
    def no_asyncio(*args, **kwargs):
        raise AssertionError("the package's unsupervised ping path was taken")

    monkeypatch.setattr(asyncio, "ensure_future", no_asyncio)
    me = NETWORK[0]
    table = RoutingTable(me.id, k=4)
    for c in NETWORK[1:]:
        table.add_contact(c)
    assert table.pending_checks, "some far bucket filled up"
    assert all(len(b) <= 4 for b in table.buckets)
    head = table.take_pending_check()
    bucket = table.buckets[table.get_bucket_for(head)]
    assert bucket.head() is head and bucket.replacement_nodes
    newest = list(bucket.replacement_nodes.values())[-1]
    # alive: moves to the tail, the candidate stays a replacement
    table.contact_alive(head)
    assert list(bucket.nodes.values())[-1] is head and newest.id not in bucket.nodes
    # dead: evicted, the most recently seen replacement takes its place
    table.contact_failed(head.id)
    assert head.id not in bucket.nodes and newest.id in bucket.nodes and table.get(head.id) is None


def test_own_id_is_never_a_contact_and_closest_is_exact():
    me = NETWORK[0]
    table = table_of(me)
    assert table.add_contact(me) is False and table.get(me.id) is None
    known = [c.id for c in table.contacts()]
    target = NETWORK[5].id
    expected = sorted(known, key=lambda i: distance(i, target))[:20]
    assert [c.id for c in table.closest(target)] == expected
    assert table.closest(target)[0].id == target  # a known peer is returned for its own id
    assert target not in [c.id for c in table.closest(target, exclude=target)]


def test_stale_buckets_and_refresh_targets():
    me = NETWORK[0]
    table = table_of(me)
    now = max(b.last_updated for b in table.buckets)
    assert table.stale_buckets(now=now, interval=10) == []
    stale = table.stale_buckets(now=now + 3601, interval=3600)
    assert len(stale) == len(table.buckets)
    rng = random.Random(1)
    for bucket in stale:
        target = RoutingTable.random_id_in(bucket, rng)
        assert bucket.range[0] <= int.from_bytes(target, "big") <= bucket.range[1]
    for bucket in table.buckets:
        bucket.last_updated = 0.0
    table.note_lookup(NETWORK[9].id)  # stamps its bucket with the package's clock
    assert len(table.stale_buckets(now=time.monotonic(), interval=60)) == len(table.buckets) - 1
