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
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import _messages as M  # noqa: E402
from protocol._cbor import encode  # noqa: E402
from protocol._fields import Bytes, Field, Float, ListOf, Span, Struct, TensorCodec  # noqa: E402
from protocol._identity import Identity, derive_seed  # noqa: E402
from protocol._statements import (  # noqa: E402
    EMPTY_HISTORY,
    extend_history,
    forward_request_statement,
    forward_result_statement,
    receipt_statement,
)

VECTORS = ROOT / "spec" / "vectors"

# Identity.derive of these labels (the counters are derive_counter's): both peer ids
# solve the identity puzzle, as every key a peer accepts must.
CLIENT = Identity.from_seed(derive_seed(bytes(range(32)), 1682))
SERVER = Identity.from_seed(derive_seed(bytes(range(32, 64)), 1160))


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
        from protocol._tensor import WireTensor

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


def message_from_json(entry: dict[str, Any]) -> M.Message:
    cls = M.MESSAGE_TYPES[entry["type"]]
    return cls(id=entry["id"], **fields_from_json(entry["fields"], cls.FIELDS))


# --- sample messages ------------------------------------------------------------------


def _tensor(values: list[float], shape: tuple[int, ...], dtype: str = "f32") -> Any:
    import torch

    from protocol._tensor import encode_tensor

    return encode_tensor(torch.tensor(values, dtype=torch.float32).reshape(shape), dtype)


def sample_messages() -> list[M.Message]:
    session = bytes(range(16))
    model = "tiny-llama@00112233aabbccdd"
    span = (0, 4)
    client_node = M.NodeInfo(peer_id=CLIENT.peer_id, public_key=CLIENT.public_key, addrs=("127.0.0.1:31337",))
    server_node = M.NodeInfo(peer_id=SERVER.peer_id, public_key=SERVER.public_key, addrs=("[::1]:4000", "10.0.0.2:4000"))
    announcement = M.Announcement(peer_id=SERVER.peer_id, addrs=("[::1]:4000",), model=model, span=span,
                                  throughput=123.5, free_sessions=7, expires=1_900_000_000)
    record = M.SignedRecord.create(SERVER, key=bytes(32), seq=3, expires=1_900_000_000, value=announcement.to_bytes())
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
    receipt = M.ReceiptRecord(client=CLIENT.public_key, server=SERVER.public_key, handshake_hash=hh, seq=5, work=40,
                              client_signature=CLIENT.sign(receipt_statement(
                                  client=CLIENT.public_key, server=SERVER.public_key, handshake_hash=hh,
                                  seq=5, work=40)))
    signed = dataclasses.replace(receipt, server_signature=SERVER.sign(receipt.statement(countersign=True)))
    proof = M.FraudProof(accused=SERVER.public_key, client=CLIENT.public_key, model=model, span=span, session=session,
                         requests=(M.ForwardEvidence(step=0, position=0, hidden=hidden, signature=req_sig),),
                         output=out, output_signature=res_sig)
    return [
        M.Error(id=7, code=202, message="busy: 3 sessions queued", retry_after=0.5),
        M.Ping(id=1),
        M.Pong(id=1),
        M.FindNode(id=2, target=SERVER.peer_id),
        M.Nodes(id=2, nodes=(client_node, server_node)),
        M.FindValue(id=3, key=bytes(32)),
        M.Value(id=3, records=(record,), nodes=(server_node,)),
        M.Store(id=4, record=record),
        M.Stored(id=4),
        M.OpenSession(id=5, model=model, span=span, max_length=2048, wire_dtype="f32"),
        M.SessionOpened(id=5, session=session),
        M.Forward(id=6, session=session, step=0, position=0, hidden=hidden, signature=req_sig),
        M.ForwardResult(id=6, session=session, step=0, hidden=out, signature=res_sig),
        M.ForwardOnce(id=8, nonce=session, model=model, span=span, hidden=hidden, signature=req_sig),
        M.ForwardOnceResult(id=8, hidden=out, signature=res_sig),
        M.CloseSession(id=9, session=session),
        M.SessionClosed(id=9),
        M.Receipt(id=10, receipt=receipt),
        M.ReceiptAck(id=10, receipt=signed),
        M.CreditQuery(id=11),
        M.CreditReport(id=11, records=(signed,)),
        M.FraudProofNotice(id=12, proof=proof),
        M.FraudProofAck(id=12, accepted=True),
    ]


