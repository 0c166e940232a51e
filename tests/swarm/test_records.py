"""Record validation and the per-key store (swarm/dht/_records.py, _storage.py), without trio."""

from __future__ import annotations

import dataclasses

import pytest

from protocol import Announcement, Identity, Limits, SignedRecord, cbor_encode, record_statement, satisfies_puzzle
from protocol.errors import ErrorCode
from swarm.announce import BLOCK_MAX_TTL, DEFAULT_TTL, RECORD_KINDS, announcement_records, block_key, \
    encode_block_value
from swarm.dht import RecordRejected, RecordStore, check_record, is_tombstone, merge_records, record_size
from swarm.dht._pool import pool_identity

NOW = 1_700_000_000.0
ALICE, BOB = pool_identity(0), pool_identity(1)


def announcement(identity=ALICE, *, span=(2, 5), expires=int(NOW) + 240, model="tiny", free=4):
    return Announcement(peer_id=identity.peer_id, addrs=("127.0.0.1:4000",), model=model, span=span,
                        throughput=12.5, free_sessions=free, expires=expires)


def record(identity=ALICE, *, block=3, seq=1, **kw):
    ann = announcement(identity, **kw)
    return SignedRecord.create(identity, key=block_key(ann.model, block), seq=seq, expires=ann.expires,
                               value=encode_block_value(block, ann))


def rejected(code, fn, *args, **kwargs):
    with pytest.raises(RecordRejected) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def test_block_key_is_blake2b_of_cbor_triple():
    import hashlib

    expected = hashlib.blake2b(cbor_encode(["swarm/1/block", "tiny", 3]), digest_size=32).digest()
    assert block_key("tiny", 3) == expected
    assert block_key("tiny", 3) != block_key("tiny", 4) != block_key("tinier", 3)


def test_valid_announcement_records_pass():
    records = announcement_records(ALICE, announcement(), seq=7)
    assert [r.key for r in records] == [block_key("tiny", b) for b in (2, 3, 4)]
    for r in records:
        check_record(r, now=NOW, kinds=RECORD_KINDS)


def test_forged_signature_is_rejected():
    good = record()
    forged = dataclasses.replace(good, signature=BOB.sign(b"something else"))
    rejected(ErrorCode.BAD_SIGNATURE, check_record, forged, now=NOW, kinds=RECORD_KINDS)
    # Bob signs exactly the statement Alice signed, and the record still names Alice as
    # its publisher: the signature is valid, but Bob's, so it does not make the record Alice's
    statement = record_statement(key=good.key, publisher=ALICE.public_key, seq=good.seq, expires=good.expires,
                                 value=good.value)
    assert ALICE.sign(statement) == good.signature
    stolen = dataclasses.replace(good, signature=BOB.sign(statement))
    rejected(ErrorCode.BAD_SIGNATURE, check_record, stolen, now=NOW, kinds=RECORD_KINDS)


def test_tampered_fields_break_the_signature():
    good = record()
    for change in ({"seq": 2}, {"expires": good.expires + 1}, {"value": good.value[:-1] + b"\x00"},
                   {"key": block_key("tiny", 4)}):
        rejected(ErrorCode.BAD_SIGNATURE, check_record, dataclasses.replace(good, **change), now=NOW,
                 kinds=RECORD_KINDS)


def test_expired_and_too_far_expiry():
    rejected(ErrorCode.EXPIRED, check_record, record(expires=int(NOW) - 1), now=NOW, kinds=RECORD_KINDS)
    rejected(ErrorCode.EXPIRED, check_record, record(expires=int(NOW)), now=NOW, kinds=RECORD_KINDS)
    rejected(ErrorCode.INVALID_REQUEST, check_record, record(expires=int(NOW) + 10 * 24 * 3600), now=NOW,
             kinds=RECORD_KINDS)


