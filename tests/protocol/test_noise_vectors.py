"""The Noise implementation against the published cacophony vectors, replayed from
spec/vectors/noise-cacophony.json byte for byte."""

import json
from pathlib import Path

import pytest

from protocol._noise import HandshakeState

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "spec" / "vectors" / "noise-cacophony.json"
SHARED = ROOT.parent / "shared" / "vectors" / "noise" / "cacophony-subset.json"
SUPPORTED = {"Noise_XX_25519_ChaChaPoly_SHA256", "Noise_NN_25519_ChaChaPoly_SHA256"}


def _vectors():
    return json.loads(VECTORS.read_text())["vectors"]


def _party(vector, prefix):
    static = vector.get(f"{prefix}_static")
    return HandshakeState(
        vector["protocol_name"].split("_")[1],
        initiator=prefix == "init",
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        static_private_key=bytes.fromhex(static) if static else None,
        ephemeral_private_key=bytes.fromhex(vector[f"{prefix}_ephemeral"]),
    )


def test_the_vector_file_holds_the_xx_vector():
    names = [v["protocol_name"] for v in _vectors()]
    assert "Noise_XX_25519_ChaChaPoly_SHA256" in names
    assert set(names) <= SUPPORTED


@pytest.mark.skipif(not SHARED.exists(), reason="the shared vector directory is not present")
def test_every_supported_shared_vector_was_copied():
    shared = [v for v in json.loads(SHARED.read_text())["vectors"] if v["protocol_name"] in SUPPORTED]
    assert shared == _vectors()


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["protocol_name"])
def test_replay(vector):
    initiator, responder = _party(vector, "init"), _party(vector, "resp")
    messages = vector["messages"]
    index = 0
    # Messages alternate: even index from the initiator, odd from the responder.
    while not initiator.complete:
        writer, reader = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(messages[index]["payload"])
        ciphertext = writer.write_message(payload)
        assert ciphertext.hex() == messages[index]["ciphertext"]
        assert reader.read_message(ciphertext) == payload
        index += 1
    assert responder.complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    assert index < len(messages), "the vector has transport messages"
    for message in messages[index:]:
        sender, receiver = (i_send, r_recv) if index % 2 == 0 else (r_send, i_recv)
        payload = bytes.fromhex(message["payload"])
        ciphertext = sender.encrypt_with_ad(b"", payload)
        assert ciphertext.hex() == message["ciphertext"]
        assert receiver.decrypt_with_ad(b"", ciphertext) == payload
        index += 1


def test_a_changed_prologue_breaks_the_replay():
    vector = next(v for v in _vectors() if v["protocol_name"].startswith("Noise_XX"))
    initiator = _party(vector, "init")
    initiator._symmetric.mix_hash(b"x")  # as if the prologue differed
    first = initiator.write_message(bytes.fromhex(vector["messages"][0]["payload"]))
    # Message 1 carries a plaintext payload, so only later messages differ; the hash does.
    assert first.hex() == vector["messages"][0]["ciphertext"]
    responder = _party(vector, "resp")
    responder.read_message(first)
    second = responder.write_message(bytes.fromhex(vector["messages"][1]["payload"]))
    from protocol.errors import DecryptError

    with pytest.raises(DecryptError):
        initiator.read_message(second)
