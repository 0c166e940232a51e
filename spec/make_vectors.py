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
    DEFAULT_LIMITS,
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
    ModelDescriptor,
    ModelEntry,
    ModelQuery,
    ModelReport,
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
    rollback_history,
    push_onward,
    SessionState,
    sign_push,
    sign_push_failure,
    sign_push_output,
)
from protocol.errors import ERROR_RULES  # noqa: E402
# The generator also reads codec internals (field codecs, codebooks, the Noise layer):
# it writes the spec's generated tables and byte-exact transcripts, which no public API
# exposes.
from protocol._fields import (  # noqa: E402
    Bytes,
    Field,
    Float,
    ListOf,
    Span,
    Struct,
    TensorCodec,
    envelope_fixed_size,
    envelope_items,
    has_tensors,
)

VECTORS = ROOT / "spec" / "vectors"

# Identity.derive of these labels (the counters are derive_counter's): both peer ids
# solve the identity puzzle, as every key a peer accepts must.
CLIENT = Identity.from_seed(derive_seed(bytes(range(32)), 1682))
SERVER = Identity.from_seed(derive_seed(bytes(range(32, 64)), 1160))
#: The second hop of the PUSH examples (push messages carry no identity puzzle check).
SERVER2 = Identity.from_seed(derive_seed(bytes(range(64, 96)), 4205))


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
#
# Every signature in messages.json comes with the statement it signs: the statement's
# name (section 9's table), its inputs by name and its exact bytes, so a third party can
# rebuild the statement from the message and check the signature without guessing. The
# records are valid at VECTOR_NOW under section 10's rules (a test checks all of it).

#: The time at which every record of messages.json passes the storing node's checks.
VECTOR_NOW = 1_899_999_900
_MODEL = "tiny-llama@00112233aabbccdd"
_OTHER_MODEL = "tiny-qwen@8899aabbccddeeff"

#: The statements of section 9: name -> (domain string, input names in order).
STATEMENTS = {
    "forward-request": ("swarm/1/forward-request",
                        ("client", "server", "session", "step", "model", "span", "position", "input_digest")),
    "forward-result": ("swarm/1/forward-result",
                       ("server", "session", "step", "model", "span", "input_digest", "output_digest", "history")),
    "record": ("swarm/1/record", ("key", "publisher", "seq", "expires", "value")),
    "receipt": ("swarm/1/receipt", ("client", "server", "handshake_hash", "seq", "work")),
    "receipt-countersign": ("swarm/1/receipt-countersign", ("client", "server", "handshake_hash", "seq", "work")),
    "push-request": ("swarm/1/push-request", ("client", "model", "position", "input_digest", "timeout", "route")),
    "push-failure": ("swarm/1/push-failure", ("reporter", "session", "step", "failed", "code", "message")),
}


def statement_bytes(name: str, inputs: dict[str, Any]) -> bytes:
    """cbor([domain, *inputs in the table's order]): the bytes a statement signs."""
    domain, names = STATEMENTS[name]
    return encode([domain, *(list(inputs[n]) if n == "span" else inputs[n] for n in names)])


def _inputs_json(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in inputs.items()}


def _json_value(v: Any) -> Any:
    """Byte strings as hex, at any depth (a push route is a list of lists)."""
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


@dataclass(frozen=True, slots=True)
class _Signed:
    """One signature of a sample message, with what it signs."""

    where: str  # the field that holds the signature, as a path ("signature", "records[0].signature")
    statement: str
    signer: str  # "client" or "server"
    inputs: dict[str, Any]

    def sign(self) -> bytes:
        return {"client": CLIENT, "server": SERVER}[self.signer].sign(statement_bytes(self.statement, self.inputs))

    def to_json(self) -> dict[str, Any]:
        return {"field": self.where, "statement": self.statement, "signer": self.signer,
                "inputs": _inputs_json(self.inputs), "statement_hex": statement_bytes(self.statement, self.inputs).hex()}


def _tensor(values: list[float], shape: tuple[int, ...], dtype: str = "f32", blocksize: int = 4096) -> Any:
    import torch

    from protocol import encode_tensor

    return encode_tensor(torch.tensor(values, dtype=torch.float32).reshape(shape), dtype, blocksize=blocksize)