def test_announcements_may_not_live_longer_than_their_cap():
    """Issue 10 item 5: a node accepted announcements expiring 24 h ahead."""
    assert BLOCK_MAX_TTL == 300
    assert DEFAULT_TTL == 240
    check_record(record(expires=int(NOW) + 300), now=NOW, kinds=RECORD_KINDS)
    for ahead in (301, 3600, 24 * 3600):
        error = rejected(ErrorCode.INVALID_REQUEST, check_record, record(expires=int(NOW) + ahead), now=NOW,
                         kinds=RECORD_KINDS)
        assert "at most 300 s ahead" in error.message
    # a tombstone says nothing a node could check, so it gets the shortest cap
    tomb = SignedRecord.create(ALICE, key=block_key("tiny", 3), seq=9, expires=int(NOW) + 3600, value=b"")
    rejected(ErrorCode.INVALID_REQUEST, check_record, tomb, now=NOW, kinds=RECORD_KINDS)


def test_announcements_with_unknown_keys_are_refused():
    """Issue 10 item 5: padding under an unknown announcement key was stored."""

    ann = announcement()
    body = {**ann.to_cbor(), 23: b"\x00" * 1500}
    padded = SignedRecord.create(ALICE, key=block_key("tiny", 3), seq=1, expires=ann.expires,
                                 value=cbor_encode(["swarm/1/block", 3, body]))
    assert "unknown keys 23" in rejected(ErrorCode.INVALID_REQUEST, check_record, padded, now=NOW,
                                        kinds=RECORD_KINDS).message


def test_publishers_must_solve_the_identity_puzzle():
    cheap = Identity.from_seed(bytes(32))  # its peer id does not solve the puzzle
    assert not satisfies_puzzle(cheap.peer_id)
    error = rejected(ErrorCode.INVALID_REQUEST, check_record, record(cheap), now=NOW, kinds=RECORD_KINDS)
    assert "puzzle" in error.message


def test_oversized_record():
    r = record()
    small = Limits(max_record_size=record_size(r) - 1)
    rejected(ErrorCode.INVALID_REQUEST, check_record, r, now=NOW, kinds=RECORD_KINDS, limits=small)
    check_record(r, now=NOW, kinds=RECORD_KINDS, limits=Limits(max_record_size=record_size(r)))


def test_key_derivation_rules():
    ann = announcement()
    # signed correctly, but under the key of a block outside the span
    wrong_key = SignedRecord.create(ALICE, key=block_key("tiny", 9), seq=1, expires=ann.expires,
                                    value=encode_block_value(3, ann))
    rejected(ErrorCode.INVALID_REQUEST, check_record, wrong_key, now=NOW, kinds=RECORD_KINDS)
    # block index outside the announced span (value built by hand)
    outside = cbor_encode(["swarm/1/block", 7, ann.to_cbor()])
    r = SignedRecord.create(ALICE, key=block_key("tiny", 7), seq=1, expires=ann.expires, value=outside)
    assert "outside" in rejected(ErrorCode.INVALID_REQUEST, check_record, r, now=NOW, kinds=RECORD_KINDS).message
    # Bob publishing Alice's announcement
    r = SignedRecord.create(BOB, key=block_key("tiny", 3), seq=1, expires=ann.expires,
                            value=encode_block_value(3, ann))
    assert "publisher" in rejected(ErrorCode.INVALID_REQUEST, check_record, r, now=NOW, kinds=RECORD_KINDS).message
    # record expiry differs from the announcement's
    r = SignedRecord.create(ALICE, key=block_key("tiny", 3), seq=1, expires=ann.expires - 5,
                            value=encode_block_value(3, ann))
    rejected(ErrorCode.INVALID_REQUEST, check_record, r, now=NOW, kinds=RECORD_KINDS)
    # unknown kind, non-array, non-canonical value
    for value in (cbor_encode(["other/kind", 1]), cbor_encode({"a": 1}), b"\x18\x01", b"\xff"):
        r = SignedRecord.create(ALICE, key=block_key("tiny", 3), seq=1, expires=ann.expires, value=value)
        rejected(ErrorCode.INVALID_REQUEST, check_record, r, now=NOW, kinds=RECORD_KINDS)


