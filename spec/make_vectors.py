"""Make spec/vectors/*.json and the generated tables of spec/SPEC.md, deterministically.

    python spec/make_vectors.py            # rewrite the vector files
    python spec/make_vectors.py --check    # exit 1 if any file would change

Every key, nonce and tensor here is fixed, and Ed25519 signatures are deterministic,
so the output is byte-identical on every run. tests/spec/ replays the files exactly
and checks that SPEC.md's generated tables equal ``registry_markdown()`` and the
state tables in the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import (  # noqa: E402
    derive_seed,
    EMPTY_HISTORY,
    MESSAGE_TYPES,
    SESSION_TRANSITIONS,
    Announcement,
    CloseSession,
    CreditQuery,
    CreditReport,
    Error,
    FindNode,
    FindValue,
    Forward,
    ForwardEvidence,
    ForwardOnce,
    ForwardOnceResult,
    ForwardResult,
    FraudProof,
    FraudProofAck,
    FraudProofNotice,
    Identity,
    Message,
    NextPing,
    NodeInfo,
    Nodes,
    OpenSession,
    Ping,
    Pong,
    Push,
    PushFailure,
    PushHop,
    HopOutput,
    Pushed,
    PushResult,
    PushResultAck,
    Receipt,
    ReceiptAck,
    ReceiptRecord,
    Role,
    SessionClosed,
    SessionOpened,
    SignedRecord,
    Store,
    Stored,
    Value,
    cbor_encode as encode,
    encode_message,
    extend_history,
    forward_request_statement,
    forward_result_statement,
    push_failure_statement,
    push_onward,
    push_request_statement,
    receipt_statement,
    SessionState,
    sign_push,
    sign_push_failure,
    sign_push_output,
)
# The generator also reads codec internals (field codecs, codebooks, the Noise layer):
# it writes the spec's generated tables and byte-exact transcripts, which no public API
# exposes.
from protocol._fields import Bytes, Field, Float, ListOf, Span, Struct, TensorCodec  # noqa: E402

VECTORS = ROOT / "spec" / "vectors"

# Identity.derive of these labels (the counters are derive_counter's): both peer ids
# solve the identity puzzle, as every key a peer accepts must.
CLIENT = Identity.from_seed(derive_seed(bytes(range(32)), 1682))
SERVER = Identity.from_seed(derive_seed(bytes(range(32, 64)), 1160))
#: The second hop of the PUSH examples (push messages carry no identity puzzle check).
SERVER2 = Identity.from_seed(bytes(range(64, 96)))


# --- JSON form of message values (bytes as lowercase hex) ------------------------------


def value_to_json(value: Any, codec: Any) -> Any:
    if isinstance(codec, Bytes):
        return value.hex()
    if isinstance(codec, ListOf):
        return [value_to_json(v, codec.item) for v in value]
    if isinstance(codec, Struct):
        return fields_to_json(value, value.FIELDS)
    if isinstance(codec, Span):
        return list(value)
    if isinstance(codec, TensorCodec):
        t = {"dtype": value.dtype, "shape": list(value.shape), "data": value.data.hex()}
        if value.absmax is not None:
            t["absmax"] = value.absmax.hex()
            t["blocksize"] = value.blocksize
        return t
    return value


def value_from_json(obj: Any, codec: Any) -> Any:
    if isinstance(codec, Bytes):
        return bytes.fromhex(obj)
    if isinstance(codec, ListOf):
        return tuple(value_from_json(v, codec.item) for v in obj)
    if isinstance(codec, Struct):
        return codec.cls(**fields_from_json(obj, codec.cls.FIELDS))
    if isinstance(codec, Span):
        return tuple(obj)
    if isinstance(codec, TensorCodec):
        from protocol import WireTensor

        absmax = bytes.fromhex(obj["absmax"]) if "absmax" in obj else None
        return WireTensor(dtype=obj["dtype"], shape=tuple(obj["shape"]), data=bytes.fromhex(obj["data"]),
                          absmax=absmax, blocksize=obj.get("blocksize"))
    if isinstance(codec, Float):
        return float(obj)
    return obj


def fields_to_json(obj: Any, fields: tuple[Field, ...]) -> dict[str, Any]:
    out = {}
    for f in fields:
        value = getattr(obj, f.name)
        if value is not None or not f.optional:
            out[f.name] = value_to_json(value, f.codec)
    return out


def fields_from_json(obj: dict[str, Any], fields: tuple[Field, ...]) -> dict[str, Any]:
    return {f.name: value_from_json(obj[f.name], f.codec) if f.name in obj else None for f in fields}


def message_from_json(entry: dict[str, Any]) -> tuple[int, Message]:
    """(envelope id, message) of one entry of messages.json."""
    cls = MESSAGE_TYPES[entry["type"]]
    return entry["id"], cls(**fields_from_json(entry["fields"], cls.FIELDS))


# --- sample messages ------------------------------------------------------------------


def _tensor(values: list[float], shape: tuple[int, ...], dtype: str = "f32") -> Any:
    import torch

    from protocol import encode_tensor

    return encode_tensor(torch.tensor(values, dtype=torch.float32).reshape(shape), dtype)


def sample_messages() -> list[tuple[int, Message]]:
    """(envelope id, message): one of every type, each response with its request's id."""
    session = bytes(range(16))
    model = "tiny-llama@00112233aabbccdd"
    span = (0, 4)
    client_node = NodeInfo(peer_id=CLIENT.peer_id, public_key=CLIENT.public_key, addrs=("127.0.0.1:31337",))
    server_node = NodeInfo(peer_id=SERVER.peer_id, public_key=SERVER.public_key, addrs=("[::1]:4000", "10.0.0.2:4000"))
    announcement = Announcement(peer_id=SERVER.peer_id, addrs=("[::1]:4000",), model=model, span=span,
                                  throughput=123.5, free_sessions=7, expires=1_900_000_000)
    record = SignedRecord.create(SERVER, key=bytes(32), seq=3, expires=1_900_000_000, value=announcement.to_bytes())
    hidden = _tensor([0.5, -1.0, 2.0, 0.0], (1, 1, 4))
    out = _tensor([1.5, -0.25, 0.125, 3.0], (1, 1, 4))
    req_sig = CLIENT.sign(forward_request_statement(
        client=CLIENT.peer_id, server=SERVER.peer_id, session=session, step=0, model=model, span=span,
        position=0, input_digest=hidden.digest()))
    res_sig = SERVER.sign(forward_result_statement(
        server=SERVER.peer_id, session=session, step=0, model=model, span=span,
        input_digest=hidden.digest(), output_digest=out.digest(),
        history=extend_history(EMPTY_HISTORY, hidden.digest())))
    hh = bytes(range(32))
    receipt = ReceiptRecord(client=CLIENT.public_key, server=SERVER.public_key, handshake_hash=hh, seq=5, work=40,
                              client_signature=CLIENT.sign(receipt_statement(
                                  client=CLIENT.public_key, server=SERVER.public_key, handshake_hash=hh,
                                  seq=5, work=40)))
    signed = dataclasses.replace(receipt, server_signature=SERVER.sign(receipt.statement(countersign=True)))
    proof = FraudProof(accused=SERVER.public_key, client=CLIENT.public_key, model=model, span=span, session=session,
                         requests=(ForwardEvidence(step=0, position=0, hidden=hidden, signature=req_sig),),
                         output=out, output_signature=res_sig)
    push, pushed_on, result, failure = sample_push(model, hidden)
    return [
        (7, Error(code=202, message="busy: 3 sessions queued", retry_after=0.5)),
        (1, Ping()),
        (1, Pong()),
        (2, FindNode(target=SERVER.peer_id)),
        (2, Nodes(nodes=(client_node, server_node))),
        (3, FindValue(key=bytes(32))),
        (3, Value(records=(record,), nodes=(server_node,))),
        (4, Store(record=record)),
        (4, Stored()),
        (5, OpenSession(model=model, span=span, max_length=2048, wire_dtype="f32")),
        (5, SessionOpened(session=session)),
        (6, Forward(session=session, step=0, position=0, hidden=hidden, signature=req_sig)),
        (6, ForwardResult(session=session, step=0, hidden=out, signature=res_sig)),
        (8, ForwardOnce(nonce=session, model=model, span=span, hidden=hidden, signature=req_sig)),
        (8, ForwardOnceResult(hidden=out, signature=res_sig)),
        (9, CloseSession(session=session)),
        (9, SessionClosed()),
        (10, Receipt(receipt=receipt)),
        (10, ReceiptAck(receipt=signed)),
        (11, CreditQuery()),
        (11, CreditReport(records=(signed,))),
        (12, FraudProofNotice(proof=proof)),
        (12, FraudProofAck(accepted=True)),
        (13, push),
        (13, Pushed()),
        (14, pushed_on),
        (14, Pushed()),
        (15, result),
        (15, PushResultAck()),
        (16, failure),
        (16, PushResultAck()),
    ]


