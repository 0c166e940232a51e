"""DHT records: validation and the per-key value store (spec "DHT", "Records").

Theory of operation. A record is a ``SignedRecord``: a value under a 32-byte key,
signed by its publisher, with an expiry (unix seconds) and a sequence number. A
storing node runs ``check_record`` and then ``RecordStore.put``, which together
apply the spec's checks in this order, each with its own error code:

1. size: the record's encoding is at most ``Limits.max_record_size`` (LIMIT_EXCEEDED);
2. expiry: ``now < expires <= now + max_ttl`` (EXPIRED, or INVALID_REQUEST when
   the expiry is too far ahead: no immortal records);
3. signature: the publisher signed exactly these fields (BAD_SIGNATURE);
4. key derivation: the value is a CBOR array ``[kind, ...]`` and the record kind
   named by ``kind`` derives ``key`` from the value and checks that the value
   belongs to the publisher (INVALID_REQUEST); the empty value is a tombstone
   and has no kind (see below);
5. sequence: ``seq`` is greater than the seq stored for the same (key,
   publisher); an identical copy of the stored record is accepted as a no-op
   (republish); anything else is STALE_RECORD;
6. capacity: a new publisher under a full key, or a new record when the store
   is full, is LIMIT_EXCEEDED (records already held are never evicted early,
   so a flood of new identities cannot push out honest records).

Checks 1-4 need no state and are also what a *reader* applies to records it
gets back from FIND_VALUE (a storing node may lie). The store keeps, per key,
only the latest record of each publisher and drops expired ones lazily on every
access and in ``expire``.

Withdrawal: a publisher withdraws its record by publishing a tombstone, a
record with an empty value, a higher seq and the withdrawn record's expiry. A
tombstone replaces the publisher's record wherever it lands and, because it
keeps the slot until that expiry, a replica of the old record re-stored later
is refused as STALE_RECORD. Readers drop tombstones after merging.

Pure code: every function takes ``now`` and no clock, socket or trio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol import (
    DEFAULT_LIMITS,
    MAX_RECORD_VALUE,
    Limits,
    SignedRecord,
    cbor_decode,
    cbor_encode,
)
from protocol.errors import BadSignature, ErrorCode, ProtocolError, SwarmError

__all__ = [
    "DEFAULT_MAX_TTL",
    "RecordKind",
    "RecordRejected",
    "RecordStore",
    "check_record",
    "is_tombstone",
    "merge_records",
    "record_size",
]

#: The farthest ahead a record may expire: one day. Publishers renew long before.
DEFAULT_MAX_TTL = 24 * 3600.0
#: Keys one node holds at most, whatever their kind (memory bound against floods).
DEFAULT_MAX_KEYS = 65536


class RecordRejected(SwarmError):
    """A record a storing node refuses; ``code`` says which check failed."""


class RecordKind(Protocol):
    """The rules of one kind of record value (``[name, ...]`` CBOR arrays)."""

    #: The first element of the value array, e.g. ``"swarm/1/block"``.
    name: str

    def check(self, record: SignedRecord, value: list[Any]) -> None:
        """Check that ``record.key`` derives from ``value`` (the decoded array) and that
        the value belongs to ``record.publisher``. Raises RecordRejected."""


def is_tombstone(record: SignedRecord) -> bool:
    """A withdrawal: the empty value."""
    return record.value == b""


def record_size(record: SignedRecord) -> int:
    """Bytes of the record's deterministic CBOR encoding (the body map)."""
    return len(cbor_encode(record.to_cbor()))


