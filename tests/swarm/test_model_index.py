"""The swarm's model index in the DHT (swarm/models.py; spec section 10, "Model index"):
the record kind's key derivation and rules, its TTL cap, and the publishing bound, without
trio; the live listing is in tests/peer/test_model_info.py."""

from __future__ import annotations

import hashlib

import pytest

from protocol import ModelEntry, SignedRecord, cbor_encode
from protocol.errors import ErrorCode
from swarm.announce import RECORD_KINDS
from swarm.dht import RecordRejected, RecordStore, check_record
from swarm.dht._pool import pool_identity
from swarm.models import (
    MAX_PUBLISHERS,
    MODEL_SHARDS,
    encode_model_value,
    model_index_key,
    model_record,
    model_shard,
    should_publish,
)

NOW = 1_700_000_000.0
ENTRY = ModelEntry(model="tiny-llama@00112233aabbccdd", num_blocks=4, hidden_size=64, source="")


def rejected(code, fn, *args, **kwargs):
    with pytest.raises(RecordRejected) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value


def test_keys_and_shards_are_as_the_spec_derives_them():
    assert model_shard(ENTRY.model) == hashlib.blake2b(ENTRY.model.encode(), digest_size=32).digest()[0] % 16
    assert model_index_key(3) == hashlib.blake2b(cbor_encode(["swarm/1/model", 3]), digest_size=32).digest()
    assert len({model_index_key(s) for s in range(MODEL_SHARDS)}) == MODEL_SHARDS
    with pytest.raises(ValueError):
        model_index_key(MODEL_SHARDS)


def test_a_valid_entry_is_stored_and_a_misplaced_or_padded_one_refused():
    me = pool_identity(0)
    good = model_record(me, ENTRY, seq=1, expires=int(NOW) + 240)
    check_record(good, now=NOW, kinds=RECORD_KINDS)
    shard = model_shard(ENTRY.model)
    other_key = model_index_key((shard + 1) % MODEL_SHARDS)
    wrong_key = SignedRecord.create(me, key=other_key, seq=1, expires=good.expires, value=good.value)
    rejected(ErrorCode.INVALID_REQUEST, check_record, wrong_key, now=NOW, kinds=RECORD_KINDS)
    wrong_shard = cbor_encode(["swarm/1/model", (shard + 1) % MODEL_SHARDS, ENTRY.to_cbor()])
    rejected(ErrorCode.INVALID_REQUEST, check_record,
             SignedRecord.create(me, key=other_key, seq=1, expires=good.expires, value=wrong_shard),
             now=NOW, kinds=RECORD_KINDS)
    padded = cbor_encode(["swarm/1/model", shard, {**ENTRY.to_cbor(), 9: b"x" * 1000}])
    rejected(ErrorCode.INVALID_REQUEST, check_record,
             SignedRecord.create(me, key=good.key, seq=1, expires=good.expires, value=padded), now=NOW,
             kinds=RECORD_KINDS)
    # announcements' lifetime: 300 s at most
    rejected(ErrorCode.INVALID_REQUEST, check_record, model_record(me, ENTRY, seq=1, expires=int(NOW) + 301),
             now=NOW, kinds=RECORD_KINDS)
    assert encode_model_value(ENTRY) == good.value


def test_a_popular_model_stops_adding_publishers_but_keeps_its_own():
    store = RecordStore(kinds=RECORD_KINDS)
    listed = [model_record(pool_identity(i), ENTRY, seq=1, expires=int(NOW) + 240) for i in range(MAX_PUBLISHERS)]
    for record in listed:
        store.put(record, now=NOW)
    held = store.get(listed[0].key, now=NOW)
    assert not should_publish(held, ENTRY, pool_identity(50).public_key, now=NOW)  # enough list it already
    assert should_publish(held, ENTRY, pool_identity(0).public_key, now=NOW)  # a listed one keeps renewing
    other = ModelEntry(model="other@0123456789abcdef", num_blocks=2, hidden_size=32, source="owner/name")
    assert should_publish(held, other, pool_identity(50).public_key, now=NOW)  # other models are not crowded
    assert should_publish(held, ENTRY, pool_identity(50).public_key, now=NOW + 241)  # the entries expired
