"""64 DHT peers in one trio process on loopback, each its own Host and DhtNode,
each bootstrapped through one random earlier peer (issue 4, "Verified by tests")."""

from __future__ import annotations

import random
import time

import pytest
import trio

from protocol import Announcement
from swarm.announce import RECORD_KINDS, announcement_records
from swarm.dht import K, distance, key_target
from swarm.dht._local import start_local_peer, start_local_swarm

N = 64
MODEL = "swarm-test-model"

pytestmark = pytest.mark.slow


async def publish_blocks(publishers, rng):
    """Each publisher announces one block of its own; returns {key: publisher}."""
    expected = {}
    for block, peer in enumerate(publishers):
        ann = Announcement(peer_id=peer.peer_id, addrs=(peer.addr,), model=MODEL, span=(block, block + 1),
                           throughput=rng.uniform(1, 100), free_sessions=4, expires=int(time.time()) + 240)
        (record,) = announcement_records(peer.identity, ann, seq=1)
        assert await peer.dht.publish(record) >= K // 2
        expected[record.key] = peer
    return expected


async def lookup_all(peers, expected, limit=16):
    """Every peer gets every key; returns (successes, attempts)."""
    outcomes = []
    limiter = trio.CapacityLimiter(limit)

    async def one(peer, key, publisher):
        async with limiter:
            records = await peer.dht.get(key)
        outcomes.append([r.publisher_id for r in records] == [publisher.peer_id])

    async with trio.open_nursery() as nursery:
        for peer in peers:
            for key, publisher in expected.items():
                nursery.start_soon(one, peer, key, publisher)
    return sum(outcomes), len(outcomes)


def replication(key, live):
    """How many of the k live peers closest to ``key`` hold a record under it."""
    target = key_target(key)
    closest = sorted(live, key=lambda p: distance(p.peer_id, target))[:K]
    now = time.time()
    return sum(1 for p in closest if p.dht.records.get(key, now=now))


async def test_every_peer_finds_every_record_and_every_newcomer(nursery):
    rng = random.Random(64)
    peers = await start_local_swarm(nursery, N, kinds=RECORD_KINDS, rng=rng)
    expected = await publish_blocks(rng.sample(peers, 4), rng)
    ok, total = await lookup_all(peers, expected)
    print(f"\n{N} peers: {ok}/{total} record lookups found the record")
    assert ok == total
    for _ in range(2):
        newcomer = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(rng.choice(peers).addr,))
        found = 0
        for peer in peers:
            found += (await peer.dht.find_node(newcomer.peer_id))[0].peer_id == newcomer.peer_id
        assert found == len(peers)
        peers.append(newcomer)


async def test_lookups_survive_killing_30_percent_and_republish_restores_replication(nursery):
    rng = random.Random(30)
    peers = await start_local_swarm(nursery, N, kinds=RECORD_KINDS, rng=rng)
    publishers = rng.sample(peers, 6)
    expected = await publish_blocks(publishers, rng)
    before = {key: replication(key, peers) for key in expected}

    victims = rng.sample(peers, int(0.3 * N))
    for peer in victims:
        peer.kill()
    with trio.fail_after(10):  # dead for real: listeners and connections closed
        for peer in victims:
            await peer.stopped.wait()
    assert not any(peer.host.connections for peer in victims)
    live = [p for p in peers if p.alive]
    assert len(live) == N - len(victims)
    # What the kill left, before the lookups' write-backs (read repair) restore some
    # of it in the background: measured after them, it raced with them.
    after_kill = {key: replication(key, live) for key in expected}

    ok, total = await lookup_all(live, expected)
    rate = ok / total
    print(f"\nafter killing {len(victims)}/{N} peers: {ok}/{total} lookups succeeded ({rate:.1%})")
    assert rate >= 0.99

    for peer in publishers:
        if peer.alive:
            await peer.dht.republish()
    restored = {key: replication(key, live) for key in expected}
    for key, publisher in expected.items():
        print(f"  record of {publisher.peer_id.hex()[:8]} ({'alive' if publisher.alive else 'dead'}): "
              f"held by {before[key]}/{K} closest, {after_kill[key]} after the kill, {restored[key]} after republish")
        assert before[key] >= K - 1
        if publisher.alive:
            assert restored[key] >= K - 1
            assert restored[key] > after_kill[key]


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()
