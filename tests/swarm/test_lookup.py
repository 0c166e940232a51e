"""Lookup bookkeeping (swarm/dht/_lookup.py) and the routing table adapter
(swarm/dht/_routing.py): pure data, no trio, no sockets."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from protocol import Identity, NodeInfo
from swarm.dht import Contact, ContactState, DisjointLookup, Lookup, PeerState, RoutingTable, Termination, distance
from swarm.dht._routing import GOOD_FOR


def contact(seed: int, addr: str | None = None) -> Contact:
    """A contact (no puzzle: the table and lookups do not check it, the DHT node does),
    each in its own /24 unless ``addr`` says otherwise."""
    identity = Identity.from_seed(seed.to_bytes(32, "big"))
    addr = addr or f"10.{seed >> 8}.{seed & 255}.1:4000"
    return Contact(NodeInfo(peer_id=identity.peer_id, public_key=identity.public_key, addrs=(addr,)))


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
        assert len(batch) <= alpha
        assert lookup.waiting <= alpha
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
    assert len(first) == 2
    assert lookup.next_queries() == []  # alpha slots busy
    assert all(lookup.state(c.id) is PeerState.WAITING for c in first)
    lookup.on_failure(first[0].id)
    assert lookup.state(first[0].id) is PeerState.UNREACHABLE
    assert lookup.failures == 1
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
    assert lookup.termination() is Termination.EXHAUSTED
    assert lookup.closest() == []
    with pytest.raises(ValueError, match="beta <= k"):
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
        assert lookup.messages == len(asked)
        assert lookup.hops >= 1


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
        assert not set(got) & dead
        assert lookup.failures == len(set(asked) & dead) > 0
        assert got[:3] == true_closest(target, 3, exclude=dead | {start.id})
        assert got == sorted(got, key=lambda i: distance(i, target))


def test_self_is_never_queried():
    me = NETWORK[3]
    lookup, asked = simulate(me.id, me)
    assert me.id not in asked
    assert me.id not in [c.id for c in lookup.closest()]


# --- routing table adapter ----------------------------------------------------------


def test_full_bucket_queues_a_liveness_check_instead_of_an_asyncio_task(monkeypatch):
    def no_asyncio(*args, **kwargs):
        raise AssertionError("the package's unsupervised ping path was taken")

    monkeypatch.setattr(asyncio, "ensure_future", no_asyncio)
    me = NETWORK[0]
    table = RoutingTable(me.id, k=4)
    for c in NETWORK[1:200]:
        table.add_contact(c, now=0.0)
    assert not table.pending_checks, "a full bucket of GOOD contacts pings nobody"
    for c in NETWORK[200:]:  # 16 minutes later: the old contacts are QUESTIONABLE
        table.add_contact(c, now=GOOD_FOR + 60)
    assert table.pending_checks, "some far bucket filled up"
    assert all(len(b) <= 4 for b in table.buckets)
    head = table.take_pending_check()
    bucket = table.buckets[table.get_bucket_for(head)]
    assert bucket.head() is head
    assert bucket.replacement_nodes
    newest = list(bucket.replacement_nodes.values())[-1]
    # alive: moves to the tail, the candidate stays a replacement
    table.contact_alive(head.id, now=0.0)
    assert list(bucket.nodes.values())[-1] is head
    assert newest.id not in bucket.nodes
    # dead (two failures in a row): evicted, the most recently seen replacement takes its place
    table.contact_failed(head.id, now=0.0)
    assert head.id in bucket.nodes
    table.contact_failed(head.id, now=0.0)
    assert head.id not in bucket.nodes
    assert newest.id in bucket.nodes
    assert table.get(head.id) is None


def test_own_id_is_never_a_contact_and_closest_is_exact():
    me = NETWORK[0]
    table = table_of(me)
    assert table.add_contact(me) is False
    assert table.get(me.id) is None
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


# --- disjoint paths, stalls ---------------------------------------------------------


def simulate_disjoint(target, start, *, paths, beta, liars=frozenset(), tarpits=frozenset(), tables=None):
    """A DisjointLookup against the in-memory network: ``liars`` answer with only each
    other, ``tarpits`` never answer (stalled, then failed once everything else is done)."""
    tables = tables if tables is not None else {}
    liar_contacts = [c for c in NETWORK if c.id in liars]

    def answer(c):
        if c.id in liars:
            return sorted(liar_contacts, key=lambda x: distance(x.id, target))[:20]
        if c.id not in tables:
            tables[c.id] = table_of(c)
        return tables[c.id].closest(target, 20, exclude=start.id)

    seeds = table_of(start).closest(target, 20)
    lookup = DisjointLookup(target, seeds, k=20, alpha=3, beta=beta, paths=paths, self_id=start.id)
    asked: list[tuple[int, bytes]] = []
    stalled: list[tuple[int, bytes]] = []
    while lookup.termination() is None:
        batch = lookup.next_queries()
        for index, c in batch:
            asked.append((index, c.id))
            if c.id in tarpits:
                lookup.on_stall(index, c.id)
                stalled.append((index, c.id))
            else:
                lookup.on_response(index, c.id, answer(c))
        if not batch and lookup.termination() is None:
            assert stalled, "a live lookup always has a query out"
            index, peer = stalled.pop(0)
            lookup.on_failure(index, peer)  # the query timeout, long after the stall
    return lookup, asked


def test_disjoint_paths_never_share_a_peer_and_find_the_closest():
    rng = random.Random(11)
    tables: dict = {}
    for _ in range(10):
        start, target = rng.choice(NETWORK), rng.randbytes(20)
        lookup, asked = simulate_disjoint(target, start, paths=3, beta=3, tables=tables)
        peers = [peer for _, peer in asked]
        assert len(peers) == len(set(peers)), "a peer was asked by two paths"
        assert lookup.termination() is Termination.CONVERGED
        assert [c.id for c in lookup.closest(3)] == true_closest(target, 3, exclude={start.id})
        assert lookup.messages == len(asked)
    with pytest.raises(ValueError, match="at least one path"):
        DisjointLookup(NETWORK[0].id, [], paths=0)


def test_one_path_of_liars_does_not_hide_the_target():
    """Liars answer with only each other (an eclipse attempt): the paths they do not
    sit on still reach the true closest peers."""
    rng = random.Random(5)
    liars = frozenset(c.id for c in rng.sample(NETWORK, 60))
    honest_found = {1: 0, 3: 0}
    for trial in range(30):
        start = rng.choice([c for c in NETWORK if c.id not in liars])
        target = rng.randbytes(20)
        want = set(true_closest(target, 20, exclude=liars | {start.id})[:1])
        for paths in (1, 3):
            lookup, _ = simulate_disjoint(target, start, paths=paths, beta=3, liars=liars)
            honest_found[paths] += bool(want & {c.id for c in lookup.closest()})
    assert honest_found[3] >= honest_found[1]
    assert honest_found[3] >= 27


def test_a_tarpit_costs_a_stall_not_a_timeout():
    """A peer that never answers frees its slot when it stalls: the lookup converges
    on the others without waiting for it, and it ranks nowhere."""
    rng = random.Random(3)
    start, target = rng.choice(NETWORK), rng.randbytes(20)
    tarpits = frozenset(true_closest(target, 2, exclude={start.id}))
    lookup, asked = simulate_disjoint(target, start, paths=1, beta=3, tarpits=tarpits)
    assert lookup.termination() is Termination.CONVERGED
    assert lookup.stalls >= 1
    assert not tarpits & {c.id for c in lookup.closest()}
    assert [c.id for c in lookup.closest(3)] == true_closest(target, 3, exclude=tarpits | {start.id})
    # a late answer from a stalled peer still counts
    single = Lookup(target, [NETWORK[1], NETWORK[2]], k=5, alpha=1, beta=1)
    (first,) = single.next_queries()
    single.on_stall(first.id)
    assert single.state(first.id) is PeerState.STALLED
    assert len(single.next_queries()) == 1
    single.on_response(first.id, [])
    assert single.state(first.id) is PeerState.QUERIED
    assert first in single.closest()


# --- routing table: BEP 5 states and diversity --------------------------------------


def test_contact_states_follow_bep5():
    table = RoutingTable(NETWORK[0].id)
    c = contact(1000)
    assert table.add_contact(c, now=0.0)
    assert table.state(c.id, now=GOOD_FOR - 1) is ContactState.GOOD
    assert table.state(c.id, now=GOOD_FOR + 1) is ContactState.QUESTIONABLE
    table.contact_queried(c.id, now=GOOD_FOR + 2)  # answered once, asked us lately: good again
    assert table.is_good(c.id, now=GOOD_FOR + 3)
    table.contact_failed(c.id, now=GOOD_FOR + 4)
    assert table.state(c.id, now=GOOD_FOR + 4) is ContactState.GOOD  # one failure is not bad yet
    table.contact_alive(c.id, now=GOOD_FOR + 5)
    table.contact_failed(c.id, now=GOOD_FOR + 6)
    table.contact_failed(c.id, now=GOOD_FOR + 7)  # two in a row: evicted
    assert table.get(c.id) is None
    assert table.closest(c.id) == []
    # a request it sends us admits nobody
    table.contact_queried(contact(1001).id, now=0.0)
    assert table.get(contact(1001).id) is None


def full_bucket(table):
    """A full bucket of ``table`` that a newcomer cannot split (the package's rule)."""
    return next(b for b in table.buckets if len(b) == table.ksize and not b.has_in_range(table.node)
                and b.depth() % 5 == 0)


def newcomer_for(bucket, *, addr=None, start=5000):
    seed = start
    while True:
        c = contact(seed, addr)
        if bucket.has_in_range(c):
            return c
        seed += 1


def test_a_bucket_holds_at_most_two_contacts_of_one_subnet_except_our_own():
    me = NETWORK[0]
    same_subnet = [contact(2000 + i, addr=f"203.0.113.{i + 1}:4000") for i in range(30)]
    table = RoutingTable(me.id, k=20)
    for c in same_subnet:
        table.add_contact(c, now=0.0)
    assert len(table) == 2 * len(table.buckets)
    assert len(table) < 10
    diverse = RoutingTable(me.id, k=20, exempt_groups={"v4:203.0.113.0/24"})
    for c in same_subnet:
        diverse.add_contact(c, now=0.0)
    assert len(diverse) == 30  # our own subnet (a LAN, loopback) is exempt
    # a full bucket refuses a third of one subnet even as a replacement candidate
    table = table_of(me, k=4)
    bucket = full_bucket(table)
    crowd = [newcomer_for(bucket, addr="198.51.100.1:4000", start=6000 + 1000 * i) for i in range(3)]
    for c in crowd[:2]:
        bucket.nodes.pop(bucket.get_nodes()[0].id)
        assert table.add_contact(c, now=0.0)
    assert not table.add_contact(crowd[2], now=0.0)
    assert crowd[2].id not in bucket.replacement_nodes


def test_a_bad_contact_is_replaced_at_once_and_a_moved_one_updated():
    me = NETWORK[0]
    table = table_of(me, k=4)
    bucket = full_bucket(table)
    bad = bucket.get_nodes()[1]
    bad.failures = 2  # BAD, not yet evicted
    newcomer = newcomer_for(bucket)
    assert table.add_contact(newcomer, now=3.0)
    assert table.get(bad.id) is None
    assert table.get(newcomer.id)
    moved = Contact(NodeInfo(peer_id=newcomer.id, public_key=newcomer.info.public_key, addrs=("10.9.9.9:1",)))
    assert table.add_contact(moved, now=4.0)
    assert table.get(newcomer.id).addrs == ("10.9.9.9:1",)
    # all GOOD: a newcomer waits as a replacement and nobody is pinged
    other = newcomer_for(bucket, start=9000)
    assert not table.add_contact(other, now=5.0)
    assert other.id in bucket.replacement_nodes
    assert not table.pending_checks
