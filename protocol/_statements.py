"""Signed statements (spec/SPEC.md, "Signed statements").

Everything signed is the deterministic CBOR encoding of an array whose first
element is a domain-separation string (COSE ``Sig_structure`` / libp2p signed
envelope style), so a signature made for one purpose never verifies for another.
Tensors enter statements as H(tensor) = BLAKE2b-256 of the tensor's canonical
encoding (``WireTensor.digest()``).
"""

from __future__ import annotations

import hashlib

from ._cbor import encode
from ._identity import Identity, verify_signature

__all__ = [
    "DOMAIN_FORWARD_REQUEST",
    "DOMAIN_FORWARD_RESULT",
    "DOMAIN_RECORD",
    "DOMAIN_RECEIPT",
    "DOMAIN_RECEIPT_COUNTERSIGN",
    "DOMAIN_PUSH_REQUEST",
    "DOMAIN_PUSH_FAILURE",
    "DOMAIN_ROLLBACK",
    "push_request_statement",
    "push_failure_statement",
    "forward_request_statement",
    "forward_result_statement",
    "EMPTY_HISTORY",
    "extend_history",
    "rollback_history",
    "record_statement",
    "receipt_statement",
    "sign",
    "verify",
]

DOMAIN_FORWARD_REQUEST = "swarm/1/forward-request"
DOMAIN_FORWARD_RESULT = "swarm/1/forward-result"
DOMAIN_RECORD = "swarm/1/record"
DOMAIN_RECEIPT = "swarm/1/receipt"
DOMAIN_RECEIPT_COUNTERSIGN = "swarm/1/receipt-countersign"
DOMAIN_PUSH_REQUEST = "swarm/1/push-request"
DOMAIN_PUSH_FAILURE = "swarm/1/push-failure"
DOMAIN_ROLLBACK = "swarm/1/rollback"


def forward_request_statement(
    *,
    client: bytes,
    server: bytes,
    session: bytes,
    step: int,
    model: str,
    span: tuple[int, int],
    position: int,
    input_digest: bytes,
) -> bytes:
    """What a client signs for FORWARD (and FORWARD_ONCE, with session = nonce, step = position = 0)."""
    return encode(
        [DOMAIN_FORWARD_REQUEST, client, server, session, step, model, [span[0], span[1]], position, input_digest]
    )


def forward_result_statement(
    *,
    server: bytes,
    session: bytes,
    step: int,
    model: str,
    span: tuple[int, int],
    input_digest: bytes,
    output_digest: bytes,
    history: bytes,
) -> bytes:
    """What a server signs for every result it returns: DESIGN.md's layout, plus the
    session's input history (``extend_history`` over every input so far, this one
    included), so that a signed output can only be paired with the inputs that really
    produced it: a client cannot frame a server with a history it never sent."""
    return encode(
        [DOMAIN_FORWARD_RESULT, server, session, step, model, [span[0], span[1]], input_digest, output_digest,
         history]
    )


def push_request_statement(
    *,
    client: bytes,
    model: str,
    position: int,
    input_digest: bytes,
    timeout: float,
    route: list[list],
) -> bytes:
    """What a client signs for a PUSH step: the whole chain of the step, one entry
    ``[server, session, step, [start, end], [addrs...]]`` per hop in order, the common
    position, the first hop's input and the per-hop wait budget. Every hop checks it,
    and each pushes only to the entry after its own."""
    return encode([DOMAIN_PUSH_REQUEST, client, model, position, input_digest, timeout, route])


def push_failure_statement(
    *, reporter: bytes, session: bytes, step: int, failed: bytes, code: int, message: str
) -> bytes:
    """What a hop signs when it reports that a PUSH step could not go on: the push is
    named by the first hop's session and step; ``failed`` is the peer it blames."""
    return encode([DOMAIN_PUSH_FAILURE, reporter, session, step, failed, code, message])


#: The history of a session before its first step (and of every FORWARD_ONCE).
EMPTY_HISTORY = bytes(32)


def extend_history(history: bytes, input_digest: bytes) -> bytes:
    """BLAKE2b-256(history || H(input)): the running digest of a session's inputs."""
    return hashlib.blake2b(history + input_digest, digest_size=32).digest()


def rollback_history(history: bytes, position: int) -> bytes:
    """BLAKE2b-256(history || CBOR(["swarm/1/rollback", position])): the running digest
    once a step at ``position`` below the session's length has cut it there (spec
    section 9). The rollback's own input then extends it as any step's does, so a
    signed result names every rollback before it, and where it cut."""
    return hashlib.blake2b(history + encode([DOMAIN_ROLLBACK, position]), digest_size=32).digest()


def record_statement(*, key: bytes, publisher: bytes, seq: int, expires: int, value: bytes) -> bytes:
    """What a DHT record's publisher signs."""
    return encode([DOMAIN_RECORD, key, publisher, seq, expires, value])


def receipt_statement(
    *, client: bytes, server: bytes, handshake_hash: bytes, seq: int, work: int, countersign: bool = False
) -> bytes:
    """What a client signs to acknowledge ``work`` units received (cumulative), and the
    server countersigns with the other domain string."""
    domain = DOMAIN_RECEIPT_COUNTERSIGN if countersign else DOMAIN_RECEIPT
    return encode([domain, client, server, handshake_hash, seq, work])


def sign(identity: Identity, statement: bytes) -> bytes:
    return identity.sign(statement)


def verify(public_key: bytes, statement: bytes, signature: bytes) -> None:
    """Raises BadSignature if ``signature`` is not ``public_key``'s over ``statement``."""
    verify_signature(public_key, statement, signature)
