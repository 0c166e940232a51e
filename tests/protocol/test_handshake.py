"""The swarm handshake: Noise XX plus the Ed25519 identity binding, its state table,
and the transcript in spec/vectors/handshake.json."""

import json
from pathlib import Path

import pytest

from protocol import _cbor
from protocol._connection import NEED_DATA, Connection, HandshakeComplete, MessageReceived
from protocol._handshake import (
    BINDING_PREFIX,
    HANDSHAKE_TRANSITIONS,
    PROLOGUE,
    Handshake,
    HandshakeEvent,
    HandshakeState,
    Role,
    next_handshake_state,
    validate_listen_addr,
)
from protocol._identity import Identity
from protocol._limits import Limits
from protocol._noise import HandshakeState as NoiseHandshakeState
from protocol._noise import generate_private_key, public_key_of
from protocol.errors import HandshakeError, LocalProtocolError

VECTOR_FILE = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "handshake.json"


def run_handshake(initiator: Handshake, responder: Handshake) -> None:
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())


def payload(identity, static_pub, *, addrs=(), version=1, minor=1, extra=None, signer=None, signed=None, drop=()):
    """A HandshakePayload with knobs to break it."""
    signed = BINDING_PREFIX + static_pub if signed is None else signed
    obj = {0: identity.public_key, 1: (signer or identity).sign(signed), 2: list(addrs), 3: version, 4: minor}
    obj.update(extra or {})
    for key in drop:
        del obj[key]
    return _cbor.encode(obj)


def initiator_reads(make_payload, **kwargs):
    """An initiator Handshake reading message 2 from a raw Noise responder whose
    payload is make_payload(responder static public key)."""
    initiator = Handshake(Identity.generate(), Role.INITIATOR, **kwargs)
    static = generate_private_key()
    raw = NoiseHandshakeState("XX", initiator=False, prologue=PROLOGUE, static_private_key=static)
    raw.read_message(initiator.write_message())
    initiator.read_message(raw.write_message(make_payload(public_key_of(static))))
    raw.read_message(initiator.write_message())  # message 3 completes the initiator
    return initiator


def responder_reads(make_payload, **kwargs):
    """A responder Handshake reading message 3 from a raw Noise initiator."""
    responder = Handshake(Identity.generate(), Role.RESPONDER, **kwargs)
    static = generate_private_key()
    raw = NoiseHandshakeState("XX", initiator=True, prologue=PROLOGUE, static_private_key=static)
    responder.read_message(raw.write_message(b""))
    raw.read_message(responder.write_message())
    responder.read_message(raw.write_message(make_payload(public_key_of(static))))
    return responder


# -- success -------------------------------------------------------------------


def test_handshake_authenticates_both_sides():
    alice, bob = Identity.generate(), Identity.generate()
    initiator = Handshake(alice, Role.INITIATOR, listen_addrs=["10.0.0.1:4001"], expected_peer_id=bob.peer_id)
    responder = Handshake(bob, Role.RESPONDER, listen_addrs=["[::1]:5000", "bob.example:1"])
    run_handshake(initiator, responder)
    assert initiator.state is responder.state is HandshakeState.DONE
    i, r = initiator.result, responder.result
    assert i.peer_id == bob.peer_id and i.public_key == bob.public_key
    assert i.listen_addrs == ("[::1]:5000", "bob.example:1")
    assert r.peer_id == alice.peer_id and r.public_key == alice.public_key
    assert r.listen_addrs == ("10.0.0.1:4001",)
    assert i.handshake_hash == r.handshake_hash and len(i.handshake_hash) == 32
    assert i.protocol_version == r.protocol_version == 1
    assert r.recv_cipher.decrypt_with_ad(b"", i.send_cipher.encrypt_with_ad(b"", b"hi")) == b"hi"
    assert i.recv_cipher.decrypt_with_ad(b"", r.send_cipher.encrypt_with_ad(b"", b"yo")) == b"yo"


def test_handshake_hashes_differ_between_sessions():
    alice, bob = Identity.generate(), Identity.generate()
    hashes = set()
    for _ in range(2):
        i, r = Handshake(alice, Role.INITIATOR), Handshake(bob, Role.RESPONDER)
        run_handshake(i, r)
        hashes.add(i.result.handshake_hash)
    assert len(hashes) == 2


def test_fixed_static_key_is_used():
    static = bytes(range(32))
    h = Handshake(Identity.generate(), Role.RESPONDER, static_private_key=static)
    assert h.static_public_key == public_key_of(static)