def message_vectors() -> dict[str, Any]:
    entries = []
    for msg in sample_messages():
        entries.append({"name": type(msg).__name__, "type": msg.TYPE, "id": msg.id,
                        "fields": fields_to_json(msg, msg.FIELDS), "cbor_hex": M.encode_message(msg).hex()})
    return {"description": "One encoded example of every message type; decode(cbor_hex) must equal fields, "
                           "encode(fields) must equal cbor_hex.", "messages": entries}


def statement_vectors() -> dict[str, Any]:
    session = bytes(range(16))
    req = forward_request_statement(client=CLIENT.peer_id, server=SERVER.peer_id, session=session, step=2,
                                    model="m@0", span=(3, 9), position=17, input_digest=bytes(32))
    history = EMPTY_HISTORY
    for digest in (bytes([1]) * 32, bytes([2]) * 32, bytes(32)):  # the inputs of steps 0, 1 and 2
        history = extend_history(history, digest)
    res = forward_result_statement(server=SERVER.peer_id, session=session, step=2, model="m@0", span=(3, 9),
                                   input_digest=bytes(32), output_digest=bytes([0xFF]) * 32, history=history)
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
        ],
        "statements": [
            {"name": "forward-request", "signer": "client", "statement_hex": req.hex(),
             "signature": CLIENT.sign(req).hex()},
            {"name": "forward-result", "signer": "server", "statement_hex": res.hex(),
             "signature": SERVER.sign(res).hex()},
        ],
    }


def identity_vectors() -> dict[str, Any]:
    """The identity puzzle (spec section 3): derived seeds, peer ids, puzzle hashes."""
    from protocol._identity import PUZZLE_BITS, PUZZLE_DOMAIN, derive_counter, peer_id_of, puzzle_hash, \
        satisfies_puzzle

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


# --- generated spec tables ------------------------------------------------------------


def _field_rows(fields: tuple[Field, ...]) -> list[str]:
    return [f"{f.key}: {f.name} ({f.codec.cddl}{', optional' if f.optional else ''})" for f in fields]


def registry_markdown() -> str:
    lines = ["| type | name | kind | body fields (key: name (CBOR type)) |", "|---|---|---|---|"]
    for type_, cls in sorted(M.MESSAGE_TYPES.items()):
        body = "; ".join(_field_rows(cls.FIELDS)) or "(empty map)"
        lines.append(f"| {type_} | {_wire_name(cls)} | {cls.KIND} | {body} |")
    lines += ["", "| structure | fields (key: name (CBOR type)) |", "|---|---|"]
    for cls in (M.NodeInfo, M.SignedRecord, M.Announcement, M.ReceiptRecord, M.ForwardEvidence, M.FraudProof):
        lines.append(f"| {cls.__name__} | {'; '.join(_field_rows(cls.FIELDS))} |")
    return "\n".join(lines)


def _wire_name(cls: type) -> str:
    name = cls.__name__
    out = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper()
    return {"FRAUD_PROOF_NOTICE": "FRAUD_PROOF"}.get(out, out)


def session_table_markdown() -> str:
    from protocol._session import SESSION_TRANSITIONS

    lines = ["| state | event | next state |", "|---|---|---|"]
    lines += [f"| {s.name} | {e.name} | {n.name} |" for (s, e), n in SESSION_TRANSITIONS.items()]
    return "\n".join(lines)


def all_vectors() -> dict[str, Any]:
    from protocol._handshake import make_handshake_vectors
    from protocol._tensor import make_tensor_vectors

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
