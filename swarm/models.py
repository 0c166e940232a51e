"""The swarm's model index in the DHT (spec section 10, "Model index").

Theory of operation. A client that knows no model id can still list what a swarm
serves: servers publish one small record per served model under one of
``MODEL_SHARDS`` (16) well-known keys,

    model_index_key(shard) = BLAKE2b-256(cbor(["swarm/1/model", shard]))

with ``shard = model_shard(model_id)`` = the first byte of BLAKE2b-256 of the id's
UTF-8 bytes, modulo 16. The value is ``["swarm/1/model", shard, entry]``, ``entry``
the ``ModelEntry`` map (model id, L, H, head/tokenizer source) and nothing else. A
storing node checks that the shard is the model's and the key the shard's
(``MODEL_RECORDS``); records live like announcements (240 s, renewed with them, a
300 s cap, the general storage class) and are withdrawn with them.

A key holds at most 64 records (``max_records_per_key``), so a popular model must not
crowd the others of its shard out: a server publishes its model's entry only if it
already holds one there or fewer than ``MAX_PUBLISHERS`` (8) other publishers list that
model (``should_publish``). A reader reads all 16 keys (``fetch_models``) and keeps, per
model id, the entry of the most recent publisher and how many publishers list it.
The index only names models; what a server serves is its MODEL_REPORT (section 11.3)
and its block announcements.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from protocol import DEFAULT_LIMITS, Identity, ModelEntry, SignedRecord, cbor_decode, cbor_encode
from protocol.errors import ErrorCode, ProtocolError

from .dht._records import RecordRejected, is_tombstone

if TYPE_CHECKING:
    from .dht import DhtNode

__all__ = [
    "MAX_PUBLISHERS",
    "MODEL_KIND",
    "MODEL_MAX_TTL",
    "MODEL_RECORDS",
    "MODEL_SHARDS",
    "SwarmModel",
    "decode_model_value",
    "encode_model_value",
    "fetch_models",
    "model_index_key",
    "model_record",
    "model_shard",
    "read_shard",
    "should_publish",
]

MODEL_KIND = "swarm/1/model"
MODEL_SHARDS = 16
#: The farthest ahead a storing node accepts a model index record's expiry (as blocks').
MODEL_MAX_TTL = 300.0
#: Publishers of one model beyond which a server does not add its own entry.
MAX_PUBLISHERS = 8
_ENTRY_KEYS = frozenset(f.key for f in ModelEntry.FIELDS)


def model_shard(model_id: str) -> int:
    """The index shard of ``model_id``: BLAKE2b-256(UTF-8 id)[0] mod 16."""
    return hashlib.blake2b(model_id.encode("utf-8"), digest_size=32).digest()[0] % MODEL_SHARDS


@functools.lru_cache(maxsize=MODEL_SHARDS)
def model_index_key(shard: int) -> bytes:
    """The DHT key of index shard ``shard``: BLAKE2b-256 of cbor(["swarm/1/model", shard])."""
    if not 0 <= shard < MODEL_SHARDS:
        raise ValueError(f"shard {shard} is not in 0..{MODEL_SHARDS - 1}")
    return hashlib.blake2b(cbor_encode([MODEL_KIND, shard]), digest_size=32).digest()


def encode_model_value(entry: ModelEntry) -> bytes:
    """The value of ``entry``'s index record."""
    return cbor_encode([MODEL_KIND, model_shard(entry.model), entry.to_cbor()])


def decode_model_value(items: list[Any]) -> tuple[int, ModelEntry]:
    """``(shard, entry)`` from a decoded index value. Raises RecordRejected."""
    if len(items) != 3 or items[0] != MODEL_KIND or type(items[1]) is not int:
        raise RecordRejected('a model index value is ["swarm/1/model", shard, entry]', code=ErrorCode.INVALID_REQUEST)
    if type(items[2]) is dict and not _ENTRY_KEYS.issuperset(items[2]):
        raise RecordRejected("model entry has unknown keys", code=ErrorCode.INVALID_REQUEST)
    try:
        entry = ModelEntry.from_cbor(items[2], limits=DEFAULT_LIMITS)
    except ProtocolError as exc:
        raise RecordRejected(f"invalid model entry: {exc}", code=ErrorCode.INVALID_REQUEST) from None
    return items[1], entry


