"""Replay spec/vectors/ exactly as written, and check the generator reproduces them."""

import json
from pathlib import Path

import pytest

from protocol import Identity, MESSAGE_TYPES, decode_message, encode_message, verify_signature

SPEC = Path(__file__).resolve().parents[2] / "spec"


def _vectors(name):
    return json.loads((SPEC / "vectors" / name).read_text())


def test_message_vectors_replay(generator):
    entries = _vectors("messages.json")["messages"]
    assert {e["type"] for e in entries} == set(MESSAGE_TYPES)
    assert any(e["id"] == 0 and e["name"] == "Error" for e in entries)  # the connection-level ERROR
    for entry in entries:
        wire = bytes.fromhex(entry["cbor_hex"])
        request_id, expected = generator.message_from_json(entry)
        assert encode_message(expected, request_id) == wire, entry["name"]
        assert decode_message(wire) == (request_id, expected), entry["name"]


def test_structure_vectors_replay(generator):
    """Structures carried in record values (an announcement with next_pings)."""
    import protocol
    from protocol import cbor_encode
    from swarm.announce import decode_block_value

    for entry in _vectors("messages.json")["structures"]:
        cls = getattr(protocol, entry["name"])
        expected = cls(**generator.fields_from_json(entry["fields"], cls.FIELDS))
        assert expected.to_bytes().hex() == entry["cbor_hex"]
        assert cls.from_bytes(bytes.fromhex(entry["cbor_hex"])) == expected
        if "block_value_hex" in entry:
            value = bytes.fromhex(entry["block_value_hex"])
            assert decode_block_value(protocol.cbor_decode(value, max_size=len(value))) == (entry["block"], expected)
            assert cbor_encode(["swarm/1/block", entry["block"], expected.to_cbor()]) == value


def test_statement_vectors_replay():
    doc = _vectors("statements.json")
    keys = {}
    for ident in doc["identities"]:
        me = Identity.from_seed(bytes.fromhex(ident["seed"]))
        assert me.public_key.hex() == ident["public_key"]
        assert me.peer_id.hex() == ident["peer_id"]
        keys[ident["name"]] = me
    for st in doc["statements"]:
        signer = keys[st["signer"]]
        statement = bytes.fromhex(st["statement_hex"])
        assert signer.sign(statement).hex() == st["signature"]
        verify_signature(signer.public_key, statement, bytes.fromhex(st["signature"]))


def test_history_vectors_replay():
    from protocol import EMPTY_HISTORY, extend_history

    steps = _vectors("statements.json")["histories"]
    assert bytes.fromhex(steps[0]["previous"]) == EMPTY_HISTORY
    for step in steps:
        assert extend_history(bytes.fromhex(step["previous"]), bytes.fromhex(step["input_digest"])).hex() \
            == step["history"]


@pytest.mark.parametrize("name", ["messages.json", "statements.json", "cbor-strict.json", "tensors.json", "handshake.json",
                                  "model-id.json"])
def test_generator_reproduces_the_files(name, generator):
    text = json.dumps(generator.all_vectors()[name], indent=1) + "\n"
    assert (SPEC / "vectors" / name).read_text() == text, f"run: python spec/make_vectors.py ({name} is stale)"


def test_rollback_vectors_replay():
    from protocol import cbor_encode, extend_history, rollback_history

    for case in _vectors("statements.json")["rollbacks"]:
        previous, position = bytes.fromhex(case["previous"]), case["position"]
        assert cbor_encode(["swarm/1/rollback", position]).hex() == case["appended_hex"]
        assert rollback_history(previous, position).hex() == case["cut"]
        assert extend_history(bytes.fromhex(case["cut"]), bytes.fromhex(case["input_digest"])).hex() \
            == case["history"]