def sample_push(model: str, hidden: Any) -> tuple[Push, Push, PushResult, PushResult]:
    """A two-hop PUSH step made with the reference exchange: the client's PUSH to the
    first hop (SERVER, blocks 0:2), the PUSH it hands on to the second (SERVER2, 2:4),
    the second hop's PUSH_RESULT, and a failure report of the first hop."""
    states = [SessionState(client=CLIENT.peer_id, server=server.peer_id, session=bytes([i + 1]) * 16, model=model,
                           span=span, max_length=64) for i, (server, span) in enumerate(((SERVER, (0, 2)),
                                                                                         (SERVER2, (2, 4))))]
    for state in states:
        state.open()
    push = sign_push(CLIENT, states, [("10.0.0.2:4000",), ("10.0.0.3:4000",)], hidden, timeout=2.5)
    server_states = [dataclasses.replace(s, transcript=[]) for s in states]
    first = sign_push_output(SERVER, server_states[0], push, _tensor([1.0, 0.5, -0.5, 0.25], (1, 1, 4)))
    pushed_on = push_onward(push, first)
    assert isinstance(pushed_on, Push)
    second = sign_push_output(SERVER2, server_states[1], pushed_on, _tensor([0.0, 2.0, -1.5, 4.0], (1, 1, 4)))
    result = push_onward(pushed_on, second)
    assert isinstance(result, PushResult)
    failure = sign_push_failure(SERVER, push, outputs=(first,), failed=SERVER2.peer_id, code=500,
                                message="peer unreachable")
    return push, pushed_on, result, failure