def _record(key: bytes, value: bytes, *, seq: int, expires: int, where: str) -> tuple[SignedRecord, _Signed]:
    signed = _Signed(where, "record", "server", {"key": key, "publisher": SERVER.public_key, "seq": seq,
                                                 "expires": expires, "value": value})
    return SignedRecord(key=key, publisher=SERVER.public_key, seq=seq, expires=expires, value=value,
                        signature=signed.sign()), signed


def sample_messages() -> list[tuple[int, Message, list[_Signed]]]:
    """(envelope id, message, its signatures): one of every type, each response with its
    request's id, plus a connection-level ERROR (id 0) and a quantized OPEN_SESSION."""
    from swarm.announce import block_key, encode_block_value
    from swarm.models import encode_model_value, model_index_key, model_shard

    session = bytes(range(16))
    model, span = _MODEL, (0, 4)
    client_node = NodeInfo(peer_id=CLIENT.peer_id, public_key=CLIENT.public_key, addrs=("127.0.0.1:31337",))
    server_node = NodeInfo(peer_id=SERVER.peer_id, public_key=SERVER.public_key, addrs=("[::1]:4000", "10.0.0.2:4000"))
    expires = VECTOR_NOW + 240
    announcement = Announcement(peer_id=SERVER.peer_id, addrs=("[::1]:4000",), model=model, span=span,
                                throughput=123.5, free_sessions=7, expires=expires, num_blocks=8, hidden_size=4)
    block = 2
    block_rec, block_sig = _record(block_key(model, block), encode_block_value(block, announcement), seq=3,
                                   expires=expires, where="records[0].signature")
    entry = ModelEntry(model=model, num_blocks=8, hidden_size=4, source="")
    model_rec, model_sig = _record(model_index_key(model_shard(model)), encode_model_value(entry), seq=3,
                                   expires=expires, where="records[1].signature")
    hidden = _tensor([0.5, -1.0, 2.0, 0.0], (1, 1, 4))
    out = _tensor([1.5, -0.25, 0.125, 3.0], (1, 1, 4))
    history = extend_history(EMPTY_HISTORY, hidden.digest())
    request = {"client": CLIENT.peer_id, "server": SERVER.peer_id, "session": session, "step": 0, "model": model,
               "span": span, "position": 0, "input_digest": hidden.digest()}
    result = {"server": SERVER.peer_id, "session": session, "step": 0, "model": model, "span": span,
              "input_digest": hidden.digest(), "output_digest": out.digest(), "history": history}
    req_sig = _Signed("signature", "forward-request", "client", request)
    res_sig = _Signed("signature", "forward-result", "server", result)
    hh = bytes(range(32))
    receipt_in = {"client": CLIENT.public_key, "server": SERVER.public_key, "handshake_hash": hh, "seq": 5, "work": 40}
    rc_sig = _Signed("receipt.client_signature", "receipt", "client", receipt_in)
    rs_sig = _Signed("receipt.server_signature", "receipt-countersign", "server", receipt_in)
    receipt = ReceiptRecord(client=CLIENT.public_key, server=SERVER.public_key, handshake_hash=hh, seq=5, work=40,
                            client_signature=rc_sig.sign())
    signed = dataclasses.replace(receipt, server_signature=rs_sig.sign())
    proof = FraudProof(accused=SERVER.public_key, client=CLIENT.public_key, model=model, span=span, session=session,
                       requests=(ForwardEvidence(step=0, position=0, hidden=hidden, signature=req_sig.sign()),),
                       output=out, output_signature=res_sig.sign())
    nonce = bytes(range(100, 116))
    once_request = {**request, "session": nonce}
    once_result = {**result, "session": nonce}
    descriptor = ModelDescriptor(model=model, num_blocks=8, hidden_size=4, span=span,
                                 wire_dtypes=("f32", "f16", "bf16", "q8", "nf4"), max_length=2048,
                                 source="HuggingFaceTB/SmolLM2-135M-Instruct", compute_dtype="f32")
    other = ModelDescriptor(model=_OTHER_MODEL, num_blocks=24, hidden_size=896, span=(12, 24), wire_dtypes=("f32",),
                            max_length=32768, source="", compute_dtype="bf16")
    q8_hidden = _tensor([0.5, -1.0, 2.0, 0.0], (1, 1, 4), "q8", 64)
    q8_request = {**request, "step": 1, "position": 1, "input_digest": q8_hidden.digest()}
    push, pushed_on, push_result, failure = sample_push(model, hidden)
    return [
        (7, Error(code=202, message="busy: 3 sessions queued", retry_after=0.5), []),
        (0, Error(code=100, message="a message is the array [type, id, body]"), []),
        (1, Ping(), []),
        (1, Pong(), []),
        (2, FindNode(target=SERVER.peer_id), []),
        (2, Nodes(nodes=(client_node, server_node)), []),
        (3, FindValue(key=block_rec.key), []),
        (3, Value(records=(block_rec, model_rec), nodes=(server_node,)), [block_sig, model_sig]),
        (4, Store(record=block_rec), [dataclasses.replace(block_sig, where="record.signature")]),
        (4, Stored(), []),
        (5, OpenSession(model=model, span=span, max_length=2048, wire_dtype="f32"), []),
        (5, SessionOpened(session=session), []),
        (13, OpenSession(model=model, span=span, max_length=2048, wire_dtype="q8", blocksize=64), []),
        (6, Forward(session=session, step=0, position=0, hidden=hidden, signature=req_sig.sign()), [req_sig]),
        (6, ForwardResult(session=session, step=0, hidden=out, signature=res_sig.sign()), [res_sig]),
        (14, Forward(session=session, step=1, position=1, hidden=q8_hidden,
                     signature=_Signed("signature", "forward-request", "client", q8_request).sign()),
         [_Signed("signature", "forward-request", "client", q8_request)]),
        (8, ForwardOnce(nonce=nonce, model=model, span=span, hidden=hidden,
                        signature=_Signed("signature", "forward-request", "client", once_request).sign()),
         [_Signed("signature", "forward-request", "client", once_request)]),
        (8, ForwardOnceResult(hidden=out, signature=_Signed("signature", "forward-result", "server",
                                                            once_result).sign()),
         [_Signed("signature", "forward-result", "server", once_result)]),
        (9, CloseSession(session=session), []),
        (9, SessionClosed(), []),
        (10, Receipt(receipt=receipt), [rc_sig]),
        (10, ReceiptAck(receipt=signed), [rc_sig, rs_sig]),
        (11, CreditQuery(), []),
        (11, CreditReport(records=(signed,)), [dataclasses.replace(rc_sig, where="records[0].client_signature"),
                                               dataclasses.replace(rs_sig, where="records[0].server_signature")]),
        (12, FraudProofNotice(proof=proof),
         [dataclasses.replace(req_sig, where="proof.requests[0].signature"),
          dataclasses.replace(res_sig, where="proof.output_signature")]),
        (12, FraudProofAck(accepted=True), []),
        (15, ModelQuery(), []),
        (15, ModelReport(versions=("1.1",), models=(descriptor, other)), []),
        (16, push, []),
        (16, Pushed(), []),
        (17, pushed_on, []),
        (17, Pushed(), []),
        (18, push_result, []),
        (18, PushResultAck(), []),
        (19, failure, []),
        (19, PushResultAck(), []),
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
    for request_id, msg, signatures in sample_messages():
        entry = {"name": type(msg).__name__, "type": msg.TYPE, "id": request_id,
                 "fields": fields_to_json(msg, msg.FIELDS), "cbor_hex": encode_message(msg, request_id).hex()}
        if signatures:
            entry["signatures"] = [sig.to_json() for sig in signatures]
        entries.append(entry)
    return {"description": "One encoded example of every message type (and a connection-level ERROR, id 0); "
                           "decode(cbor_hex) must equal fields, encode(fields) must equal cbor_hex. Each signature "
                           "names its statement (section 9), the statement's inputs and its bytes; the records are "
                           "valid at 'now' (section 10, record validation checks 1-4). structures: the same for "
                           "structures carried in record values (a block record's value is block_value_hex).",
            "now": VECTOR_NOW, "statements": {name: {"domain": domain, "inputs": list(names)}
                                              for name, (domain, names) in STATEMENTS.items()},
            "messages": entries, "structures": structure_vectors()}


def structure_vectors() -> list[dict[str, Any]]:
    """Structures that travel inside record values rather than as message fields."""
    announcement = Announcement(
        peer_id=SERVER.peer_id, addrs=("10.0.0.2:4000",), model="tiny-llama@00112233aabbccdd", span=(0, 4),
        throughput=123.5, free_sessions=7, expires=1_900_000_000, num_blocks=8, hidden_size=64,
        next_pings=tuple(sorted((NextPing(peer_id=CLIENT.peer_id, rtt=0.0125),
                                 NextPing(peer_id=bytes(range(20)), rtt=0.25)), key=lambda p: p.peer_id)))
    return [{"name": "Announcement", "fields": fields_to_json(announcement, Announcement.FIELDS),
             "cbor_hex": announcement.to_bytes().hex(),
             "block": 2, "block_value_hex": encode(["swarm/1/block", 2, announcement.to_cbor()]).hex()}]


def statement_vectors() -> dict[str, Any]:
    session = bytes(range(16))
    history = EMPTY_HISTORY
    for digest in (bytes([1]) * 32, bytes([2]) * 32, bytes(32)):  # the inputs of steps 0, 1 and 2
        history = extend_history(history, digest)
    histories, running = [], EMPTY_HISTORY
    for digest in (bytes([1]) * 32, bytes([2]) * 32, bytes(32)):
        nxt = extend_history(running, digest)
        histories.append({"previous": running.hex(), "input_digest": digest.hex(), "history": nxt.hex()})
        running = nxt
    # a rollback (spec 11.1): step 3 at position 1 of the session above, with its own input
    rollbacks = []
    cut = rollback_history(running, 1)
    rolled = extend_history(cut, bytes([3]) * 32)
    rollbacks.append({"previous": running.hex(), "position": 1,
                      "appended_hex": encode(["swarm/1/rollback", 1]).hex(), "cut": cut.hex(),
                      "input_digest": (bytes([3]) * 32).hex(), "history": rolled.hex()})
    receipt = {"client": CLIENT.public_key, "server": SERVER.public_key, "handshake_hash": bytes(range(32)),
               "seq": 5, "work": 40}
    cases = [
        ("forward-request", "client", {"client": CLIENT.peer_id, "server": SERVER.peer_id, "session": session,
                                       "step": 2, "model": "m@0", "span": (3, 9), "position": 17,
                                       "input_digest": bytes(32)}),
        ("forward-result", "server", {"server": SERVER.peer_id, "session": session, "step": 2, "model": "m@0",
                                      "span": (3, 9), "input_digest": bytes(32), "output_digest": bytes([0xFF]) * 32,
                                      "history": history}),
        ("forward-request", "client", {"client": CLIENT.peer_id, "server": SERVER.peer_id, "session": session,
                                       "step": 3, "model": "m@0", "span": (3, 9), "position": 1,
                                       "input_digest": bytes([3]) * 32}),  # the rollback above
        ("forward-result", "server", {"server": SERVER.peer_id, "session": session, "step": 3, "model": "m@0",
                                      "span": (3, 9), "input_digest": bytes([3]) * 32,
                                      "output_digest": bytes([0xEE]) * 32, "history": rolled}),
        ("record", "server", {"key": bytes([0xAB]) * 32, "publisher": SERVER.public_key, "seq": 1_900_000_000_123,
                              "expires": 1_900_000_240, "value": encode(["swarm/1/block", 0, {}])}),
        ("record", "server", {"key": bytes([0xAB]) * 32, "publisher": SERVER.public_key, "seq": 1_900_000_000_124,
                              "expires": 1_900_000_240, "value": b""}),  # a tombstone
        ("receipt", "client", receipt),
        ("receipt-countersign", "server", receipt),
        ("push-request", "client", {"client": CLIENT.peer_id, "model": "m@0", "position": 17,
                                    "input_digest": bytes(32), "timeout": 2.5,
                                    "route": [[SERVER.peer_id, session, 2, [3, 9], ["10.0.0.2:4000"]],
                                              [SERVER2.peer_id, bytes([7]) * 16, 0, [9, 12], []]]}),
        ("push-failure", "server", {"reporter": SERVER.peer_id, "session": session, "step": 2,
                                    "failed": SERVER2.peer_id, "code": 500, "message": "peer unreachable"}),
    ]
    return {
        "description": "Ed25519 seeds are hex; statement_hex is exactly the signed bytes, the deterministic CBOR of "
                       "[domain, inputs in the order of 'statements']; histories are consecutive steps of "
                       "extend_history (the forward-result statement's last element); rollbacks: a step below the "
                       "session's length, at position, first cuts the history (cut = BLAKE2b-256(previous || "
                       "appended), appended the CBOR of [\"swarm/1/rollback\", position]), then extends it with "
                       "its input as any step does.",
        "histories": histories,
        "rollbacks": rollbacks,
        "identities": [
            {"name": "client", "seed": CLIENT.seed.hex(), "public_key": CLIENT.public_key.hex(),
             "peer_id": CLIENT.peer_id.hex()},
            {"name": "server", "seed": SERVER.seed.hex(), "public_key": SERVER.public_key.hex(),
             "peer_id": SERVER.peer_id.hex()},
            {"name": "server2", "seed": SERVER2.seed.hex(), "public_key": SERVER2.public_key.hex(),
             "peer_id": SERVER2.peer_id.hex()},
        ],
        "statement_layouts": {name: {"domain": domain, "inputs": list(names)}
                              for name, (domain, names) in STATEMENTS.items()},
        "statements": [
            {"name": name, "signer": signer, "inputs": _inputs_json(inputs),
             "statement_hex": statement_bytes(name, inputs).hex(),
             "signature": {"client": CLIENT, "server": SERVER}[signer].sign(statement_bytes(name, inputs)).hex()}
            for name, signer, inputs in cases
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
        ("an integer inside 17 arrays", "81" * 17 + "00", None),
        ("a map value inside 17 containers", "81" * 16 + "a10000", None),
    ]
    accept = [
        ("an integer inside 16 arrays (depth 16)", "81" * 16 + "00"),
        ("17 nested arrays, the innermost empty (depth 16)", "81" * 16 + "80"),
        ("a map value inside 16 containers", "81" * 15 + "a10000"),
    ]
    # The item budget (section 2): every data item counts one, a map's keys too; a
    # declared length over the budget is refused at its head.
    budget_cases = [
        ("array of 3 empty arrays within a budget of 4", "83808080", 4, "accept"),
        ("array of 3 empty arrays over a budget of 3", "83808080", 3, "LIMIT_EXCEEDED"),
        ("map of 2 pairs is 5 items", "a200010102", 5, "accept"),
        ("map of 2 pairs over a budget of 4", "a200010102", 4, "LIMIT_EXCEEDED"),
        ("array head claiming 65,536 items, all present, budget 100", "9a00010000" + "80" * 65536, 100,
         "LIMIT_EXCEEDED"),
        ("array head claiming more items than bytes left", "9a00010000" + "80" * 16, 100, "MALFORMED"),
    ]
    return {"description": "Each 'reject' input MUST be rejected by a strict decoder; each 'accept' input MUST be "
                           "decoded. Nesting: the top-level item is at depth 0 and an item inside n arrays or maps "
                           "(a map's keys and values are inside it) at depth n; depth above 16 is rejected. Each input in "
                           "budget, decoded with the item budget max_items, MUST give outcome.",
            "reject": [{"name": n, "input_hex": h, "canonical_hex": c} for n, h, c in cases],
            "accept": [{"name": n, "input_hex": h} for n, h in accept],
            "budget": [{"name": n, "input_hex": h, "max_items": b, "outcome": o} for n, h, b, o in budget_cases]}


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
    assert results["initiator"] is not None
    assert results["responder"] is not None
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
    for cls in (NodeInfo, SignedRecord, Announcement, NextPing, ReceiptRecord, ForwardEvidence, FraudProof,
                ModelDescriptor, ModelEntry, PushHop, HopOutput, PushFailure):
        lines.append(f"| {cls.__name__} | {'; '.join(_field_rows(cls.FIELDS))} |")
    return "\n".join(lines)


def budget_markdown() -> str:
    """Section 7.5: each type's item budget and size cap (fixed part, and the data bytes
    its tensors add)."""
    lines = ["| type | name | item budget | size cap (bytes) |", "|---|---|---|---|"]
    for type_, cls in sorted(MESSAGE_TYPES.items()):
        fixed = envelope_fixed_size(type_, cls.FIELDS, DEFAULT_LIMITS)
        cap = f"{fixed:,} + 4 x E" if has_tensors(cls.FIELDS) else f"{fixed:,}"
        lines.append(f"| {type_} | {_wire_name(cls)} | {envelope_items(cls.FIELDS, DEFAULT_LIMITS):,} | {cap} |")
    lines.append(f"| other | (unknown) | {envelope_items(None, DEFAULT_LIMITS):,} | 65,536 |")
    return "\n".join(lines)


def _wire_name(cls: type) -> str:
    name = cls.__name__
    out = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper()
    return {"FRAUD_PROOF_NOTICE": "FRAUD_PROOF"}.get(out, out)


def error_table_markdown() -> str:
    """Section 14's table, from ``protocol.errors.ERROR_RULES``."""
    lines = ["| code | name | meaning | detected by | reported as | connection | `retry_after` |",
             "|---|---|---|---|---|---|---|"]
    for code, rule in sorted(ERROR_RULES.items()):
        lines.append(f"| {code.value} | {code.name} | {rule.meaning} | {rule.detected_by} | {rule.report.value} | "
                     f"{'ends' if rule.ends_connection else 'stays open'} | {'MAY' if rule.retry_after else '-'} |")
    return "\n".join(lines)


def session_table_markdown() -> str:
    lines = ["| state | event | next state |", "|---|---|---|"]
    lines += [f"| {s.name} | {e.name} | {n.name} |" for (s, e), n in SESSION_TRANSITIONS.items()]
    return "\n".join(lines)


# --- model ids (spec/vectors/model-id.json) ------------------------------------------------
#
# A tiny but complete Hugging Face directory: config.json (with a float written as an
# integer-valued float, a nested object with a long key, and keys the digest ignores)
# and one safetensors file, given byte for byte, so a third party recomputes the id
# from the files themselves. Plus the GGUF case: the file's SHA-256 alone.

_CONFIG_JSON = (
    '{\n  "architectures": ["LlamaForCausalLM"],\n  "model_type": "llama",\n  "vocab_size": 32,\n'
    '  "hidden_size": 4,\n  "intermediate_size": 8,\n  "num_hidden_layers": 1,\n  "num_attention_heads": 2,\n'
    '  "num_key_value_heads": 1,\n  "hidden_act": "silu",\n  "rms_norm_eps": 1e-05,\n  "rope_theta": 10000.0,\n'
    '  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,\n'
    '                   "original_max_position_embeddings": 8192},\n  "attention_bias": false,\n'
    '  "tie_word_embeddings": true,\n  "max_position_embeddings": 131072,\n  "torch_dtype": "float32",\n'
    '  "transformers_version": "4.57.0"\n}\n'
)


def _safetensors_file() -> bytes:
    """A safetensors file (8-byte little-endian header length, JSON header, data) of
    two small float32 tensors, written by hand so its bytes are fixed."""
    tensors = [("model.embed_tokens.weight", [2, 2], [0.5, -1.0, 2.0, 0.0]), ("model.norm.weight", [2], [1.0, 1.0])]
    header, data = {}, b""
    for name, shape, values in tensors:
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    return struct.pack("<Q", len(text)) + text + data


def model_id_vectors() -> dict[str, Any]:
    import hashlib

    from protocol import make_model_id, model_digest, model_id_document

    weights = _safetensors_file()
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    manifest = [(n, info["shape"], info["dtype"]) for n, info in header.items() if n != "__metadata__"]
    sha = hashlib.sha256(weights).digest()
    document = model_id_document(json.loads(_CONFIG_JSON), manifest, [sha])
    gguf_sha = hashlib.sha256(b"GGUF vector: stands for the bytes of one .gguf file").digest()
    gguf_document = model_id_document({}, [], [gguf_sha])
    return {
        "description": "Model ids (spec section 1): name@hex, hex = BLAKE2b-64 of cbor(['swarm/1/model-id', config "
                       "pairs, manifest, file SHA-256s]). The directory case gives config.json and the weight file "
                       "byte for byte; the GGUF case only the file's SHA-256 (its config and manifest are empty).",
        "directory": {
            "name": "tiny-llama",
            "files": {"config.json": _CONFIG_JSON, "model.safetensors": weights.hex()},
            "file_sha256": {"model.safetensors": sha.hex()},
            "document_hex": document.hex(),
            "digest": model_digest(document),
            "model_id": make_model_id("tiny-llama", document),
        },
        "gguf": {
            "name": "tiny-gguf",
            "file_sha256": gguf_sha.hex(),
            "document_hex": gguf_document.hex(),
            "model_id": make_model_id("tiny-gguf", gguf_document),
        },
    }


def all_vectors() -> dict[str, Any]:
    return {
        "messages.json": message_vectors(),
        "model-id.json": model_id_vectors(),
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
