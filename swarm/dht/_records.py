"""DHT records: kinds and stateless validation (spec "DHT", "Records").

Theory of operation. A record is a ``SignedRecord``: a value under a 32-byte key,
signed by its publisher, with an expiry (unix seconds) and a sequence number. A
storing node runs ``check_record`` and then ``RecordStore.put`` (``_storage``), which
together apply the spec's checks in this order, each with its own error code:

1. size: the record's encoding is at most ``Limits.max_record_size`` (INVALID_REQUEST);
2. expiry: ``now < expires`` (EXPIRED) and ``expires <= now + MAX_TTL`` (a day;
   INVALID_REQUEST);
3. publisher: its peer id solves the identity puzzle (INVALID_REQUEST), and it
   signed exactly these fields (BAD_SIGNATURE);
4. kind: the value is a CBOR array ``[kind, ...]`` of a known kind, the record
   expires at most that kind's ``max_ttl`` ahead, and the kind's rule holds: it
   derives ``key`` from the value and checks that the value belongs to the
   publisher (all INVALID_REQUEST); the empty value is a tombstone, has no kind and
   the cap ``TOMBSTONE_MAX_TTL`` (see below);
5. sequence and 6. capacity: ``_storage.RecordStore``.

Checks 1-4 need no state and are also what a *reader* applies to records it
gets back from FIND_VALUE (a storing node may lie).

Each kind says how far ahead its records may expire (``max_ttl``) and whether it
lives in the storage class reserved for fraud proofs (``reserved``), so that
announcements, which a server renews every minute or two, can never be stored for a
day, and a store full of announcements still takes fraud proofs.

Withdrawal: a publisher withdraws its record by publishing a tombstone, a
record with an empty value, a higher seq and the withdrawn record's expiry. A
tombstone replaces the publisher's record wherever it lands and, because it
keeps the slot until that expiry, a replica of the old record re-stored later
is refused as STALE_RECORD. Readers drop tombstones after merging. A tombstone
may expire at most ``TOMBSTONE_MAX_TTL`` ahead (the shortest kind's cap: it says
nothing a storing node could check, so it gets the least room).

Pure code: every function takes ``now`` and no clock, socket or trio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from protocol import (
    DEFAULT_LIMITS,
    MAX_RECORD_VALUE,
    PUZZLE_BITS,
    Limits,
    SignedRecord,
    cbor_decode,
    cbor_encode,
    satisfies_puzzle,
)
from protocol.errors import BadSignature, ErrorCode, ProtocolError, SwarmError

__all__ = [
    "MAX_TTL",
    "TOMBSTONE_MAX_TTL",
    "RecordKind",
    "RecordRejected",
    "CheckedRecords",
    "check_record",
    "is_tombstone",
    "latest_records",
    "merge_records",
    "record_size",
]

#: No kind may let a record expire more than a day ahead (fraud proofs use it).
MAX_TTL = 24 * 3600.0
#: How far ahead a tombstone may expire: the announcement cap (swarm.announce).
TOMBSTONE_MAX_TTL = 300.0


class RecordRejected(SwarmError):
    """A record a storing node refuses; ``code`` says which check failed."""


class RecordKind(Protocol):
    """The rules of one kind of record value (``[name, ...]`` CBOR arrays)."""

    #: The first element of the value array, e.g. ``"swarm/1/block"``.
    name: str
    #: Seconds ahead of ``now`` a record of this kind may expire at a storing node.
    max_ttl: float
    #: Stored in the class reserved for fraud proofs (``_storage``).
    reserved: bool

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
) -> RecordKind | None:
    """Checks 1-4 of the module docstring, in order. Returns the record's kind (None
    for a tombstone). Raises RecordRejected."""
    size = record_size(record)
    if size > limits.max_record_size:
        raise RecordRejected(
            f"record of {size} bytes exceeds the limit of {limits.max_record_size}", code=ErrorCode.INVALID_REQUEST
        )
    _check_expiry(record, now)
    if not satisfies_puzzle(record.publisher_id):
        raise RecordRejected(f"the publisher's peer id does not solve the identity puzzle ({PUZZLE_BITS} bits)",
                             code=ErrorCode.INVALID_REQUEST)
    try:
        record.verify_signature()
    except BadSignature as exc:
        raise RecordRejected(f"record signature: {exc}", code=ErrorCode.BAD_SIGNATURE) from None
    kind, value = _kind_of(record, kinds)
    _check_kind_ttl(record, kind, now)
    if kind is not None:
        kind.check(record, value)
    return kind


def _check_expiry(record: SignedRecord, now: float) -> None:
    if record.expires <= now:
        raise RecordRejected(f"record expired at {record.expires} (now {now:.0f})", code=ErrorCode.EXPIRED)
    if record.expires > now + MAX_TTL:
        raise RecordRejected(f"record expires more than {MAX_TTL:.0f} s ahead; publishers must renew instead",
                             code=ErrorCode.INVALID_REQUEST)


def _check_kind_ttl(record: SignedRecord, kind: RecordKind | None, now: float) -> None:
    max_ttl = TOMBSTONE_MAX_TTL if kind is None else min(kind.max_ttl, MAX_TTL)
    if record.expires > now + max_ttl:
        what = "a tombstone" if kind is None else f"a {kind.name!r} record"
        raise RecordRejected(f"{what} may expire at most {max_ttl:.0f} s ahead, not {record.expires - now:.0f} s; "
                             "its publisher renews it instead", code=ErrorCode.INVALID_REQUEST)


class CheckedRecords:
    """``check_record`` with a memo of the records that passed it, by their exact
    fields (at most ``size``, 8 MiB at the largest record size; oldest dropped first):
    a client rereads the same records on every view refresh, and each costs a
    signature verification and two CBOR decodes. For a record seen before only the
    checks that depend on ``now`` (its expiry and TTL caps) run again, in their order,
    which for a record that passed the rest gives what ``check_record`` would."""

    def __init__(self, kinds: Mapping[str, RecordKind], limits: Limits = DEFAULT_LIMITS, *,
                 size: int = 2048) -> None:
        self.kinds, self.limits, self.size = kinds, limits, size
        self._passed: dict[SignedRecord, RecordKind | None] = {}

    def check(self, record: SignedRecord, *, now: float) -> RecordKind | None:
        """As ``check_record``. Raises RecordRejected."""
        if record not in self._passed:
            kind = check_record(record, now=now, kinds=self.kinds, limits=self.limits)
            if len(self._passed) >= self.size:
                del self._passed[next(iter(self._passed))]
            self._passed[record] = kind
            return kind
        kind = self._passed[record]
        _check_expiry(record, now)
        _check_kind_ttl(record, kind, now)
        return kind


def _kind_of(record: SignedRecord, kinds: Mapping[str, RecordKind]) -> tuple[RecordKind | None, list[Any]]:
    """The kind named by the value (check 4), with the decoded value array."""
    if is_tombstone(record):
        return None, []
    try:
        value = cbor_decode(record.value, max_size=MAX_RECORD_VALUE)
    except ProtocolError as exc:
        raise RecordRejected(f"record value is not canonical CBOR: {exc}", code=ErrorCode.INVALID_REQUEST) from None
    if type(value) is not list or not value or type(value[0]) is not str:
        raise RecordRejected("record value must be a CBOR array [kind, ...]", code=ErrorCode.INVALID_REQUEST)
    kind = kinds.get(value[0])
    if kind is None:
        raise RecordRejected(f"unknown record kind {value[0][:64]!r}", code=ErrorCode.INVALID_REQUEST)
    return kind, value


def latest_records(records: Iterable[SignedRecord]) -> dict[bytes, SignedRecord]:
    """The highest-seq record of each publisher (tombstones and expired ones included)."""
    latest: dict[bytes, SignedRecord] = {}
    for record in records:
        held = latest.get(record.publisher)
        if held is None or record.seq > held.seq:
            latest[record.publisher] = record
    return latest


def merge_records(records: Iterable[SignedRecord], *, now: float) -> list[SignedRecord]:
    """What a reader makes of the records several nodes returned for one key: the
    highest-seq record of each publisher, unexpired, tombstones dropped, sorted by
    publisher. The records must already have passed ``check_record``."""
    latest = latest_records(records)
    return [r for _, r in sorted(latest.items()) if r.expires > now and not is_tombstone(r)]
