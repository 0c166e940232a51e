"""The DHT record store under arbitrary sequences of stores and time: every bound of
spec section 15 ("DHT limits") holds after every step, its accounting equals what it
holds, and a record is kept or refused exactly as a simple model of the sequence and
capacity rules says (swarm/dht/_storage.py)."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol import Limits
from protocol._messages import Announcement, SignedRecord
from protocol.errors import ErrorCode
from swarm.announce import RECORD_KINDS, block_key, encode_block_value
from swarm.dht import RecordRejected, RecordStore, StorageLimits, record_size
from swarm.dht._pool import pool_identity

NOW = 1_700_000_000
PUBLISHERS = [pool_identity(i) for i in range(6)]
GROUPS = ["v4:10.0.1.0/24", "v4:10.0.2.0/24", "v4:10.0.3.0/24", "local"]
LIMITS = StorageLimits(records=12, bytes=12 * 260, per_publisher_records=5, per_publisher_bytes=5 * 260,
                       per_group_records=8, per_group_bytes=8 * 260)
PER_KEY = 4


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.store = RecordStore(RECORD_KINDS, Limits(max_records_per_key=PER_KEY), general=LIMITS)
        self.now = NOW
        self.seq = 0

    @rule(publisher=st.integers(0, len(PUBLISHERS) - 1), block=st.integers(0, 5), group=st.sampled_from(GROUPS),
          ttl=st.integers(1, 300), seq_delta=st.integers(-2, 1), tombstone=st.booleans(), proven=st.booleans())
    def put(self, publisher, block, group, ttl, seq_delta, tombstone, proven):
        identity = PUBLISHERS[publisher]
        self.seq += 1
        seq = max(0, self.seq + seq_delta)
        expires = self.now + ttl
        key = block_key("m", block)
        if tombstone:
            record = SignedRecord.create(identity, key=key, seq=seq, expires=expires, value=b"")
        else:
            ann = Announcement(peer_id=identity.peer_id, addrs=("10.0.0.1:1",), model="m", span=(0, 6),
                               throughput=1.0, free_sessions=1, expires=expires)
            record = SignedRecord.create(identity, key=key, seq=seq, expires=expires,
                                         value=encode_block_value(block, ann))
        held = {r.publisher: r for r in self.store.get(key, now=self.now)}.get(identity.public_key)
        before = len(self.store)
        try:
            changed = self.store.put(record, now=self.now, group=group, proven=lambda _: proven)
        except RecordRejected as exc:
            assert exc.code in (ErrorCode.STALE_RECORD, ErrorCode.STORAGE_FULL), exc
            if exc.code is ErrorCode.STALE_RECORD:
                assert held is not None and seq <= held.seq and held != record
            assert len(self.store) <= before
            return
        if held is not None:
            assert held == record and not changed or seq > held.seq
        assert record in self.store.get(key, now=self.now) or record.expires <= self.now

    @rule(seconds=st.integers(0, 200))
    def wait(self, seconds):
        self.now += seconds

    @invariant()
    def bounded_and_consistent(self):
        held = [r for key in self.store.keys() for r in self.store.get(key, now=self.now)]
        assert all(r.expires > self.now for r in held)
        assert len(held) == len(self.store) <= LIMITS.records
        assert sum(record_size(r) for r in held) == self.store.usage()[1] <= LIMITS.bytes
        assert self.store.usage()[0] == len(held)
        for key in self.store.keys():
            assert len(self.store.get(key, now=self.now)) <= PER_KEY
        for identity in PUBLISHERS:
            records, size = self.store.usage(publisher=identity.public_key)
            assert records <= LIMITS.per_publisher_records and size <= LIMITS.per_publisher_bytes
            assert records == sum(r.publisher == identity.public_key for r in held)
        for group in GROUPS:
            records, size = self.store.usage(group=group)
            assert records <= LIMITS.per_group_records and size <= LIMITS.per_group_bytes


TestStoreMachine = StoreMachine.TestCase
