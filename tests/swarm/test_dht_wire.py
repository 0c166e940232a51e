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
from swarm.dht import BootstrapFailed
from swarm.dht._local import start_local_peer, start_local_swarm
from swarm.errors import PeerUnreachable
from swarm.planning import plan_route


def announce(peer, *, span, model="tiny", expires=None, free=2, throughput=50.0):
    return Announcement(peer_id=peer.peer_id, addrs=(peer.addr,), model=model, span=span, throughput=throughput,
                        free_sessions=free, expires=expires or int(time.time()) + 600)


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
    assert [h.peer_id for h in route.hops] == [first.peer_id, second.peer_id] and route.spans == [(0, 3), (3, 6)]


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
                                      value=encode_block_value(1, big_ann)), ErrorCode.LIMIT_EXCEEDED)
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
    assert a.dht.routing.get(b.peer_id) is None and a.dht.routing.get(impostor) is None
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
        assert found[0].peer_id == newcomer.peer_id and found[0].addrs == (newcomer.addr,)
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
    assert renewed.seq > first.seq and renewed.value != first.value
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


async def test_full_bucket_evicts_a_dead_head_and_keeps_a_live_one(nursery):
    a = await start_local_peer(nursery, kinds=RECORD_KINDS, k=1, query_timeout=2.0)
    first_bit = a.peer_id[0] >> 7

    def other_side():  # an identity in the half of the id space that does not hold a
        while True:
            identity = Identity.generate()
            if identity.peer_id[0] >> 7 != first_bit:
                return identity

    b = await start_local_peer(nursery, kinds=RECORD_KINDS, identity=other_side(), bootstrap=(a.addr,))
    c = await start_local_peer(nursery, kinds=RECORD_KINDS, identity=other_side(), bootstrap=(a.addr,))
    await trio.sleep(0.5)  # the liveness check pings b, which answers
    assert a.dht.routing.get(b.peer_id) is not None and a.dht.routing.get(c.peer_id) is None
    b.kill()
    d = await start_local_peer(nursery, kinds=RECORD_KINDS, identity=other_side(), bootstrap=(a.addr,))
    with trio.fail_after(10):
        while a.dht.routing.get(b.peer_id) is not None:
            await trio.sleep(0.05)
    # the most recently seen replacement took b's place
    assert a.dht.routing.get(d.peer_id) is not None


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()