class _ModelRecords:
    """The record kind of the model index (key derivation from the value)."""

    name = MODEL_KIND
    max_ttl = MODEL_MAX_TTL
    reserved = False

    def check(self, record: SignedRecord, value: list[Any]) -> None:
        shard, entry = decode_model_value(value)
        if shard != model_shard(entry.model):
            raise RecordRejected(f"model {entry.model!r} belongs in shard {model_shard(entry.model)}, not {shard}",
                                 code=ErrorCode.INVALID_REQUEST)
        if record.key != model_index_key(shard):
            raise RecordRejected("record key is not model_index_key(shard) of its value",
                                 code=ErrorCode.INVALID_REQUEST)


MODEL_RECORDS = _ModelRecords()


def model_record(identity: Identity, entry: ModelEntry, *, seq: int, expires: int) -> SignedRecord:
    """``entry``'s index record, signed by ``identity`` (the serving peer)."""
    return SignedRecord.create(identity, key=model_index_key(model_shard(entry.model)), seq=seq, expires=expires,
                               value=encode_model_value(entry))


def _entries(records: Iterable[SignedRecord], *, now: float) -> list[tuple[SignedRecord, ModelEntry]]:
    out = []
    for record in records:
        if is_tombstone(record) or record.expires <= now:
            continue
        try:
            _, entry = decode_model_value(cbor_decode(record.value, max_size=len(record.value)))
        except (RecordRejected, ProtocolError):  # another kind under this key: not ours to read
            continue
        out.append((record, entry))
    return out


def should_publish(records: Iterable[SignedRecord], entry: ModelEntry, publisher: bytes, *, now: float) -> bool:
    """Whether a server (Ed25519 key ``publisher``) adds ``entry`` to its shard, given
    the shard's records: yes if it is listed there already (it keeps renewing) or fewer
    than ``MAX_PUBLISHERS`` others list the model."""
    others = 0
    for record, listed in _entries(records, now=now):
        if listed.model != entry.model:
            continue
        if record.publisher == publisher:
            return True
        others += 1
    return others < MAX_PUBLISHERS


@dataclass(frozen=True, slots=True)
class SwarmModel:
    """A model the index lists: its latest entry and how many servers list it."""

    entry: ModelEntry
    publishers: int
    published: float  # unix seconds of the newest entry (record seqs are publish times in ms)


async def read_shard(dht: DhtNode, shard: int) -> list[SignedRecord]:
    """The records under index shard ``shard`` (checked and merged by the DHT)."""
    return await dht.get(model_index_key(shard))


async def fetch_models(dht: DhtNode, *, now: float | None = None) -> list[SwarmModel]:
    """Every model the swarm's index lists, by model id."""
    now = time.time() if now is None else now
    found: dict[str, tuple[SignedRecord, ModelEntry, set[bytes]]] = {}

    async def one(shard: int) -> None:
        for record, entry in _entries(await read_shard(dht, shard), now=now):
            if model_shard(entry.model) != shard:
                continue
            held = found.get(entry.model)
            if held is None:
                found[entry.model] = (record, entry, {record.publisher})
                continue
            held[2].add(record.publisher)
            if record.seq > held[0].seq:
                found[entry.model] = (record, entry, held[2])

    async with trio.open_nursery() as nursery:
        for shard in range(MODEL_SHARDS):
            nursery.start_soon(one, shard)
    return [SwarmModel(entry=entry, publishers=len(publishers), published=record.seq / 1000)
            for _, (record, entry, publishers) in sorted(found.items())]