def test_unknown_payload_keys_are_ignored_and_a_higher_minor_is_negotiated_down():
    ident = Identity.generate()
    result = initiator_reads(lambda s: payload(ident, s, extra={9: "future"}, minor=7)).result
    assert result.peer_id == ident.peer_id
    assert (result.protocol_version, result.minor_version) == (1, 1)  # the lower of the two minors


@pytest.mark.parametrize("version", [2, 7])
def test_another_major_version_is_refused(version):
    # The prologue says swarm/1: a payload claiming another major is refused, not "negotiated".
    with pytest.raises(HandshakeError, match=f"speaks protocol {version}"):
        initiator_reads(lambda s: payload(Identity.generate(), s, version=version))


def test_a_protocol_1_0_peer_is_refused_by_both_sides():
    # 1.0 sent no key 4 (minor 0); this implementation speaks 1.1 only.
    with pytest.raises(HandshakeError, match="speaks protocol 1.0"):
        initiator_reads(lambda s: payload(Identity.generate(), s, drop=(4,)))
    with pytest.raises(HandshakeError, match="speaks protocol 1.0"):
        responder_reads(lambda s: payload(Identity.generate(), s, minor=0))
    with pytest.raises(HandshakeError):
        responder_reads(lambda s: payload(Identity.generate(), s, minor="1"))


def test_both_sides_agree_on_the_lower_minor_and_the_hash_binds_the_offers():
    # A peer offering 1.2 and one offering 1.1 speak 1.1; what each offered is in the
    # handshake hash (the payloads are in the transcript), so the offers cannot be
    # changed in flight without the two sides disagreeing.
    alice, bob = Identity.derive(bytes(32)), Identity.derive(bytes([1]) * 32)
    keys = dict(static_private_key=bytes([7]) * 32, ephemeral_private_key=bytes([8]) * 32)
    hashes = {}
    for offer in (1, 2):
        i = Handshake(alice, Role.INITIATOR, minor_version=offer, **keys)
        r = Handshake(bob, Role.RESPONDER, static_private_key=bytes([9]) * 32, ephemeral_private_key=bytes([6]) * 32)
        run_handshake(i, r)
        assert i.result.minor_version == r.result.minor_version == 1
        hashes[offer] = i.result.handshake_hash
        assert r.result.handshake_hash == hashes[offer]
    assert hashes[1] != hashes[2]


def test_the_offered_version_cannot_be_altered_in_flight():
    # Flip one bit of message 3's encrypted payload (where the initiator's version is):
    # the AEAD tag fails, so no one in between can lower the offer.
    for position in (48 + 8, -30):  # inside the payload ciphertext, after the encrypted s
        i, r = Handshake(Identity.generate(), Role.INITIATOR), Handshake(Identity.generate(), Role.RESPONDER)
        r.read_message(i.write_message())
        i.read_message(r.write_message())
        message3 = bytearray(i.write_message())
        message3[position] ^= 0x01
        with pytest.raises(HandshakeError):
            r.read_message(bytes(message3))


def test_responder_validates_the_initiator_payload_too():
    ident = Identity.generate()
    assert responder_reads(lambda s: payload(ident, s, addrs=["1.2.3.4:5"])).result.listen_addrs == ("1.2.3.4:5",)
    with pytest.raises(HandshakeError):
        responder_reads(lambda s: payload(ident, s, signed=BINDING_PREFIX + bytes(32)))


# -- failures ------------------------------------------------------------------


def test_wrong_expected_peer_id():
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    initiator = Handshake(alice, Role.INITIATOR, expected_peer_id=carol.peer_id)
    responder = Handshake(bob, Role.RESPONDER)
    responder.read_message(initiator.write_message())
    with pytest.raises(HandshakeError, match="expected"):
        initiator.read_message(responder.write_message())
    assert initiator.state is HandshakeState.ERROR
    assert initiator.result is None


