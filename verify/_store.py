"""Fraud proofs in the DHT (spec "Verification", "Storage").

Theory of operation. A DHT value holds at most 2,048 bytes and a proof holds whole
hidden-state tensors, so a proof is stored in parts, all signed by the peer that
verified it (the publisher):

- the index, under ``fraud_key(accused) = BLAKE2b-256(cbor(["swarm/1/fraud",
  accused_peer_id]))``: the value ``["swarm/1/fraud", accused_peer_id, digest, size,
  parts]`` where ``digest`` is BLAKE2b-256 of the proof's CBOR (``proof_to_bytes``);
- part ``i`` under ``part_key(digest, i) = BLAKE2b-256(cbor(["swarm/1/fraud-part",
  digest, i]))``: the value ``["swarm/1/fraud-part", digest, i, bytes]``, the i-th
  ``PART_SIZE`` bytes of the proof.

Storing nodes check the key derivation of both kinds (``FRAUD_RECORD_KINDS``). A reader
takes, for each index, the parts signed by the index's publisher, joins them and keeps
the proof only if its BLAKE2b-256 equals ``digest``: parts forged by others under
the same keys are ignored, and a forged proof still has to pass ``verify_proof``.
Every reader verifies a fetched proof before acting on it; the DHT is only transport.
Proofs over ``MAX_STORED_PROOF`` bytes are gossiped but not stored.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

import trio

from protocol import (
    DEFAULT_LIMITS,
    FraudProof,
    Identity,
    Limits,
    SignedRecord,
    cbor_decode,
    cbor_encode,
    peer_id_of,
)
from protocol.errors import ErrorCode, ProtocolError, SwarmError
from swarm.announce import RECORD_KINDS
from swarm.dht import DhtNode, RecordRejected

from ._proofs import proof_digest, proof_from_bytes, proof_to_bytes

__all__ = [
    "FRAUD_KIND",
    "FRAUD_PART_KIND",
    "FRAUD_RECORD_KINDS",
    "MAX_STORED_PROOF",
    "PART_SIZE",
    "PROOF_MAX_TTL",
    "PROOF_TTL",
    "fetch_proofs",
    "fraud_key",
    "part_key",
    "proof_records",
    "publish_proof",
    "record_kinds",
]

FRAUD_KIND = "swarm/1/fraud"
FRAUD_PART_KIND = "swarm/1/fraud-part"
#: Proof bytes per part: the value's other fields and CBOR heads fit in the rest of 2,048.
PART_SIZE = 1900
#: Largest proof stored in the DHT (about 140 parts); bigger ones travel by gossip only.
MAX_STORED_PROOF = 256 * 1024
MAX_PARTS = math.ceil(MAX_STORED_PROOF / PART_SIZE)
#: Proof records live this long; holders re-sign them before. Storing nodes accept
#: proof records that expire up to PROOF_MAX_TTL ahead, and keep them in the storage
#: class reserved for proofs (swarm.dht._storage), which announcements cannot fill.
PROOF_TTL = 23 * 3600.0
PROOF_MAX_TTL = 24 * 3600.0


def fraud_key(accused_peer_id: bytes) -> bytes:
    return hashlib.blake2b(cbor_encode([FRAUD_KIND, accused_peer_id]), digest_size=32).digest()


def part_key(digest: bytes, index: int) -> bytes:
    return hashlib.blake2b(cbor_encode([FRAUD_PART_KIND, digest, index]), digest_size=32).digest()


def _rejected(message: str) -> RecordRejected:
    return RecordRejected(message, code=ErrorCode.INVALID_REQUEST)


class _FraudIndex:
    name = FRAUD_KIND
    max_ttl = PROOF_MAX_TTL
    reserved = True

    def check(self, record: SignedRecord, value: list[Any]) -> None:
        if len(value) != 5:
            raise _rejected('a fraud index is ["swarm/1/fraud", accused, digest, size, parts]')
        _, accused, digest, size, parts = value
        if type(accused) is not bytes or len(accused) != 20 or type(digest) is not bytes or len(digest) != 32:
            raise _rejected("a fraud index names a 20-byte peer id and a 32-byte digest")
        if type(size) is not int or not 0 < size <= MAX_STORED_PROOF or parts != math.ceil(size / PART_SIZE):
            raise _rejected(f"a stored proof has 1..{MAX_STORED_PROOF} bytes in ceil(size / {PART_SIZE}) parts")
        if record.key != fraud_key(accused):
            raise _rejected("record key is not fraud_key(accused) of its value")


class _FraudPart:
    name = FRAUD_PART_KIND
    max_ttl = PROOF_MAX_TTL
    reserved = True

    def check(self, record: SignedRecord, value: list[Any]) -> None:
        if len(value) != 4:
            raise _rejected('a fraud part is ["swarm/1/fraud-part", digest, index, bytes]')
        _, digest, index, data = value
        if type(digest) is not bytes or len(digest) != 32 or type(index) is not int or not 0 <= index < MAX_PARTS:
            raise _rejected("a fraud part names a 32-byte digest and an index below the part limit")
        if type(data) is not bytes or not 0 < len(data) <= PART_SIZE:
            raise _rejected(f"a fraud part holds 1..{PART_SIZE} bytes")
        if record.key != part_key(digest, index):
            raise _rejected("record key is not part_key(digest, index) of its value")


#: The record kinds this package adds to a DHT node.
FRAUD_RECORD_KINDS: Mapping[str, Any] = {FRAUD_KIND: _FraudIndex(), FRAUD_PART_KIND: _FraudPart()}


def record_kinds(base: Mapping[str, Any] = RECORD_KINDS) -> dict[str, Any]:
    """``base`` (block announcements by default) plus the fraud proof kinds: what
    every DHT node of a verifying swarm passes as ``kinds``."""
    return {**base, **FRAUD_RECORD_KINDS}


def proof_records(identity: Identity, proof: FraudProof, *, now: float, ttl: float = PROOF_TTL
                  ) -> list[SignedRecord]:
    """The index and part records of ``proof``, signed by ``identity``.

    Raises:
        ValueError: the proof is larger than ``MAX_STORED_PROOF``.
    """
    data = proof_to_bytes(proof)
    if len(data) > MAX_STORED_PROOF:
        raise ValueError(f"a proof of {len(data)} bytes is too large for the DHT (max {MAX_STORED_PROOF})")
    digest = hashlib.blake2b(data, digest_size=32).digest()
    seq, expires = int(now * 1000), int(now + ttl)
    parts = [data[i:i + PART_SIZE] for i in range(0, len(data), PART_SIZE)]
    records = [SignedRecord.create(identity, key=fraud_key(peer_id_of(proof.accused)), seq=seq, expires=expires,
                                     value=cbor_encode([FRAUD_KIND, peer_id_of(proof.accused), digest, len(data),
                                                        len(parts)]))]
    records += [SignedRecord.create(identity, key=part_key(digest, i), seq=seq, expires=expires,
                                      value=cbor_encode([FRAUD_PART_KIND, digest, i, part]))
                for i, part in enumerate(parts)]
    return records


async def publish_proof(dht: DhtNode, proof: FraudProof, *, now: float | None = None, ttl: float = PROOF_TTL,
                        concurrency: int = 8) -> int:
    """Publish ``proof`` (parts first, then the index). Returns how many nodes hold the index."""
    now = time.time() if now is None else now
    index, *parts = proof_records(dht.host.identity, proof, now=now, ttl=ttl)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(record: SignedRecord) -> None:
        async with limiter:
            await dht.publish(record)

    async with trio.open_nursery() as nursery:
        for record in parts:
            nursery.start_soon(one, record)
    return await dht.publish(index)


async def fetch_proofs(dht: DhtNode, accused_peer_id: bytes, *, limits: Limits = DEFAULT_LIMITS,
                       concurrency: int = 8) -> list[FraudProof]:
    """Every proof against ``accused_peer_id`` stored in the DHT that reassembles to its
    digest (not yet verified: the caller verifies)."""
    indexes: dict[bytes, tuple[bytes, int, int]] = {}  # digest -> (publisher, size, parts)
    for record in await dht.get(fraud_key(accused_peer_id)):
        try:
            _, accused, digest, size, parts = cbor_decode(record.value, max_size=len(record.value))
        except (ProtocolError, ValueError, TypeError):
            continue
        if accused == accused_peer_id and digest not in indexes:
            indexes[digest] = (record.publisher, size, parts)
    proofs: list[FraudProof] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one(digest: bytes, publisher: bytes, size: int, count: int) -> None:
        chunks: list[bytes | None] = [None] * count

        async def part(i: int) -> None:
            async with limiter:
                records = await dht.get(part_key(digest, i))
            for record in records:
                if record.publisher == publisher:
                    try:
                        _, _, _, data = cbor_decode(record.value, max_size=len(record.value))
                    except (ProtocolError, ValueError, TypeError):
                        return
                    chunks[i] = data if type(data) is bytes else None

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(part, i)
        if any(c is None for c in chunks):
            return
        data = b"".join(chunks)  # type: ignore[arg-type]
        if len(data) != size or hashlib.blake2b(data, digest_size=32).digest() != digest:
            return
        try:
            proof = proof_from_bytes(data, limits=limits)
        except SwarmError:
            return
        if proof_digest(proof) == digest:
            proofs.append(proof)

    async with trio.open_nursery() as nursery:
        for digest, (publisher, size, count) in indexes.items():
            nursery.start_soon(one, digest, publisher, size, count)
    return proofs