def message_vectors() -> dict[str, Any]:
    entries = []
    for request_id, msg in sample_messages():
        entries.append({"name": type(msg).__name__, "type": msg.TYPE, "id": request_id,
                        "fields": fields_to_json(msg, msg.FIELDS), "cbor_hex": encode_message(msg, request_id).hex()})
    return {"description": "One encoded example of every message type; decode(cbor_hex) must equal fields, "
                           "encode(fields) must equal cbor_hex. structures: the same for structures carried "
                           "in record values (a block record's value is block_value_hex).",
            "messages": entries, "structures": structure_vectors()}


def structure_vectors() -> list[dict[str, Any]]:
    """Structures that travel inside record values rather than as message fields."""
    announcement = Announcement(
        peer_id=SERVER.peer_id, addrs=("10.0.0.2:4000",), model="tiny-llama@00112233aabbccdd", span=(0, 4),
        throughput=123.5, free_sessions=7, expires=1_900_000_000,
        next_pings=tuple(sorted((NextPing(peer_id=CLIENT.peer_id, rtt=0.0125),
                                 NextPing(peer_id=bytes(range(20)), rtt=0.25)), key=lambda p: p.peer_id)))
    return [{"name": "Announcement", "fields": fields_to_json(announcement, Announcement.FIELDS),
             "cbor_hex": announcement.to_bytes().hex(),
             "block": 2, "block_value_hex": encode(["swarm/1/block", 2, announcement.to_cbor()]).hex()}]


