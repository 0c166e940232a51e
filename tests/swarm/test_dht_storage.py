"""Bounded DHT storage (swarm/dht/_storage.py): quotas per publisher and per source
group, the replacement rule for a full key or store, the reserved class for fraud
proofs. Pure: no trio, no sockets (the attacks over real connections are in
test_dht_attacks.py)."""

from __future__ import annotations

import hashlib

import pytest

from protocol import Limits, cbor_encode
from protocol import Announcement, SignedRecord
from protocol.errors import ErrorCode
from swarm.announce import RECORD_KINDS, block_key, encode_block_value
from swarm.dht import RecordRejected, RecordStore, StorageLimits, record_size
from swarm.dht._pool import pool_identity

NOW = 1_700_000_000.0
A, B, C = "v4:10.0.1.0/24", "v4:10.0.2.0/24", "v4:10.0.3.0/24"


def announce(identity, block=0, *, blocks=1, seq=1, expires=int(NOW) + 240, model="m"):
    ann = Announcement(peer_id=identity.peer_id, addrs=("10.0.0.1:4000",), model=model, span=(0, max(blocks, block + 1)),
                       throughput=1.0, free_sessions=1, expires=expires)
    return SignedRecord.create(identity, key=block_key(model, block), seq=seq, expires=expires,
                               value=encode_block_value(block, ann))


class ReservedKind:
    """A stand-in for the fraud-proof kinds: reserved class, a day of TTL."""

    name = "test/reserved"
    max_ttl = 24 * 3600.0
    reserved = True

    def check(self, record, value):
        if record.key != hashlib.blake2b(record.value, digest_size=32).digest():
            raise RecordRejected("bad key", code=ErrorCode.INVALID_REQUEST)


KINDS = {**RECORD_KINDS, ReservedKind.name: ReservedKind()}


def proof(identity, n):
    value = cbor_encode([ReservedKind.name, n])
    return SignedRecord.create(identity, key=hashlib.blake2b(value, digest_size=32).digest(), seq=1,
                               expires=int(NOW) + 23 * 3600, value=value)


def small(records=1000, per_publisher=1000, per_group=1000, size=1 << 30):
    return StorageLimits(records=records, bytes=size, per_publisher_records=per_publisher,
                         per_publisher_bytes=size, per_group_records=per_group, per_group_bytes=size)


def refused(store, record, group, code=ErrorCode.STORAGE_FULL, **kw):
    with pytest.raises(RecordRejected) as info:
        store.put(record, now=NOW, group=group, **kw)
    assert info.value.code == code, info.value
    return info.value


def test_one_identity_cannot_fill_the_table():
    """Issue 10 item 5: one identity filled all 65,536 keys in 156 s."""
    store = RecordStore(KINDS)
    me = pool_identity(0)
    records = [announce(me, b, blocks=600) for b in range(600)]
    for record in records[:512]:
        store.put(record, now=NOW, group=A)
    assert "its publisher already holds the maximum of 512" in refused(store, records[512], A).message
    assert len(store) == 512
    store.put(announce(pool_identity(1), 0), now=NOW, group=A)  # others from the same subnet still can


def test_one_subnet_is_capped_in_records_and_bytes():
    store = RecordStore(KINDS, general=small(per_group=100, per_publisher=40))
    people = [pool_identity(i) for i in range(3)]
    for person in people[:2]:
        for b in range(40):
            store.put(announce(person, b, blocks=40), now=NOW, group=A)
    for b in range(20):
        store.put(announce(people[2], b, blocks=40), now=NOW, group=A)
    assert "its source (v4:10.0.1.0/24) already holds the maximum of 100" in \
        refused(store, announce(people[2], 20, blocks=40), A).message
    store.put(announce(people[2], 20, blocks=40), now=NOW, group=B)  # the same publisher via another subnet
    records, size = store.usage(group=A)
    assert records == 100 and 100 * record_size(announce(people[0], 0, blocks=40)) <= size \
        <= 100 * record_size(announce(people[0], 39, blocks=40))