def check_record(
    record: SignedRecord,
    *,
    now: float,
    kinds: Mapping[str, RecordKind],
    limits: Limits = DEFAULT_LIMITS,
    max_ttl: float = DEFAULT_MAX_TTL,
) -> None:
    """Checks 1-4 of the module docstring, in order. Raises RecordRejected."""
    size = record_size(record)
    if size > limits.max_record_size:
        raise RecordRejected(
            f"record of {size} bytes exceeds the limit of {limits.max_record_size}", code=ErrorCode.LIMIT_EXCEEDED
        )
    if record.expires <= now:
        raise RecordRejected(f"record expired at {record.expires} (now {now:.0f})", code=ErrorCode.EXPIRED)
    if record.expires > now + max_ttl:
        raise RecordRejected(
            f"record expires more than {max_ttl:.0f} s ahead; publishers must renew instead",
            code=ErrorCode.INVALID_REQUEST,
        )
    try:
        record.verify_signature()
    except BadSignature as exc:
        raise RecordRejected(f"record signature: {exc}", code=ErrorCode.BAD_SIGNATURE) from None
    if is_tombstone(record):
        return
    try:
        value = cbor_decode(record.value, max_size=MAX_RECORD_VALUE)
    except ProtocolError as exc:
        raise RecordRejected(f"record value is not canonical CBOR: {exc}", code=ErrorCode.INVALID_REQUEST) from None
    if type(value) is not list or not value or type(value[0]) is not str:
        raise RecordRejected("record value must be a CBOR array [kind, ...]", code=ErrorCode.INVALID_REQUEST)
    kind = kinds.get(value[0])
    if kind is None:
        raise RecordRejected(f"unknown record kind {value[0][:64]!r}", code=ErrorCode.INVALID_REQUEST)
    kind.check(record, value)


def merge_records(records: Iterable[SignedRecord], *, now: float) -> list[SignedRecord]:
    """What a reader makes of the records several nodes returned for one key: the
    highest-seq record of each publisher, unexpired, tombstones dropped, sorted by
    publisher. The records must already have passed ``check_record``."""
    latest: dict[bytes, SignedRecord] = {}
    for record in records:
        held = latest.get(record.publisher)
        if held is None or record.seq > held.seq:
            latest[record.publisher] = record
    return [r for _, r in sorted(latest.items()) if r.expires > now and not is_tombstone(r)]


@dataclass(slots=True)
class RecordStore:
    """The records a node holds for others: per key, the latest record of each publisher.

    ``kinds`` maps a kind name to its rules; records of unknown kinds are refused.
    """

    kinds: Mapping[str, RecordKind]
    limits: Limits = DEFAULT_LIMITS
    max_ttl: float = DEFAULT_MAX_TTL
    max_keys: int = DEFAULT_MAX_KEYS
    _by_key: dict[bytes, dict[bytes, SignedRecord]] = field(default_factory=dict)

    def put(self, record: SignedRecord, *, now: float) -> bool:
        """Validate and store ``record``. Returns False for an identical re-store (no-op).

        Raises:
            RecordRejected: with the code of the first failed check (module docstring).
        """
        check_record(record, now=now, kinds=self.kinds, limits=self.limits, max_ttl=self.max_ttl)
        values = self._live(record.key, now)
        held = values.get(record.publisher)
        if held is not None:
            if held == record:
                return False
            if record.seq <= held.seq:
                raise RecordRejected(
                    f"record seq {record.seq} is not newer than the stored seq {held.seq}",
                    code=ErrorCode.STALE_RECORD,
                )
        elif len(values) >= self.limits.max_records_per_key:
            raise RecordRejected(
                f"key holds the maximum of {self.limits.max_records_per_key} records", code=ErrorCode.LIMIT_EXCEEDED
            )
        elif not values and len(self._by_key) >= self.max_keys:
            self.expire(now=now)
            if len(self._by_key) >= self.max_keys:
                raise RecordRejected(f"node holds the maximum of {self.max_keys} keys", code=ErrorCode.LIMIT_EXCEEDED)
        values[record.publisher] = record
        self._by_key[record.key] = values
        return True

    def get(self, key: bytes, *, now: float) -> list[SignedRecord]:
        """The unexpired records under ``key`` (tombstones included: a reader needs them
        to discard stale replicas), sorted by publisher."""
        values = self._live(key, now)
        return [values[p] for p in sorted(values)]

    def expire(self, *, now: float) -> int:
        """Drop every expired record; returns how many were dropped."""
        dropped = 0
        for key in list(self._by_key):
            before = len(self._by_key[key])
            dropped += before - len(self._live(key, now))
        return dropped

    def keys(self) -> list[bytes]:
        return list(self._by_key)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def _live(self, key: bytes, now: float) -> dict[bytes, SignedRecord]:
        values = self._by_key.get(key)
        if values is None:
            return {}
        for publisher in [p for p, r in values.items() if r.expires <= now]:
            del values[publisher]
        if not values:
            del self._by_key[key]
        return values
