"""The DHT over real loopback connections, in small swarms (swarm/dht/_node.py,
swarm/announce.py)."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import trio

from protocol import (
    Announcement,
    FindNode,
    Identity,
    Limits,
    Nodes,
    SignedRecord,
    Store,
    cbor_encode,
    decode_message,
)
from protocol.errors import DecodeError, ErrorCode, HandshakeError, RemoteError
from swarm.announce import (
    RECORD_KINDS,
    Announcer,
    announcement_records,
    block_key,
    encode_block_value,
    fetch_swarm_view,
)
from swarm.dht import BootstrapFailed, Contact, distance, key_target
from swarm.dht._local import start_local_peer, start_local_swarm
from swarm.dht._pool import POOL_SIZE, pool_identity
from swarm.errors import PeerUnreachable
from swarm.planning import plan_route


def announce(peer, *, span, model="tiny", expires=None, free=2, throughput=50.0):
    return Announcement(peer_id=peer.peer_id, addrs=(peer.addr,), model=model, span=span, throughput=throughput,
                        free_sessions=free, expires=expires or int(time.time()) + 240)


async def test_records_published_by_one_are_found_by_all_and_planned_over(nursery):
    peers = await start_local_swarm(nursery, 10, kinds=RECORD_KINDS, rng=random.Random(3))
    first, second = peers[2], peers[7]
    for peer, span in ((first, (0, 3)), (second, (3, 6))):
        for record in announcement_records(peer.identity, announce(peer, span=span), seq=1):
            assert await peer.dht.publish(record) >= 5
    for peer in peers:
        records = await peer.dht.get(block_key("tiny", 4))
        assert [r.publisher_id for r in records] == [second.peer_id]
    view = await fetch_swarm_view(peers[0].dht, "tiny", 6)
    assert set(view.servers) == {first.peer_id, second.peer_id}
    route = plan_route(view.announcements, num_blocks=6)
    assert [h.peer_id for h in route.hops] == [first.peer_id, second.peer_id]
    assert route.spans == [(0, 3), (3, 6)]


async def test_store_refuses_bad_records_over_the_wire(nursery):
    storer = await start_local_peer(nursery, kinds=RECORD_KINDS, host_options={"limits": Limits(max_record_size=400)})
    client = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(storer.addr,))
    me = client.identity
    ann = announce(client, span=(0, 2))
    good = SignedRecord.create(me, key=block_key("tiny", 1), seq=5, expires=ann.expires,
                               value=encode_block_value(1, ann))

    async def store(record):
        return await client.host.request(storer.addr, Store(record=record), peer_id=storer.peer_id)

    async def refused(record, code):
        with pytest.raises(RemoteError) as info:
            await store(record)
        assert info.value.code == code, info.value

    await refused(dataclasses.replace(good, signature=Identity.generate().sign(b"forged")), ErrorCode.BAD_SIGNATURE)
    await refused(dataclasses.replace(good, seq=6), ErrorCode.BAD_SIGNATURE)  # tampered
    stale_ann = announce(client, span=(0, 2), expires=int(time.time()) - 1)
    await refused(SignedRecord.create(me, key=block_key("tiny", 1), seq=5, expires=stale_ann.expires,
                                      value=encode_block_value(1, stale_ann)), ErrorCode.EXPIRED)
    big_ann = dataclasses.replace(ann, addrs=tuple(f"host-{i}.example.org:{4000 + i}" for i in range(8)))
    await refused(SignedRecord.create(me, key=block_key("tiny", 1), seq=5, expires=ann.expires,
                                      value=encode_block_value(1, big_ann)), ErrorCode.INVALID_REQUEST)
    await refused(SignedRecord.create(me, key=block_key("tiny", 7), seq=5, expires=ann.expires,
                                      value=encode_block_value(1, ann)), ErrorCode.INVALID_REQUEST)
    await store(good)
    await store(good)  # the same record again is fine (republish)
    older = SignedRecord.create(me, key=good.key, seq=4, expires=ann.expires, value=good.value)
    await refused(older, ErrorCode.STALE_RECORD)  # replayed older sequence
    assert storer.dht.records.get(good.key, now=time.time()) == [good]


async def test_wrong_peer_id_is_refused_at_the_handshake(nursery):
    a = await start_local_peer(nursery, kinds=RECORD_KINDS)
    b = await start_local_peer(nursery, kinds=RECORD_KINDS)
    impostor = Identity.generate().peer_id
    with pytest.raises(PeerUnreachable) as info:
        await a.host.connect(b.addr, peer_id=impostor)
    assert isinstance(info.value.__cause__, HandshakeError)
    assert a.dht.routing.get(b.peer_id) is None
    assert a.dht.routing.get(impostor) is None
    # bootstrapping through nothing reachable is a clear error
    with pytest.raises(BootstrapFailed):
        await a.dht.bootstrap(["127.0.0.1:1"])


def test_node_info_with_mismatched_id_and_key_is_rejected_by_the_decoder():
    alice, bob = Identity.generate(), Identity.generate()
    honest = cbor_encode([Nodes.TYPE, 1, {0: [{0: alice.peer_id, 1: alice.public_key, 2: ["127.0.0.1:9"]}]}])
    assert decode_message(honest)[1].nodes[0].peer_id == alice.peer_id
    lying = cbor_encode([Nodes.TYPE, 1, {0: [{0: alice.peer_id, 1: bob.public_key, 2: ["127.0.0.1:9"]}]}])
    with pytest.raises(DecodeError, match="hash of its public key"):
        decode_message(lying)


async def test_find_node_returns_a_new_peer_and_contacts_come_from_handshakes(nursery):
    peers = await start_local_swarm(nursery, 8, kinds=RECORD_KINDS, rng=random.Random(5))
    newcomer = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(peers[3].addr,))
    for peer in peers:
        found = await peer.dht.find_node(newcomer.peer_id)
        assert found[0].peer_id == newcomer.peer_id
        assert found[0].addrs == (newcomer.addr,)
    # every contact in every table is a peer we completed a handshake with
    for peer in peers:
        for contact in peer.dht.routing.contacts():
            assert contact.id in peer.host.connections or any(
                c.peer_id == contact.id for c in peer.host._all)
    reply = await peers[0].host.request(peers[1].addr, FindNode(target=newcomer.peer_id))
    assert newcomer.peer_id in [n.peer_id for n in reply.nodes]


async def test_announcer_renews_and_withdraws_on_shutdown(nursery):
    peers = await start_local_swarm(nursery, 6, kinds=RECORD_KINDS, rng=random.Random(8))
    server = peers[4]
    slots = iter(range(100, 0, -1))

    def current(expires):
        return announce(server, span=(1, 3), expires=expires, free=next(slots))

    announcer = Announcer(server.dht, server.identity, current, ttl=60)
    scope = trio.CancelScope()
    nursery.start_soon(_run_in, scope, announcer)
    with trio.fail_after(10):
        while announcer.current is None:
            await trio.sleep(0.01)
    first = (await peers[0].dht.get(block_key("tiny", 2)))[0]
    await announcer.publish_now()  # a renewal: fresh slots, higher seq
    renewed = (await peers[0].dht.get(block_key("tiny", 2)))[0]
    assert renewed.seq > first.seq
    assert renewed.value != first.value
    scope.cancel()
    with trio.fail_after(10):
        while announcer.current is not None:
            await trio.sleep(0.01)
    for peer in peers:
        assert await peer.dht.get(block_key("tiny", 1)) == []
        assert await peer.dht.get(block_key("tiny", 2)) == []
    # a replica of the withdrawn record re-stored later is refused by the holders
    holder = next(p for p in peers if p.dht.records.get(renewed.key, now=time.time()))
    with pytest.raises(RemoteError) as info:
        await peers[0].host.request(holder.addr, Store(record=renewed))
    assert info.value.code == ErrorCode.STALE_RECORD
    assert (await fetch_swarm_view(peers[1].dht, "tiny", 4)).servers == {}


async def _run_in(scope, announcer):
    with scope:
        await announcer.run()


async def test_full_bucket_keeps_good_contacts_and_replaces_failed_ones(nursery):
    """BEP 5: a newcomer waits while the bucket's contacts are GOOD; a contact whose
    requests fail twice in a row is evicted and the newest verified replacement takes
    its place."""
    a = await start_local_peer(nursery, kinds=RECORD_KINDS, k=1, paths=1)
    first_bit = a.peer_id[0] >> 7
    others = iter(pool_identity(i) for i in range(100, POOL_SIZE) if pool_identity(i).peer_id[0] >> 7 != first_bit)

    def bucket_of(peer):
        return a.dht.routing.buckets[a.dht.routing.get_bucket_for(Contact(peer.dht.node_info))]

    b = await start_local_peer(nursery, kinds=RECORD_KINDS, identity=next(others), bootstrap=(a.addr,))
    await eventually(lambda: a.dht.routing.get(b.peer_id) is not None)
    c = await start_local_peer(nursery, kinds=RECORD_KINDS, identity=next(others), bootstrap=(a.addr,))
    await eventually(lambda: c.peer_id in bucket_of(c).replacement_nodes)  # verified, waiting
    assert a.dht.routing.get(c.peer_id) is None
    assert a.dht.routing.is_good(b.peer_id, now=trio.current_time())
    b.kill()
    await b.stopped.wait()  # its listener closed: the requests below to b fail for certain
    d = await start_local_peer(nursery, kinds=RECORD_KINDS, identity=next(others), bootstrap=(a.addr,))
    await eventually(lambda: d.peer_id in bucket_of(d).replacement_nodes)
    far = bytes([(1 - first_bit) << 7]) + bytes(19)
    await a.dht.lookup_node(far)  # the request to b fails: QUESTIONABLE
    assert a.dht.routing.get(b.peer_id) is not None
    await a.dht.lookup_node(far)  # twice in a row: BAD, replaced by the newest verified candidate
    assert a.dht.routing.get(b.peer_id) is None
    assert a.dht.routing.get(d.peer_id) is not None


async def eventually(predicate, timeout=20.0):
    """Wait until ``predicate()`` holds (background verification), failing after ``timeout`` s."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def test_reads_return_the_newest_record_and_write_it_back_to_stale_holders(nursery):
    """Issue 12 item 3: a swarm view flickered because lookups stopped at whichever
    nodes answered first. A renewal (or a withdrawal) that reached only some holders is
    what every reader sees, and the reads repair the others."""
    peers = await start_local_swarm(nursery, 12, kinds=RECORD_KINDS, rng=random.Random(12))
    server = peers[5]
    key = block_key("tiny", 1)
    old = announcement_records(server.identity, announce(server, span=(1, 2), free=1), seq=1)[0]
    assert await server.dht.publish(old) == 12
    new = announcement_records(server.identity, announce(server, span=(1, 2), free=9), seq=2)[0]
    stale = [p for p in peers if p is not server][::2]
    for peer in peers:
        if peer not in stale:
            peer.dht.records.put(new, now=time.time())  # the renewal reached only these
    for reader in peers:
        assert await reader.dht.get(key) == [new]
    for reader in peers:
        await reader.dht.flush_write_backs()
    read_from = sorted(peers, key=lambda p: distance(p.peer_id, key_target(key)))[:9]  # beta x paths closest
    assert all(p.dht.records.get(key, now=time.time()) == [new] for p in read_from)
    # a withdrawal that reached half the holders: nobody sees the record any more
    tomb = SignedRecord.create(server.identity, key=key, seq=3, expires=new.expires, value=b"")
    for peer in stale:
        peer.dht.records.put(tomb, now=time.time())
    for reader in peers:
        assert await reader.dht.get(key) == []
        await reader.dht.flush_write_backs()
    assert all(p.dht.records.get(key, now=time.time()) == [tomb] for p in read_from)


async def test_the_first_publisher_hands_its_records_to_peers_that_join_later(nursery):
    """Found by the lying-announcements test on a loaded machine: the first server of a
    swarm stored its records on itself alone (nobody else was there), so until the
    republish two minutes later a lookup that did not reach it saw no such server. A
    peer that enters its routing table gets them at once (Kademlia's join rule)."""
    first = await start_local_peer(nursery, kinds=RECORD_KINDS)
    records = announcement_records(first.identity, announce(first, span=(0, 3)), seq=1)
    for record in records:
        assert await first.dht.publish(record) == 1  # alone: on itself only
    later = [await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(first.addr,)) for _ in range(4)]
    await eventually(lambda: all(first.dht.routing.get(p.peer_id) is not None for p in later))
    await first.dht.flush_write_backs()
    for peer in later:
        held = [r for record in records for r in peer.dht.records.get(record.key, now=time.time())]
        assert held == records
    for record in records:  # and a withdrawal still reaches every holder
        assert await first.dht.withdraw(record.key) == 5