BAD_PAYLOADS = {
    "binding over another static key": lambda i, s: payload(i, s, signed=BINDING_PREFIX + bytes(32)),
    "binding without the domain prefix": lambda i, s: payload(i, s, signed=s),
    "key of one identity, signature of another": lambda i, s: payload(i, s, signer=Identity.generate()),
    "not CBOR": lambda i, s: b"\xff\x00garbage",
    "empty": lambda i, s: b"",
    "CBOR array": lambda i, s: _cbor.encode([i.public_key]),
    "non-canonical CBOR": lambda i, s: b"\xa1\x18\x00\x00",
    "missing key": lambda i, s: payload(i, s, drop=(1,)),
    "missing addresses": lambda i, s: payload(i, s, drop=(2,)),
    "short public key": lambda i, s: _cbor.encode({0: i.public_key[:31], 1: bytes(64), 2: [], 3: 1}),
    "text public key": lambda i, s: _cbor.encode({0: "k" * 32, 1: bytes(64), 2: [], 3: 1}),
    "short signature": lambda i, s: _cbor.encode({0: i.public_key, 1: bytes(63), 2: [], 3: 1}),
    "version 0": lambda i, s: payload(i, s, version=0),
    "version true": lambda i, s: payload(i, s, version=True),
    "version text": lambda i, s: payload(i, s, version="1"),
    "too many addresses": lambda i, s: payload(i, s, addrs=[f"h{n}:1" for n in range(9)]),
    "address too long": lambda i, s: payload(i, s, addrs=["a" * 60 + ".com:1"]),
    "address without port": lambda i, s: payload(i, s, addrs=["example.com"]),
    "address port 0": lambda i, s: payload(i, s, addrs=["example.com:0"]),
    "address is bytes": lambda i, s: _cbor.encode({0: i.public_key, 1: bytes(64), 2: [b"x:1"], 3: 1}),
    "addresses not an array": lambda i, s: _cbor.encode({0: i.public_key, 1: bytes(64), 2: "x:1", 3: 1}),
}


@pytest.mark.parametrize("name", BAD_PAYLOADS)
def test_bad_payload_is_a_handshake_error(name):
    ident = Identity.generate()
    with pytest.raises(HandshakeError):
        initiator_reads(lambda s: BAD_PAYLOADS[name](ident, s))


def test_the_address_limit_comes_from_limits():
    ident = Identity.generate()
    addrs = [f"h{n}:1" for n in range(3)]
    initiator_reads(lambda s: payload(ident, s, addrs=addrs))
    with pytest.raises(HandshakeError):
        initiator_reads(lambda s: payload(ident, s, addrs=addrs), limits=Limits(max_addresses=2))


def _pair():
    return Handshake(Identity.generate(), Role.INITIATOR), Handshake(Identity.generate(), Role.RESPONDER)


@pytest.mark.parametrize("message1", [b"", bytes(31), bytes(33), bytes(32) + b"payload"])
def test_message1_must_be_exactly_an_ephemeral_key(message1):
    _, responder = _pair()
    with pytest.raises(HandshakeError):
        responder.read_message(message1)
    assert responder.state is HandshakeState.ERROR


@pytest.mark.parametrize("point", [bytes(32), bytes([1]) + bytes(31)])
def test_low_order_ephemeral_key_is_refused(point):
    _, responder = _pair()
    responder.read_message(point)  # "e" is only hashed; the first DH is "ee" in message 2
    with pytest.raises(HandshakeError, match="low-order"):
        responder.write_message()
    assert responder.state is HandshakeState.ERROR


@pytest.mark.parametrize("cut", [0, 31, 32, 47, 48, 80, -1])
def test_truncated_message2(cut):
    initiator, responder = _pair()
    responder.read_message(initiator.write_message())
    message2 = responder.write_message()
    with pytest.raises(HandshakeError):
        initiator.read_message(message2[:cut])


@pytest.mark.parametrize("position", [0, 40, 60, 100, -1])
def test_tampered_handshake_messages(position):
    initiator, responder = _pair()
    responder.read_message(initiator.write_message())
    message2 = bytearray(responder.write_message())
    message2[position] ^= 1
    with pytest.raises(HandshakeError):
        initiator.read_message(bytes(message2))
    initiator, responder = _pair()
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    message3 = bytearray(initiator.write_message())
    message3[position] ^= 0x80
    with pytest.raises(HandshakeError):
        responder.read_message(bytes(message3))


def test_oversized_message3_is_refused():
    initiator, responder = _pair()
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    with pytest.raises(HandshakeError):
        responder.read_message(initiator.write_message() + b"\x00" * 10)


def test_error_state_is_permanent_and_repeats_the_error():
    _, responder = _pair()
    with pytest.raises(HandshakeError) as first:
        responder.read_message(b"short")
    for call in (lambda: responder.read_message(bytes(32)), responder.write_message):
        with pytest.raises(HandshakeError) as again:
            call()
        assert again.value is first.value
    assert responder.state is HandshakeState.ERROR


# -- the state table -----------------------------------------------------------