def statement_vectors() -> dict[str, Any]:
    session = bytes(range(16))
    req = forward_request_statement(client=CLIENT.peer_id, server=SERVER.peer_id, session=session, step=2,
                                    model="m@0", span=(3, 9), position=17, input_digest=bytes(32))
    history = EMPTY_HISTORY
    for digest in (bytes([1]) * 32, bytes([2]) * 32, bytes(32)):  # the inputs of steps 0, 1 and 2
        history = extend_history(history, digest)
    res = forward_result_statement(server=SERVER.peer_id, session=session, step=2, model="m@0", span=(3, 9),
                                   input_digest=bytes(32), output_digest=bytes([0xFF]) * 32, history=history)
    push = push_request_statement(client=CLIENT.peer_id, model="m@0", position=17, input_digest=bytes(32),
                                  timeout=2.5, route=[[SERVER.peer_id, session, 2, [3, 9], ["10.0.0.2:4000"]],
                                                      [SERVER2.peer_id, bytes([7]) * 16, 0, [9, 12], []]])
    failure = push_failure_statement(reporter=SERVER.peer_id, session=session, step=2, failed=SERVER2.peer_id,
                                     code=500, message="peer unreachable")
    histories, history = [], EMPTY_HISTORY
    for digest in (bytes([1]) * 32, bytes([2]) * 32, bytes(32)):
        nxt = extend_history(history, digest)
        histories.append({"previous": history.hex(), "input_digest": digest.hex(), "history": nxt.hex()})
        history = nxt
    return {
        "description": "Ed25519 seeds are hex; statement_hex is exactly the signed bytes; histories are "
                       "consecutive steps of extend_history (the forward-result statement's last element).",
        "histories": histories,
        "identities": [
            {"name": "client", "seed": CLIENT.seed.hex(), "public_key": CLIENT.public_key.hex(),
             "peer_id": CLIENT.peer_id.hex()},
            {"name": "server", "seed": SERVER.seed.hex(), "public_key": SERVER.public_key.hex(),
             "peer_id": SERVER.peer_id.hex()},
            {"name": "server2", "seed": SERVER2.seed.hex(), "public_key": SERVER2.public_key.hex(),
             "peer_id": SERVER2.peer_id.hex()},
        ],
        "statements": [
            {"name": "forward-request", "signer": "client", "statement_hex": req.hex(),
             "signature": CLIENT.sign(req).hex()},
            {"name": "forward-result", "signer": "server", "statement_hex": res.hex(),
             "signature": SERVER.sign(res).hex()},
            {"name": "push-request", "signer": "client", "statement_hex": push.hex(),
             "signature": CLIENT.sign(push).hex()},
            {"name": "push-failure", "signer": "server", "statement_hex": failure.hex(),
             "signature": SERVER.sign(failure).hex()},
        ],
    }


def identity_vectors() -> dict[str, Any]:
    """The identity puzzle (spec section 3): derived seeds, peer ids, puzzle hashes."""
    from protocol import PUZZLE_BITS, PUZZLE_DOMAIN, derive_counter, peer_id_of, puzzle_hash, satisfies_puzzle

    entries = []
    for label in (bytes(range(32)), bytes(range(32, 64)), bytes([0x01]) * 32, bytes([0x02]) * 32):
        counter = derive_counter(label)
        for tried in (counter - 1, counter):  # the last candidate that fails, then the solution
            identity = Identity.from_seed(derive_seed(label, tried))
            entries.append({"label": label.hex(), "counter": tried, "seed": identity.seed.hex(),
                            "public_key": identity.public_key.hex(), "peer_id": peer_id_of(identity.public_key).hex(),
                            "puzzle_hash": puzzle_hash(identity.peer_id).hex(),
                            "solves": satisfies_puzzle(identity.peer_id)})
    return {
        "description": "Identity puzzle: a peer id is valid iff BLAKE2b-256(domain || peer_id) starts with "
                       "'bits' zero bits. seed = BLAKE2b-256('swarm/1/derive-seed:' || label || counter as 4 "
                       "big-endian bytes); for each label, the last failing candidate and the first solving one.",
        "domain": PUZZLE_DOMAIN.hex(),
        "bits": PUZZLE_BITS,
        "identities": entries,
    }


