"""The records a DHT node holds for others, bounded so that floods cannot crowd out
honest records (spec "DHT", "Storage").

Theory of operation. ``RecordStore.put`` runs the stateless checks
(``_records.check_record``: size, expiry and the kind's TTL cap, the identity
puzzle, the signature, the kind's rule), then, per key, keeps only the latest record
of each publisher:

5. sequence: an identical copy of the held record is a no-op (republish); a record
   whose seq is not above the held one's is STALE_RECORD.

Then capacity (6). Every held record is charged to its publisher and to the
*group* of the address that sent it (``_groups``: the /24 or /64 of the
connection's remote IP; ``LOCAL_GROUP`` for our own records) in one of two
classes: the reserved class holds the kinds marked ``reserved`` (fraud proofs),
the general class everything else, so a store full of announcements still takes
fraud proofs. Each class has its own ``StorageLimits``:

- a publisher, and a group, holds at most ``per_publisher_*`` / ``per_group_*``
  records and bytes; going over is STORAGE_FULL and evicts nothing (an identity
  or a subnet cannot push out others by flooding: BEP 44's and libp2p's record
  store's per-peer bounds);
- a key holds at most ``Limits.max_records_per_key`` records, and a class at most
  ``records`` records and ``bytes`` bytes. When one of these is full, a newcomer
  may take the place of a held record only by the *replacement rule*: the victim
  comes from the group with the most records there (under that key, or in that
  class), and only if that group holds at least two more than the newcomer's group
  does (so the newcomer's group never ends up more crowded than the victim's was).
  Under a key, on a tie of one, a publisher whose liveness this node has proven
  (``proven``: it answered our PING at its address, ``_routing``) may replace a
  record of an unproven one. Within the victim's group, unproven publishers go
  first, then the most recently stored record. Otherwise the newcomer is
  STORAGE_FULL.

So a flood of fresh identities from a few subnets, however many it mints, holds
at most a fair share of a full key or store against every other subnet, and an
honest publisher from an uncrowded subnet always gets a slot.

Expired records leave at once: a heap of expiry times is drained on every access.
Pure code: every method takes ``now``; no clock, socket or trio.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from protocol import DEFAULT_LIMITS, Limits
from protocol import SignedRecord
from protocol.errors import ErrorCode

from ._records import RecordKind, RecordRejected, check_record, record_size

__all__ = ["GENERAL_LIMITS", "LOCAL_GROUP", "RESERVED_LIMITS", "RecordStore", "StorageLimits"]

#: The group our own records (``DhtNode.store`` on ourselves) are charged to.
LOCAL_GROUP = "local"

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageLimits:
    """The bounds of one storage class (spec section 15)."""

    records: int
    bytes: int
    per_publisher_records: int
    per_publisher_bytes: int
    per_group_records: int
    per_group_bytes: int

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"storage limit {name} must be positive")


#: Announcements and tombstones. A server announcing 128 blocks uses 128 records of
#: about 400 bytes; 32 MiB of records cost this process about 100 MB.
GENERAL_LIMITS = StorageLimits(records=65536, bytes=32 * MiB, per_publisher_records=512,
                               per_publisher_bytes=512 * KiB, per_group_records=2048, per_group_bytes=2 * MiB)
#: Fraud proofs: a stored proof is an index and up to 138 parts of about 2 KiB.
RESERVED_LIMITS = StorageLimits(records=8192, bytes=16 * MiB, per_publisher_records=1024,
                                per_publisher_bytes=2 * MiB, per_group_records=2048, per_group_bytes=4 * MiB)


@dataclass(slots=True, eq=False)
class _Held:
    record: SignedRecord
    size: int
    group: str
    reserved: bool
    order: int  # arrival number: higher is newer


@dataclass(slots=True)
class _Usage:
    records: int = 0
    bytes: int = 0

    def add(self, held: _Held, sign: int = 1) -> None:
        self.records += sign
        self.bytes += sign * held.size


@dataclass(slots=True)
class _Class:
    """The accounting of one storage class."""

    limits: StorageLimits
    total: _Usage = field(default_factory=_Usage)
    publishers: dict[bytes, _Usage] = field(default_factory=dict)
    groups: dict[str, _Usage] = field(default_factory=dict)
    members: dict[str, dict[tuple[bytes, bytes], _Held]] = field(default_factory=dict)  # group -> arrival order


class RecordStore:
    """The records a node holds for others: per key, the latest record of each publisher.

    Args:
        kinds: record kind name -> rules; records of unknown kinds are refused.
        limits: protocol limits (``max_record_size``, ``max_records_per_key``).
        general, reserved: the bounds of the two storage classes.
    """

    def __init__(self, kinds: Mapping[str, RecordKind], limits: Limits = DEFAULT_LIMITS, *,
                 general: StorageLimits = GENERAL_LIMITS, reserved: StorageLimits = RESERVED_LIMITS) -> None:
        self.kinds = kinds
        self.limits = limits
        self._classes = {False: _Class(general), True: _Class(reserved)}
        self._by_key: dict[bytes, dict[bytes, _Held]] = {}
        self._expiry: list[tuple[int, int, bytes, bytes]] = []  # (expires, order, key, publisher)
        self._order = 0

    # -- public ---------------------------------------------------------------------

    def put(self, record: SignedRecord, *, now: float, group: str = LOCAL_GROUP,
            proven: Callable[[bytes], bool] | None = None) -> bool:
        """Validate and store ``record``, sent from an address of ``group``;
        ``proven(peer_id)`` says whether this node has proven a publisher live.
        Returns False for an identical re-store (no-op).

        Raises:
            RecordRejected: with the code of the first failed check (module docstring).
        """
        kind = check_record(record, now=now, kinds=self.kinds, limits=self.limits)
        self._expire_due(now)
        values = self._by_key.get(record.key, {})
        held = values.get(record.publisher)
        if held is not None:
            if held.record == record:
                return False
            if record.seq <= held.record.seq:
                raise RecordRejected(f"record seq {record.seq} is not newer than the stored seq {held.record.seq}",
                                     code=ErrorCode.STALE_RECORD)
        reserved = bool(kind is not None and kind.reserved)
        new = _Held(record, record_size(record), group, reserved, self._order + 1)
        cls = self._classes[reserved]
        replaced = held if held is not None and held.reserved == reserved else None
        self._check_quota(cls.publishers.get(record.publisher), new, replaced, cls.limits.per_publisher_records,
                          cls.limits.per_publisher_bytes, "its publisher")
        self._check_quota(cls.groups.get(group), new, replaced if replaced and replaced.group == group else None,
                          cls.limits.per_group_records, cls.limits.per_group_bytes, f"its source ({group})")
        victims: list[_Held] = []
        if held is None and len(values) >= self.limits.max_records_per_key:
            victim = self._key_victim(values, new, proven or _nobody)
            if victim is None:
                raise RecordRejected(f"key holds the maximum of {self.limits.max_records_per_key} records and "
                                     f"{group} is not less crowded there than any other source",
                                     code=ErrorCode.STORAGE_FULL)
            victims.append(victim)
        records = cls.total.records + 1 - sum(v.reserved == reserved for v in victims) - (replaced is not None)
        size = cls.total.bytes + new.size - sum(v.size for v in victims if v.reserved == reserved) \
            - (replaced.size if replaced else 0)
        while records > cls.limits.records or size > cls.limits.bytes:
            victim = self._class_victim(cls, new, by_bytes=size > cls.limits.bytes,
                                        skip={id(v) for v in (*victims, held)})
            if victim is None:
                raise RecordRejected(f"this node's {'fraud-proof' if reserved else 'record'} storage is full and "
                                     f"{group} is not less crowded there than any other source",
                                     code=ErrorCode.STORAGE_FULL)
            victims.append(victim)
            records, size = records - 1, size - victim.size
        for victim in victims:
            self._remove(victim)
        if held is not None:
            self._remove(held)
        self._add(new)
        return True

    def get(self, key: bytes, *, now: float) -> list[SignedRecord]:
        """The unexpired records under ``key`` (tombstones included: a reader needs them
        to discard stale replicas), sorted by publisher."""
        self._expire_due(now)
        values = self._by_key.get(key, {})
        return [values[p].record for p in sorted(values)]

    def expire(self, *, now: float) -> int:
        """Drop every expired record; returns how many were dropped."""
        return self._expire_due(now)

    def keys(self) -> list[bytes]:
        return list(self._by_key)

    def usage(self, *, reserved: bool = False, group: str | None = None,
              publisher: bytes | None = None) -> tuple[int, int]:
        """(records, bytes) held in a class, optionally of one group or publisher."""
        cls = self._classes[reserved]
        usage = (cls.total if group is None and publisher is None
                 else cls.groups.get(group or "") if publisher is None else cls.publishers.get(publisher))
        return (usage.records, usage.bytes) if usage is not None else (0, 0)

    def group_of(self, key: bytes, publisher: bytes) -> str | None:
        """The group a held record is charged to (tests, status)."""
        held = self._by_key.get(key, {}).get(publisher)
        return None if held is None else held.group

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    # -- capacity -------------------------------------------------------------------

    @staticmethod
    def _check_quota(usage: _Usage | None, new: _Held, replaced: _Held | None, max_records: int, max_bytes: int,
                     whose: str) -> None:
        records = (usage.records if usage else 0) + 1 - (replaced is not None)
        size = (usage.bytes if usage else 0) + new.size - (replaced.size if replaced else 0)
        if records > max_records or size > max_bytes:
            raise RecordRejected(f"{whose} already holds the maximum of {max_records} records or {max_bytes} bytes "
                                 "here", code=ErrorCode.STORAGE_FULL)

    @staticmethod
    def _key_victim(values: dict[bytes, _Held], new: _Held, proven: Callable[[bytes], bool]) -> _Held | None:
        counts = Counter(h.group for h in values.values())
        mine = counts.get(new.group, 0)
        top = max(counts.values())
        pool = [h for h in values.values() if counts[h.group] == top]
        if top >= mine + 2:
            candidates = pool
        elif top == mine + 1 and proven(new.record.publisher_id):
            candidates = [h for h in pool if not proven(h.record.publisher_id)]
        else:
            return None
        if not candidates:
            return None
        return max(candidates, key=lambda h: (not proven(h.record.publisher_id), h.order))

    @staticmethod
    def _class_victim(cls: _Class, new: _Held, *, by_bytes: bool, skip: set[int]) -> _Held | None:
        if not cls.groups:
            return None

        def weight(usage: _Usage) -> int:
            return usage.bytes if by_bytes else usage.records

        top_group, top = max(cls.groups.items(), key=lambda item: weight(item[1]))
        mine = cls.groups.get(new.group)
        margin = 2 * new.size if by_bytes else 2
        if weight(top) < (weight(mine) if mine else 0) + margin:
            return None
        for held in reversed(cls.members[top_group].values()):  # newest first
            if id(held) not in skip:
                return held
        return None

    # -- bookkeeping ----------------------------------------------------------------

    def _add(self, held: _Held) -> None:
        record = held.record
        self._order = held.order
        self._by_key.setdefault(record.key, {})[record.publisher] = held
        cls = self._classes[held.reserved]
        cls.total.add(held)
        cls.publishers.setdefault(record.publisher, _Usage()).add(held)
        cls.groups.setdefault(held.group, _Usage()).add(held)
        cls.members.setdefault(held.group, {})[(record.key, record.publisher)] = held
        heapq.heappush(self._expiry, (record.expires, held.order, record.key, record.publisher))

    def _remove(self, held: _Held) -> None:
        record = held.record
        values = self._by_key[record.key]
        del values[record.publisher]
        if not values:
            del self._by_key[record.key]
        cls = self._classes[held.reserved]
        cls.total.add(held, -1)
        for table, name in ((cls.publishers, record.publisher), (cls.groups, held.group)):
            usage = table[name]
            usage.add(held, -1)
            if not usage.records:
                del table[name]
        members = cls.members[held.group]
        del members[(record.key, record.publisher)]
        if not members:
            del cls.members[held.group]

    def _expire_due(self, now: float) -> int:
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, order, key, publisher = heapq.heappop(self._expiry)
            held = self._by_key.get(key, {}).get(publisher)
            if held is not None and held.order == order:  # not replaced since
                self._remove(held)
                dropped += 1
        return dropped


def _nobody(peer_id: bytes) -> bool:
    return False
