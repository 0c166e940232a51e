"""Block announcements in the DHT (spec "DHT", "Block announcements").

One DHT key per (model, block): ``block_key(model, b) = BLAKE2b-256(cbor(["swarm/1/block",
model, b]))``. A server serving blocks [S, E) publishes under each of those keys one
record signed by itself whose value is the deterministic CBOR array

    ["swarm/1/block", b, announcement]

with ``announcement`` the ``Announcement`` body map (peer id, addresses, model, span,
throughput, free session slots, expiry). Carrying ``b`` lets a storing node derive the
key with one hash; the record kind ``BLOCK_RECORDS`` checks that ``key ==
block_key(model, b)``, ``S <= b < E``, that the announcement's peer id is the
publisher's and that its expiry equals the record's.

Announcements live ``DEFAULT_TTL`` (240 s, as Petals' do) so that a peer that died
without withdrawing leaves every view within minutes; storing nodes refuse block
records that expire more than ``BLOCK_MAX_TTL`` (300 s) ahead, the TTL plus a minute
for clock skew. The announcement map must hold exactly the keys of ``Announcement``:
unknown keys are refused (they could only pad the record).

``Announcer`` is the server side: it publishes, renews well before expiry (after a
third of the TTL: fresh expiry, fresh free-slot count, higher seq) and withdraws on
the way out; with a ``model_entry`` it keeps the model's entry in the swarm's model
index (``swarm.models``) the same way.
``fetch_swarm_view`` is the client side: every block's value set, merged into the
latest announcement per server, with the blocks each server published records for
itself (``SwarmView.routable``: what it may be routed for).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from protocol import (
    DEFAULT_LIMITS,
    Announcement,
    Identity,
    ModelEntry,
    SignedRecord,
    cbor_decode,
    cbor_encode,
)
from protocol.errors import ErrorCode, ProtocolError, SwarmError

from .dht._records import RecordRejected
from .models import MODEL_KIND, MODEL_RECORDS, model_record, model_shard, read_shard, should_publish

if TYPE_CHECKING:
    from .dht import DhtNode

__all__ = [
    "BLOCK_KIND",
    "BLOCK_MAX_TTL",
    "DEFAULT_TTL",
    "BLOCK_RECORDS",
    "RECORD_KINDS",
    "Announcer",
    "SwarmView",
    "announcement_records",
    "block_key",
    "decode_block_value",
    "encode_block_value",
    "fetch_swarm_view",
    "next_seq",
]

log = logging.getLogger(__name__)

BLOCK_KIND = "swarm/1/block"
#: How long an announcement lives, and when its publisher renews it (a third of the way).
DEFAULT_TTL = 240.0
RENEW_FRACTION = 1 / 3
#: The farthest ahead a storing node accepts a block record's expiry.
BLOCK_MAX_TTL = 300.0
_ANNOUNCEMENT_KEYS = frozenset(f.key for f in Announcement.FIELDS)


@functools.lru_cache(maxsize=65536)
def block_key(model_id: str, block: int) -> bytes:
    """The DHT key of ``block`` of ``model_id``: BLAKE2b-256 of cbor([kind, model, block])."""
    return hashlib.blake2b(cbor_encode([BLOCK_KIND, model_id, block]), digest_size=32).digest()


def encode_block_value(block: int, announcement: Announcement) -> bytes:
    """The value of ``announcement``'s record under ``block_key(model, block)``."""
    if not announcement.span[0] <= block < announcement.span[1]:
        raise ValueError(f"block {block} is outside the announced span {announcement.span}")
    return cbor_encode([BLOCK_KIND, block, announcement.to_cbor()])


def decode_block_value(items: list[Any]) -> tuple[int, Announcement]:
    """``(block, announcement)`` from a decoded block value. Raises RecordRejected."""
    if len(items) != 3 or items[0] != BLOCK_KIND or type(items[1]) is not int:
        raise RecordRejected("a block value is [\"swarm/1/block\", block, announcement]",
                             code=ErrorCode.INVALID_REQUEST)
    if type(items[2]) is dict and not _ANNOUNCEMENT_KEYS.issuperset(items[2]):
        unknown = sorted(repr(k) for k in items[2] if k not in _ANNOUNCEMENT_KEYS)
        raise RecordRejected(f"announcement has unknown keys {', '.join(unknown)[:80]}",
                             code=ErrorCode.INVALID_REQUEST)
    try:
        announcement = Announcement.from_cbor(items[2], limits=DEFAULT_LIMITS)
    except ProtocolError as exc:
        raise RecordRejected(f"invalid announcement: {exc}", code=ErrorCode.INVALID_REQUEST) from None
    return items[1], announcement


