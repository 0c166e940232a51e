"""A node low on routing-table contacts rejoins through its bootstrap addresses
(libp2p's fixLowPeers): under churn a client in DHT client mode hears of no
restarted peer, so without this its table only shrinks until its lookups find
nothing."""

from __future__ import annotations

import time

import trio

from protocol import Announcement
from swarm.announce import RECORD_KINDS, announcement_records
from swarm.dht._contacts import BAD_ADDRESS_FOR, REFUSED_ADDRESS_FOR
from swarm.dht._local import start_local_peer


async def test_a_node_whose_contacts_all_failed_rejoins_through_its_bootstrap_addresses(monkeypatch):
    monkeypatch.setattr("swarm.dht._node.REJOIN_INTERVAL", 0.0)  # the test does not wait out the rate limit
    async with trio.open_nursery() as nursery:
        a = await start_local_peer(nursery, kinds=RECORD_KINDS)
        b = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(a.addr,))
        client = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(a.addr,),
                                        host_options={"announce_addrs": ()})
        ann = Announcement(peer_id=b.peer_id, addrs=(b.addr,), model="m", span=(0, 1), throughput=1.0,
                           free_sessions=1, expires=int(time.time()) + 240)
        (record,) = announcement_records(b.identity, ann, seq=1)
        await b.dht.publish(record)

        table = client.dht.routing
        assert {a.peer_id, b.peer_id} <= {c.id for c in table.contacts()}
        for contact in table.contacts():  # every contact failed twice in a row: evicted
            for _ in range(2):
                table.contact_failed(contact.id, now=trio.current_time())
        assert len(table) == 0

        records = await client.dht.get(record.key)
        assert [r.publisher_id for r in records] == [b.peer_id]
        assert {a.peer_id, b.peer_id} <= {c.id for c in table.contacts()}
        nursery.cancel_scope.cancel()


async def test_an_address_that_failed_fast_is_skipped_for_seconds_not_a_minute():
    """A lost connection or a refused dial is cheap to retry, and under churn a
    restarted peer is back on its address within seconds: it is skipped for
    REFUSED_ADDRESS_FOR, not the minute a timed-out address (a tarpit) is."""
    async with trio.open_nursery() as nursery:
        a = await start_local_peer(nursery, kinds=RECORD_KINDS)
        b = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(a.addr,))
        client = await start_local_peer(nursery, kinds=RECORD_KINDS, bootstrap=(a.addr,),
                                        host_options={"announce_addrs": ()})
        assert client.dht.routing.get(b.peer_id) is not None
        b.kill()
        await b.stopped.wait()
        await client.dht.find_node(b.peer_id)  # asks b, whose connection is gone
        left = client.dht.contacts._bad_addrs[b.addr] - trio.current_time()
        assert 0 < left <= REFUSED_ADDRESS_FOR < BAD_ADDRESS_FOR
        nursery.cancel_scope.cancel()