def test_store_sequence_rules_and_replay():
    store = RecordStore(kinds=RECORD_KINDS)
    v1, v2 = record(seq=1), record(seq=2, free=3)
    assert store.put(v2, now=NOW)
    assert store.put(v2, now=NOW) is False  # an identical republish is a no-op
    rejected(ErrorCode.STALE_RECORD, store.put, v1, now=NOW)  # replayed older record
    rejected(ErrorCode.STALE_RECORD, store.put, record(seq=2, free=1), now=NOW)  # same seq, other content
    assert store.put(record(seq=3), now=NOW)
    assert [r.seq for r in store.get(v1.key, now=NOW)] == [3]
    assert store.put(record(BOB, seq=1), now=NOW)
    assert len(store.get(v1.key, now=NOW)) == 2


def test_store_drops_expired_and_caps_keys():
    store = RecordStore(kinds=RECORD_KINDS, limits=Limits(max_records_per_key=2))
    people = [pool_identity(i) for i in range(2, 5)]
    short = record(people[0], expires=int(NOW) + 10)
    store.put(short, now=NOW)
    store.put(record(people[1]), now=NOW)
    rejected(ErrorCode.STORAGE_FULL, store.put, record(people[2]), now=NOW)
    # once the short one expires there is room, and it is no longer served
    assert store.put(record(people[2]), now=NOW + 11)
    assert {r.publisher for r in store.get(short.key, now=NOW + 11)} == {people[1].public_key,
                                                                       people[2].public_key}
    assert store.expire(now=NOW + 10_000) == 2
    assert len(store) == 0
    assert store.keys() == []


def test_tombstone_replaces_and_blocks_stale_replicas():
    store = RecordStore(kinds=RECORD_KINDS)
    live = record(seq=5)
    store.put(live, now=NOW)
    tomb = SignedRecord.create(ALICE, key=live.key, seq=6, expires=live.expires, value=b"")
    assert is_tombstone(tomb)
    store.put(tomb, now=NOW)
    rejected(ErrorCode.STALE_RECORD, store.put, live, now=NOW)
    assert store.get(live.key, now=NOW) == [tomb]
    assert merge_records(store.get(live.key, now=NOW), now=NOW) == []


def test_merge_keeps_latest_per_publisher():
    a1, a2, b1 = record(seq=1), record(seq=2), record(BOB, seq=1, expires=int(NOW) + 5)
    merged = merge_records([a2, b1, a1, a1], now=NOW)
    assert sorted(r.seq for r in merged) == [1, 2]
    assert a2 in merged
    assert b1 in merged
    assert merge_records([a1, b1], now=NOW + 6) == [a1]
    tomb = SignedRecord.create(ALICE, key=a1.key, seq=3, expires=a1.expires, value=b"")
    assert merge_records([a2, tomb, a1], now=NOW) == []


def test_checked_records_verify_a_record_once_and_its_expiry_every_time(monkeypatch):
    from swarm.dht import CheckedRecords

    verified = []
    verify = SignedRecord.verify_signature
    monkeypatch.setattr(SignedRecord, "verify_signature", lambda self: verified.append(self) or verify(self))
    checked = CheckedRecords(RECORD_KINDS, size=2)
    good = record()
    for _ in range(3):
        assert checked.check(good, now=NOW) is not None
    assert verified == [good]
    rejected(ErrorCode.EXPIRED, checked.check, good, now=good.expires)  # the memo does not outlive the expiry
    forged = dataclasses.replace(good, signature=bytes(64))  # another record: checked in full
    rejected(ErrorCode.BAD_SIGNATURE, checked.check, forged, now=NOW)
    for other in (record(block=2), record(block=4)):  # the memo holds two: the first one is dropped
        checked.check(other, now=NOW)
    checked.check(good, now=NOW)
    assert verified.count(good) == 2