def test_out_of_turn_calls_follow_the_table():
    initiator, responder = _pair()
    with pytest.raises(LocalProtocolError):
        responder.write_message()  # the responder speaks second
    assert responder.state is HandshakeState.ERROR
    initiator, responder = _pair()
    with pytest.raises(HandshakeError):
        initiator.read_message(bytes(32))  # nothing may arrive before message 1 is sent
    initiator, responder = _pair()
    run_handshake(initiator, responder)
    with pytest.raises(LocalProtocolError):
        initiator.write_message()
    with pytest.raises(HandshakeError):
        responder.read_message(b"x" * 48)


def test_table_lookup_function():
    for (role, state, event), new in HANDSHAKE_TRANSITIONS.items():
        assert next_handshake_state(role, state, event) is new
    with pytest.raises(LocalProtocolError):
        next_handshake_state(Role.INITIATOR, HandshakeState.DONE, HandshakeEvent.SEND_MESSAGE)
    with pytest.raises(HandshakeError):
        next_handshake_state(Role.RESPONDER, HandshakeState.ERROR, HandshakeEvent.RECEIVE_MESSAGE)


def test_table_has_one_path_per_role_to_done():
    for role in Role:
        state, steps = HandshakeState.START, 0
        while state is not HandshakeState.DONE:
            moves = [new for (r, s, _), new in HANDSHAKE_TRANSITIONS.items() if r is role and s is state]
            assert len(moves) == 1
            state, steps = moves[0], steps + 1
        assert steps == 3


# -- arguments and addresses ---------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"listen_addrs": ["nope"]},
        {"listen_addrs": "1.2.3.4:5"},
        {"listen_addrs": [f"h:{n}" for n in range(1, 10)]},
        {"expected_peer_id": b"short"},
        {"static_private_key": bytes(31)},
        {"ephemeral_private_key": "x" * 32},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(LocalProtocolError):
        Handshake(Identity.generate(), Role.INITIATOR, **kwargs)


@pytest.mark.parametrize("addr", ["1.2.3.4:1", "[::1]:65535", "[::ffff:1.2.3.4]:80", "a-b_c.d:443", "x" * 58 + ":65535"])
def test_valid_listen_addrs(addr):
    assert validate_listen_addr(addr) == addr


@pytest.mark.parametrize(
    "addr",
    ["", ":1", "h:", "h:65536", "h:0", "::1:80", "[::1]", "[fe80::1%eth0]:1", "[zz::]:1", "h:1:2", "h :1", "é:1",
     "x" * 59 + ":65535", 5, b"h:1", "h:-1"],
)
def test_invalid_listen_addrs(addr):
    with pytest.raises(ValueError):
        validate_listen_addr(addr)


# -- spec/vectors/handshake.json -------------------------------------------------


def test_vector_replays_through_connections():
    v = json.loads(VECTOR_FILE.read_text())

    def conn(name, role):
        p = v[name]
        return Connection(
            Identity.from_seed(bytes.fromhex(p["ed25519_seed"])),
            role,
            listen_addrs=p["listen_addrs"],
            static_private_key=bytes.fromhex(p["x25519_static_private"]),
            ephemeral_private_key=bytes.fromhex(p["x25519_ephemeral_private"]),
        )

    initiator, responder = conn("initiator", Role.INITIATOR), conn("responder", Role.RESPONDER)
    wire = [bytes.fromhex(m["wire"]) for m in v["messages"]]
    assert initiator.initiate() == wire[0]
    responder.receive_data(wire[0])
    assert responder.next_event() is NEED_DATA
    assert responder.data_to_send() == wire[1]
    initiator.receive_data(wire[1])
    assert initiator.data_to_send() == wire[2]
    responder.receive_data(wire[2])
    for side, other in ((initiator, "responder"), (responder, "initiator")):
        event = side.next_event()
        assert isinstance(event, HandshakeComplete)
        assert event.peer_id.hex() == v[other]["peer_id"]
        assert event.public_key.hex() == v[other]["ed25519_public_key"]
        assert list(event.listen_addrs) == v[other]["listen_addrs"]
        assert event.handshake_hash.hex() == v["handshake_hash"]
    for item in v["transport"]:
        sender, receiver = (initiator, responder) if item["from"] == "initiator" else (responder, initiator)
        data = sender.send(bytes.fromhex(item["payload"]))
        assert data.hex() == item["wire"]
        receiver.receive_data(data)
        assert receiver.next_event() == MessageReceived(payload=bytes.fromhex(item["payload"]))


def test_vector_transcript_is_self_consistent():
    v = json.loads(VECTOR_FILE.read_text())
    for m in v["messages"]:
        noise = bytes.fromhex(m["noise_message"])
        assert bytes.fromhex(m["wire"]) == len(noise).to_bytes(2, "big") + noise
    assert v["initiator"]["peer_id"] != v["responder"]["peer_id"]