def strict_cbor_vectors() -> dict[str, Any]:
    """Encodings a strict decoder MUST reject, with the canonical form where one exists."""
    cases = [
        ("non-shortest integer", "1801", "01"),
        ("non-shortest length", "780161", "6161"),
        ("indefinite-length array", "9f01ff", "8101"),
        ("indefinite-length byte string", "5f4101ff", "4101"),
        ("duplicate map key", "a201020103", None),
        ("unsorted map keys", "a201020003", "a200030102"),
        ("float not in shortest form", "fb3ff8000000000000", "f93e00"),
        ("tag", "c11a5f5e1000", None),
        ("trailing bytes", "0102", None),
        ("NaN", "f97e00", None),
        ("negative map key", "a12001", None),
    ]
    return {"description": "Each input MUST be rejected by a strict decoder.",
            "reject": [{"name": n, "input_hex": h, "canonical_hex": c} for n, h, c in cases]}


# --- tensors (spec/vectors/tensors.json) ---------------------------------------------
#
# Each vector names a small float32 input, the wire dtype (and blocksize) it is encoded
# in, the deterministic CBOR of the resulting map, its digest and the exact decoded
# values. Inputs are chosen to hit the edges of the spec: negative zero, subnormals,
# rounding ties of f16 and bf16, values exactly on a quantization threshold (which take
# the lower code), a short last block, an all-zero block, an odd nf4 element count
# (padding nibble), a scalar and empty tensors.