class _BlockRecords:
    """The record kind of block announcements (key derivation and ownership)."""

    name = BLOCK_KIND
    max_ttl = BLOCK_MAX_TTL
    reserved = False

    def check(self, record: SignedRecord, value: list[Any]) -> None:
        block, ann = decode_block_value(value)
        if not ann.span[0] <= block < ann.span[1]:
            raise RecordRejected(f"block {block} is outside the announced span {ann.span}",
                                 code=ErrorCode.INVALID_REQUEST)
        if record.key != block_key(ann.model, block):
            raise RecordRejected("record key is not block_key(model, block) of its value",
                                 code=ErrorCode.INVALID_REQUEST)
        if ann.peer_id != record.publisher_id:
            raise RecordRejected("announcement peer id is not the record publisher's",
                                 code=ErrorCode.INVALID_REQUEST)
        if ann.expires != record.expires:
            raise RecordRejected("announcement expiry differs from the record's", code=ErrorCode.INVALID_REQUEST)


BLOCK_RECORDS = _BlockRecords()
#: The record kinds a DHT node of this version accepts (fraud proofs add theirs: verify).
RECORD_KINDS: Mapping[str, Any] = {BLOCK_KIND: BLOCK_RECORDS, MODEL_KIND: MODEL_RECORDS}


def next_seq(previous: int | None, now: float) -> int:
    """A sequence number above ``previous`` that also survives restarts: unix milliseconds."""
    return max(int(now * 1000), (previous or 0) + 1)


