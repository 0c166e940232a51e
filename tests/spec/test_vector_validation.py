"""Every vector passes the spec's own validation rules, not only the codec (spec section 18).

A vector that decodes but that a receiver would refuse (issue 13, item 4: a STORE
example whose record no storing node accepts) misleads a third party who copies it.
So each file is replayed here through what a receiver checks: strict decoding and the
registry (section 7), the structure rules (7.4), every signature over the statement
section 9 builds from the message (rebuilt here from the statement's layout, and the
layout's inputs checked against the message's own fields), record validation checks
1-4 of section 10 at the file's ``now``, the fraud proof checks 1-3 of section 13.4,
receipts' signatures (section 12), the handshake payload validation of section 5 and
the identity puzzle for every key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import (
    EMPTY_HISTORY,
    Error,
    ForwardOnce,
    MESSAGE_TYPES,
    ReceiptRecord,
    SignedRecord,
    WireTensor,
    cbor_decode,
    cbor_encode,
    decode_message,
    extend_history,
    forward_request_statement,
    forward_result_statement,
    peer_id_of,
    receipt_statement,
    record_statement,
    satisfies_puzzle,
    verify_signature,
)

SPEC = Path(__file__).resolve().parents[2] / "spec"


def _vectors(name):
    return json.loads((SPEC / "vectors" / name).read_text())


def _keys():
    doc = _vectors("statements.json")
    return {i["name"]: bytes.fromhex(i["public_key"]) for i in doc["identities"]}


#: Statement inputs that are not byte strings (hex in the files).
_NOT_BYTES = {"model", "step", "position", "seq", "expires", "work", "span"}


def _value(field, value):
    return tuple(value) if field == "span" else value if field in _NOT_BYTES else bytes.fromhex(value)


def _statement(layouts, name, inputs):
    """The statement bytes as section 9 defines them: cbor([domain, inputs in order])."""
    layout = layouts[name]
    values = [list(v) if isinstance(v, tuple) else v for v in (_value(f, inputs[f]) for f in layout["inputs"])]
    return cbor_encode([layout["domain"], *values])


def _at(obj, path):
    for part in path.split("."):
        name, _, index = part.partition("[")
        obj = getattr(obj, name)
        if index:
            obj = obj[int(index.rstrip("]"))]
    return obj


def test_statement_layouts_are_section_9s():
    text = (SPEC / "SPEC.md").read_text()
    section9 = text.split("## 9. Signed statements", 1)[1].split("## 10.", 1)[0]
    for doc in (_vectors("messages.json")["statements"], _vectors("statements.json")["statement_layouts"]):
        for layout in doc.values():
            assert f'["{layout["domain"]}", ' in section9, layout["domain"]
            row = next(line for line in section9.splitlines() if f'["{layout["domain"]}", ' in line)
            assert row.count(",") >= len(layout["inputs"]), row  # one element per input after the domain


def test_every_message_vector_passes_validation():
    from verify import check_proof, record_kinds

    doc = _vectors("messages.json")
    now, layouts, keys = doc["now"], doc["statements"], _keys()
    kinds = record_kinds()
    seen = set()
    for entry in doc["messages"]:
        request_id, msg = decode_message(bytes.fromhex(entry["cbor_hex"]))  # strict, registry, structure rules
        seen.add(type(msg))
        assert request_id == entry["id"]
        assert request_id != 0 or type(msg) is Error, entry["name"]  # id 0: connection-level ERROR only
        for signature in entry.get("signatures", ()):
            statement = _statement(layouts, signature["statement"], signature["inputs"])
            assert statement.hex() == signature["statement_hex"], (entry["name"], signature["field"])
            verify_signature(keys[signature["signer"]], statement, _at(msg, signature["field"]))
            _inputs_match_the_message(msg, signature)
        for record in _records_in(msg):
            _check_record(record, now=now, kinds=kinds)
        for receipt in _receipts_in(msg):
            receipt.verify(require_countersignature=receipt.server_signature is not None)
        if type(msg).__name__ == "FraudProofNotice":
            check_proof(msg.proof)  # checks 1-3: structure, the client's and the accused's signatures
        for info in getattr(msg, "nodes", ()):
            assert info.peer_id == peer_id_of(info.public_key) and satisfies_puzzle(info.peer_id)
    assert seen == set(MESSAGE_TYPES.values())


def _records_in(msg):
    if hasattr(msg, "records") and msg.records and isinstance(msg.records[0], SignedRecord):
        return list(msg.records)
    return [msg.record] if hasattr(msg, "record") else []


def _receipts_in(msg):
    if hasattr(msg, "receipt"):
        return [msg.receipt]
    if hasattr(msg, "records") and msg.records and isinstance(msg.records[0], ReceiptRecord):
        return list(msg.records)
    return []


def _check_record(record, *, now, kinds):
    from swarm.dht import check_record

    check_record(record, now=now, kinds=kinds)  # size, expiry and TTL cap, puzzle, signature, kind's rule
    assert record.verify_signature() is None


def _inputs_match_the_message(msg, signature):
    """The statement's inputs are the message's own fields where the message has them."""
    inputs = {k: _value(k, v) for k, v in signature["inputs"].items()}
    name = signature["statement"]
    if name == "forward-request":
        hidden = msg.hidden if hasattr(msg, "hidden") else msg.proof.requests[0].hidden
        assert inputs["input_digest"] == hidden.digest()
        assert inputs["session"] == (msg.nonce if isinstance(msg, ForwardOnce) else getattr(msg, "session", None)
                                     or msg.proof.session)
        if isinstance(msg, ForwardOnce):
            assert (inputs["step"], inputs["position"], inputs["model"]) == (0, 0, msg.model)
        assert inputs["client"] != inputs["server"]
        assert forward_request_statement(**inputs).hex() == signature["statement_hex"]
    elif name == "forward-result":
        output = msg.hidden if hasattr(msg, "hidden") else msg.proof.output
        assert inputs["output_digest"] == output.digest()
        if inputs["step"] == 0:
            assert inputs["history"] == extend_history(EMPTY_HISTORY, inputs["input_digest"])
        assert forward_result_statement(**inputs).hex() == signature["statement_hex"]
    elif name == "record":
        record = _at(msg, signature["field"].rsplit(".", 1)[0])
        assert inputs == {"key": record.key, "publisher": record.publisher, "seq": record.seq,
                          "expires": record.expires, "value": record.value}
        assert record_statement(**inputs).hex() == signature["statement_hex"]
    else:
        receipt = _at(msg, signature["field"].rsplit(".", 1)[0])
        fields = {"client": receipt.client, "server": receipt.server, "handshake_hash": receipt.handshake_hash,
                  "seq": receipt.seq, "work": receipt.work}
        assert inputs == fields
        assert receipt_statement(**fields, countersign=name == "receipt-countersign").hex() \
            == signature["statement_hex"]


def test_the_stored_record_is_a_block_record_under_its_block_key():
    # Issue 13, item 4: the STORE example must be a template a storing node accepts.
    from swarm.announce import block_key, decode_block_value

    entry = next(e for e in _vectors("messages.json")["messages"] if e["name"] == "Store")
    _, store = decode_message(bytes.fromhex(entry["cbor_hex"]))
    block, announcement = decode_block_value(cbor_decode(store.record.value, max_size=2048))
    assert store.record.key == block_key(announcement.model, block)
    assert announcement.peer_id == store.record.publisher_id and announcement.expires == store.record.expires
    assert announcement.num_blocks is not None and announcement.hidden_size is not None


def test_every_statement_vector_passes_validation():
    doc = _vectors("statements.json")
    keys = {i["name"]: bytes.fromhex(i["public_key"]) for i in doc["identities"]}
    for ident in doc["identities"]:
        assert satisfies_puzzle(bytes.fromhex(ident["peer_id"]))
    names = set()
    for st in doc["statements"]:
        statement = _statement(doc["statement_layouts"], st["name"], st["inputs"])
        assert statement.hex() == st["statement_hex"]
        verify_signature(keys[st["signer"]], statement, bytes.fromhex(st["signature"]))
        names.add(st["name"])
    assert names == {"forward-request", "forward-result", "record", "receipt", "receipt-countersign"}


def test_handshake_vector_payloads_pass_section_5s_validation():
    from protocol._handshake import decode_handshake_payload  # the validation a receiver runs (steps 2-4a)

    doc = _vectors("handshake.json")
    for name in ("initiator", "responder"):
        party = doc[name]
        public_key, addrs, minor = decode_handshake_payload(bytes.fromhex(party["handshake_payload"]),
                                                            bytes.fromhex(party["x25519_static_public"]))
        assert public_key.hex() == party["ed25519_public_key"] and list(addrs) == party["listen_addrs"]
        assert minor == 1 and satisfies_puzzle(bytes.fromhex(party["peer_id"]))


@pytest.mark.parametrize("vector", _vectors("tensors.json")["tensors"], ids=lambda v: v["name"])
def test_tensor_vectors_pass_section_8_6s_validation(vector):
    wire = bytes.fromhex(vector["cbor_hex"])
    tensor = WireTensor.from_cbor(cbor_decode(wire, max_size=len(wire)))
    assert tensor.digest().hex() == vector["digest_hex"]