def test_a_full_key_takes_a_newcomer_from_a_less_crowded_subnet():
    """Issue 10 item 5: 64 identities took every slot of a block key and an honest STORE
    got LIMIT_EXCEEDED (now STORAGE_FULL) for 24 h."""
    store = RecordStore(KINDS)
    sybils = [pool_identity(i) for i in range(64)]
    for sybil in sybils:
        store.put(announce(sybil), now=NOW, group=A)
    refused(store, announce(pool_identity(64)), A)  # a 65th from the crowded subnet: no
    honest = pool_identity(200)
    assert store.put(announce(honest), now=NOW, group=B)
    held = store.get(block_key("m", 0), now=NOW)
    assert len(held) == 64 and honest.public_key in {r.publisher for r in held}
    assert sybils[-1].public_key not in {r.publisher for r in held}  # the newest of the crowded subnet left
    # the crowd cannot win the slot back, and the newcomers' subnet cannot crowd it out either
    refused(store, announce(sybils[-1]), A)
    for i in range(201, 232):
        store.put(announce(pool_identity(i)), now=NOW, group=B)
    groups = [store.group_of(block_key("m", 0), r.publisher) for r in store.get(block_key("m", 0), now=NOW)]
    assert groups.count(A) == groups.count(B) == 32
    refused(store, announce(pool_identity(232)), B)
    assert store.put(announce(pool_identity(233)), now=NOW, group=C)


def test_on_a_tie_a_publisher_proven_live_replaces_an_unproven_one():
    store = RecordStore(KINDS, Limits(max_records_per_key=4))
    strangers = [pool_identity(i) for i in range(4)]
    for stranger, group in zip(strangers, ("v4:1.0.0.0/24", "v4:2.0.0.0/24", "v4:3.0.0.0/24", "v4:4.0.0.0/24")):
        store.put(announce(stranger), now=NOW, group=group)
    live = pool_identity(10)
    refused(store, announce(live), "v4:5.0.0.0/24")  # every subnet holds one: no crowd to take from
    known = {live.peer_id, strangers[0].peer_id}
    store.put(announce(live), now=NOW, group="v4:5.0.0.0/24", proven=lambda peer_id: peer_id in known)
    publishers = {r.publisher for r in store.get(block_key("m", 0), now=NOW)}
    assert live.public_key in publishers and strangers[0].public_key in publishers  # the proven one stays
    assert strangers[3].public_key not in publishers  # the newest unproven one left


def test_a_full_store_still_takes_fraud_proofs_and_a_diverse_newcomer():
    """Issue 10 item 5: a full key table refused every new key, fraud proofs included."""
    store = RecordStore(KINDS, general=small(records=50), reserved=small(records=20))
    flood = [pool_identity(i) for i in range(5)]
    for person in flood:
        for b in range(10):
            store.put(announce(person, b, blocks=10), now=NOW, group=A)
    refused(store, announce(pool_identity(5), 0), A)
    assert store.put(proof(pool_identity(6), 1), now=NOW, group=A)  # the reserved class has room
    assert store.put(announce(pool_identity(7), 3), now=NOW, group=B)  # evicts the crowd's newest record
    assert store.usage() == (50, store.usage()[1]) and store.usage(group=A)[0] == 49
    # the reserved class obeys the same rule: a flood of junk proofs cannot keep a real one out
    for n in range(2, 21):
        store.put(proof(pool_identity(8), n), now=NOW, group=A)
    refused(store, proof(pool_identity(8), 99), A)
    assert store.put(proof(pool_identity(9), 1), now=NOW, group=C)
    assert store.usage(reserved=True)[0] == 20


def test_byte_caps_evict_by_bytes():
    record = announce(pool_identity(0))
    size = record_size(record)
    store = RecordStore(KINDS, general=small(size=10 * size + size // 2))
    for i in range(10):
        store.put(announce(pool_identity(i)), now=NOW, group=A)
    refused(store, announce(pool_identity(10)), A)
    assert store.put(announce(pool_identity(11)), now=NOW, group=B)
    assert store.usage()[1] <= 10 * size + size // 2


def test_expired_and_replaced_records_give_their_quota_back():
    store = RecordStore(KINDS, general=small(per_publisher=2))
    me = pool_identity(0)
    store.put(announce(me, 0, blocks=3, expires=int(NOW) + 10), now=NOW, group=A)
    store.put(announce(me, 1, blocks=3), now=NOW, group=A)
    refused(store, announce(me, 2, blocks=3), A)
    assert store.put(announce(me, 1, blocks=3, seq=2), now=NOW, group=B)  # a renewal replaces in place
    assert store.usage(group=A) == (1, record_size(announce(me, 0, blocks=3, expires=int(NOW) + 10)))
    assert store.put(announce(me, 2, blocks=3), now=NOW + 11, group=A)  # the first one expired
    assert store.usage(publisher=me.public_key)[0] == 2 and len(store) == 2
    assert store.expire(now=NOW + 10_000) == 2 and store.usage() == (0, 0) and store.keys() == []