def announcement_records(identity: Identity, announcement: Announcement, *, seq: int) -> list[SignedRecord]:
    """One signed record per block of the announced span."""
    if announcement.peer_id != identity.peer_id:
        raise ValueError("an announcement is published by the peer it announces")
    return [
        SignedRecord.create(identity, key=block_key(announcement.model, b), seq=seq, expires=announcement.expires,
                            value=encode_block_value(b, announcement))
        for b in range(*announcement.span)
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class SwarmView:
    """What the DHT says about one model: the latest announcement of each server."""

    model: str
    num_blocks: int
    servers: Mapping[bytes, Announcement]
    # When each server last published (renewed) its announcement, unix seconds: record
    # seqs are publish times in milliseconds (``next_seq``), so stale entries show.
    published: Mapping[bytes, float] = field(default_factory=dict)
    # The blocks of its span under which each server's own record was found. A server
    # is routed for block b only if it published b's record itself: a record under one
    # block claiming a wider span proves nothing about the others. Servers missing
    # here (a view built by hand) are taken at their span.
    blocks: Mapping[bytes, frozenset[int]] = field(default_factory=dict)

    @property
    def announcements(self) -> list[Announcement]:
        return [self.servers[p] for p in sorted(self.servers)]

    def covering(self, block: int) -> list[Announcement]:
        return [a for a in self.announcements if a.span[0] <= block < a.span[1]]

    def routable(self, announcement: Announcement) -> list[tuple[int, int]]:
        """The maximal runs [lo, hi) of ``announcement``'s span (clipped to the model)
        that its server published records for."""
        lo, hi = max(announcement.span[0], 0), min(announcement.span[1], self.num_blocks)
        held = self.blocks.get(announcement.peer_id)
        if held is None:
            return [(lo, hi)] if lo < hi else []
        runs: list[tuple[int, int]] = []
        for b in range(lo, hi):
            if b not in held:
                continue
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        return runs


async def fetch_swarm_view(
    dht: DhtNode, model: str, num_blocks: int, *, now: float | None = None, concurrency: int = 8
) -> SwarmView:
    """Look up every block key of ``model`` (``concurrency`` lookups at a time) and keep
    each server's latest announcement (highest record seq), unexpired at ``now``."""
    now = time.time() if now is None else now
    best: dict[bytes, tuple[int, Announcement]] = {}
    found: dict[bytes, set[int]] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(block: int) -> None:
        async with limiter:
            records = await dht.get(block_key(model, block))
        for record in records:
            try:
                b, ann = decode_block_value(_decode(record.value))
            except (RecordRejected, ProtocolError):  # another kind under this key: not ours to read
                continue
            if ann.model != model or ann.expires <= now or b != block or ann.peer_id != record.publisher_id:
                continue
            found.setdefault(ann.peer_id, set()).add(block)
            held = best.get(ann.peer_id)
            if held is None or record.seq > held[0]:
                best[ann.peer_id] = (record.seq, ann)

    async with trio.open_nursery() as nursery:
        for block in range(num_blocks):
            nursery.start_soon(one, block)
    return SwarmView(model=model, num_blocks=num_blocks, servers={p: a for p, (_, a) in best.items()},
                     published={p: seq / 1000 for p, (seq, _) in best.items()},
                     blocks={p: frozenset(found.get(p, ())) for p in best})


def _decode(value: bytes) -> list[Any]:
    return cbor_decode(value, max_size=len(value))


class Announcer:
    """Keeps this server's announcement in the DHT while ``run`` runs.

    ``make_announcement(expires)`` builds the current announcement (so that free
    session slots and the span are fresh at every renewal). The records are renewed
    after ``ttl * renew_fraction`` seconds, long before they expire, and withdrawn
    (tombstones, see ``swarm.dht``) when ``run`` is cancelled, with a deadline of
    ``withdraw_timeout`` seconds. ``model_entry``, if given, is kept in the swarm's
    model index alongside (``swarm.models.should_publish`` decides whether it is added).
    """

    def __init__(
        self,
        dht: DhtNode,
        identity: Identity,
        make_announcement: Callable[[int], Announcement],
        *,
        ttl: float = DEFAULT_TTL,
        renew_fraction: float = RENEW_FRACTION,
        withdraw_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        model_entry: ModelEntry | None = None,
    ) -> None:
        self.dht, self.identity, self.make_announcement = dht, identity, make_announcement
        self.model_entry = model_entry
        self._model_key: bytes | None = None  # the index key our entry is under, once published
        self.ttl, self.renew_fraction, self.withdraw_timeout = ttl, renew_fraction, withdraw_timeout
        self.clock = clock
        self.current: Announcement | None = None
        self._seq: int | None = None
        self._keys: list[bytes] = []

    async def publish_now(self) -> dict[int, int]:
        """Publish a fresh announcement; returns, per block, how many nodes took it.
        Keys of blocks no longer announced (the span moved) are withdrawn."""
        now = self.clock()
        self._seq = next_seq(self._seq, now)
        announcement = self.make_announcement(int(math.ceil(now + self.ttl)))
        records = announcement_records(self.identity, announcement, seq=self._seq)
        new_keys = [r.key for r in records]
        for key in self._keys:
            if key not in new_keys:
                await self.dht.withdraw(key)
        replicas: dict[int, int] = {}

        async def one(block: int, record: SignedRecord) -> None:
            replicas[block] = await self.dht.publish(record)

        async with trio.open_nursery() as nursery:
            for block, record in zip(range(*announcement.span), records):
                nursery.start_soon(one, block, record)
            if self.model_entry is not None:
                nursery.start_soon(self._publish_model, self.model_entry, announcement.expires, now)
        self.current, self._keys = announcement, new_keys
        return replicas

    async def _publish_model(self, entry: ModelEntry, expires: int, now: float) -> None:
        """Add or renew our entry in the model index (section 10, "Model index")."""
        try:
            if self._model_key is None:
                held = await read_shard(self.dht, model_shard(entry.model))
                if not should_publish(held, entry, self.identity.public_key, now=now):
                    return  # enough servers list this model already
            assert self._seq is not None
            record = model_record(self.identity, entry, seq=self._seq, expires=expires)
            await self.dht.publish(record)
            self._model_key = record.key
        except SwarmError as exc:  # the index is a listing: the announcements matter more
            log.warning("publishing the model index entry failed: %s", exc)

    async def withdraw(self) -> None:
        """Withdraw every published block record (tombstones to the k closest)."""
        async with trio.open_nursery() as nursery:
            for key in [*self._keys, *([self._model_key] if self._model_key is not None else [])]:
                nursery.start_soon(self.dht.withdraw, key)
        self._keys, self.current, self._model_key = [], None, None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.publish_now()
            task_status.started()
            while True:
                await trio.sleep(self.ttl * self.renew_fraction)
                try:
                    await self.publish_now()
                except SwarmError as exc:  # the DHT may be briefly unreachable; try next round
                    log.warning("renewing the announcement failed: %s", exc)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.withdraw_timeout):
                await self.withdraw()