def _ramp(n: int, modulus: int, denominator: float) -> list[float]:
    """Deterministic mixed-sign values, exact in float32 (small multiples of 1/denominator)."""
    return [((i * 37) % modulus - modulus // 2) / denominator for i in range(n)]


def _q8_input() -> list[float]:
    from protocol._tensor import Q8_CODEBOOK, _thresholds

    cuts = _thresholds(Q8_CODEBOOK)
    block0 = _ramp(64, 41, 32.0)
    # Block 0 has absmax 1.0, so these scale to themselves: exact ties, lower code wins.
    block0[:6] = [1.0, 0.0, -0.0, cuts[127], cuts[200], cuts[30]]
    block1 = _ramp(36, 29, 4.0)
    block1[0] = -3.75  # the block's largest magnitude is negative: scales to -1
    return block0 + block1


def _nf4_input() -> list[float]:
    from protocol._tensor import NF4_CODEBOOK, _thresholds

    cuts = _thresholds(NF4_CODEBOOK)
    block0 = _ramp(64, 23, 8.0)
    # absmax -2.0: doubling is exact, so these three scale back to exact threshold ties.
    block0[:5] = [-2.0, 0.0, 2 * cuts[7], 2 * cuts[3], 2 * cuts[12]]
    block1 = _ramp(11, 13, 2.0)  # 75 elements in all: a short block and a padding nibble
    return block0 + block1


# (name, dtype, blocksize or None, shape, input)
_CASES: list[tuple[str, str, int | None, list[int], list[float]]] = [
    # -0.0, the largest finite float32 and the smallest subnormal
    ("f32_specials", "f32", None, [2, 3], [0.0, -0.0, 1.5, -2.25, 3.4028234663852886e38, 1.4e-45]),
    ("f32_scalar", "f32", None, [], [-7.5]),
    ("f32_empty", "f32", None, [0, 4], []),
    ("f16_exact", "f16", None, [4], [0.0, -1.0, 0.5, 65504.0]),
    # f32 -> f16 rounds to nearest, ties to even: 2049 -> 2048, 2051 -> 2052; 1e-6 -> subnormal.
    ("f16_rounded", "f16", None, [2, 3], [0.1, -1 / 3, 1e-6, 2049.0, 2051.0, -0.0]),
    # f32 -> bf16 likewise: 1 + 2**-8 -> 1.0, 1 + 3 * 2**-8 -> 1 + 2**-6.
    ("bf16_rounded", "bf16", None, [5], [0.1, -1 / 3, 1.00390625, 1.01171875, -0.0]),
    ("bf16_scalar", "bf16", None, [], [3.140625]),
    ("q8_two_blocks", "q8", 64, [2, 50], _q8_input()),
    ("q8_zero_block", "q8", 64, [3], [0.0, -0.0, 0.0]),
    ("q8_empty", "q8", 64, [0], []),
    ("nf4_odd", "nf4", 64, [75], _nf4_input()),
    ("nf4_single", "nf4", 128, [1, 1], [-0.5]),
]


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _floats(t: Any) -> list[float]:
    # float() of a float32/f16/bf16 element is exact; repr of it round-trips as binary64.
    return [float(v) for v in t.reshape(-1).tolist()]


def make_tensor_vectors() -> list[dict[str, Any]]:
    """The tensor test vectors as JSON-able dicts (written to spec/vectors/tensors.json)."""
    import torch

    from protocol import decode_tensor, encode_tensor

    vectors = []
    for name, dtype, blocksize, shape, values in _CASES:
        values = [_f32(v) for v in values]  # inputs are float32 by definition
        t = torch.tensor(values, dtype=torch.float32).reshape(shape)
        wt = encode_tensor(t, dtype, blocksize=blocksize or 4096)
        entry: dict[str, Any] = {
            "name": name,
            "dtype": dtype,
            "shape": shape,
            "input": values,
            "cbor_hex": encode(wt.to_cbor()).hex(),
            "digest_hex": wt.digest().hex(),
            "decoded": _floats(decode_tensor(wt)),
        }
        if blocksize is not None:
            entry["blocksize"] = blocksize
        vectors.append(entry)
    return vectors


# --- the handshake (spec/vectors/handshake.json) ---------------------------------------
#
# Fixed keys on both sides (the ephemeral keys too: test vectors only) give one
# complete, byte-identical transcript.


@dataclass(frozen=True, slots=True, kw_only=True)
class _VectorParty:
    ed25519_seed: bytes
    x25519_static_private: bytes
    x25519_ephemeral_private: bytes
    listen_addrs: tuple[str, ...]


_VECTOR_PARTIES = {
    "initiator": _VectorParty(
        ed25519_seed=derive_seed(bytes([0x01]) * 32, 4934),
        x25519_static_private=bytes([0x11]) * 32,
        x25519_ephemeral_private=bytes([0x21]) * 32,
        listen_addrs=("192.0.2.10:4001",),
    ),
    "responder": _VectorParty(
        ed25519_seed=derive_seed(bytes([0x02]) * 32, 1207),
        x25519_static_private=bytes([0x12]) * 32,
        x25519_ephemeral_private=bytes([0x22]) * 32,
        listen_addrs=("198.51.100.7:31337", "[2001:db8::7]:31337"),
    ),
}
_VECTOR_TRANSPORT = (
    ("initiator", encode(["swarm/1 test vector", "from the initiator", 1])),
    ("responder", encode(["swarm/1 test vector", "from the responder", 2])),
)


def make_handshake_vectors() -> dict[str, Any]:
    """A complete handshake transcript with fixed keys, as written to
    spec/vectors/handshake.json (hex for bytes)."""
    from protocol._handshake import BINDING_PREFIX, PROLOGUE, Handshake
    from protocol._noise import public_key_of
    from protocol._transport import MessageEncoder, frame

    sides: dict[str, Handshake] = {}
    parties: dict[str, dict[str, Any]] = {}
    for name, role in (("initiator", Role.INITIATOR), ("responder", Role.RESPONDER)):
        p = _VECTOR_PARTIES[name]
        identity = Identity.from_seed(p.ed25519_seed)
        sides[name] = Handshake(
            identity,
            role,
            listen_addrs=p.listen_addrs,
            static_private_key=p.x25519_static_private,
            ephemeral_private_key=p.x25519_ephemeral_private,
        )
        parties[name] = {
            "ed25519_seed": p.ed25519_seed.hex(),
            "ed25519_public_key": identity.public_key.hex(),
            "peer_id": identity.peer_id.hex(),
            "x25519_static_private": p.x25519_static_private.hex(),
            "x25519_static_public": public_key_of(p.x25519_static_private).hex(),
            "x25519_ephemeral_private": p.x25519_ephemeral_private.hex(),
            "x25519_ephemeral_public": public_key_of(p.x25519_ephemeral_private).hex(),
            "listen_addrs": list(p.listen_addrs),
            "handshake_payload": sides[name]._payload.hex(),
        }
    messages = []
    for sender, receiver in (("initiator", "responder"), ("responder", "initiator"), ("initiator", "responder")):
        noise_message = sides[sender].write_message()
        sides[receiver].read_message(noise_message)
        messages.append({"from": sender, "noise_message": noise_message.hex(), "wire": frame(noise_message).hex()})
    results = {name: side.result for name, side in sides.items()}
    assert results["initiator"] is not None and results["responder"] is not None
    assert results["initiator"].handshake_hash == results["responder"].handshake_hash
    transport = []
    for sender, payload in _VECTOR_TRANSPORT:
        result = results[sender]
        assert result is not None
        wire = MessageEncoder(result.send_cipher).encode(payload)
        transport.append({"from": sender, "payload": payload.hex(), "wire": wire.hex()})
    return {
        "description": (
            "A swarm/1 handshake (Noise_XX_25519_ChaChaPoly_SHA256, prologue 'swarm/1') between two "
            "peers with fixed keys, then one application message each way. 'wire' is what goes on "
            "TCP: 2-byte big-endian length + Noise message; each side's handshake_payload is the "
            "plaintext CBOR payload it sends in message 2 (responder) or 3 (initiator). Transport "
            "wire = frames of 2-byte length + ChaCha20-Poly1305 ciphertext of (4-byte big-endian "
            "length + payload)."
        ),
        "protocol_name": "Noise_XX_25519_ChaChaPoly_SHA256",
        "prologue": PROLOGUE.hex(),
        "binding_prefix": BINDING_PREFIX.hex(),
        "initiator": parties["initiator"],
        "responder": parties["responder"],
        "messages": messages,
        "handshake_hash": results["initiator"].handshake_hash.hex(),
        "transport": transport,
    }


# --- generated spec tables ------------------------------------------------------------


def _field_rows(fields: tuple[Field, ...]) -> list[str]:
    return [f"{f.key}: {f.name} ({f.codec.cddl}{', optional' if f.optional else ''})" for f in fields]


def registry_markdown() -> str:
    lines = ["| type | name | kind | body fields (key: name (CBOR type)) |", "|---|---|---|---|"]
    for type_, cls in sorted(MESSAGE_TYPES.items()):
        body = "; ".join(_field_rows(cls.FIELDS)) or "(empty map)"
        lines.append(f"| {type_} | {_wire_name(cls)} | {cls.KIND} | {body} |")
    lines += ["", "| structure | fields (key: name (CBOR type)) |", "|---|---|"]
    for cls in (NodeInfo, SignedRecord, Announcement, NextPing, ReceiptRecord, ForwardEvidence, FraudProof, PushHop,
                HopOutput, PushFailure):
        lines.append(f"| {cls.__name__} | {'; '.join(_field_rows(cls.FIELDS))} |")
    return "\n".join(lines)


def _wire_name(cls: type) -> str:
    name = cls.__name__
    out = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper()
    return {"FRAUD_PROOF_NOTICE": "FRAUD_PROOF"}.get(out, out)


def session_table_markdown() -> str:
    lines = ["| state | event | next state |", "|---|---|---|"]
    lines += [f"| {s.name} | {e.name} | {n.name} |" for (s, e), n in SESSION_TRANSITIONS.items()]
    return "\n".join(lines)


def all_vectors() -> dict[str, Any]:
    return {
        "messages.json": message_vectors(),
        "statements.json": statement_vectors(),
        "cbor-strict.json": strict_cbor_vectors(),
        "identity.json": identity_vectors(),
        "tensors.json": {"description": "Tensor encodings; decoded is the exact float32 decode.",
                         "tensors": make_tensor_vectors()},
        "handshake.json": make_handshake_vectors(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a vector file is out of date")
    args = parser.parse_args()
    stale = []
    for name, content in all_vectors().items():
        text = json.dumps(content, indent=1, sort_keys=False) + "\n"
        path = VECTORS / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale))
        return 1
    print("vectors " + ("checked" if args.check else "written") + (f" (changed: {', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
