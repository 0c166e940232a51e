"""The sans-IO Connection: handshake and transport driven by bytes, h11 style."""

import os

import pytest

from protocol._connection import (
    NEED_DATA,
    Connection,
    ConnectionEnded,
    ConnectionState,
    HandshakeComplete,
    MessageReceived,
    Role,
)
from protocol._identity import Identity
from protocol._limits import Limits
from protocol._noise import MAX_NONCE, NonceExhausted
from protocol.errors import (
    ConnectionClosed,
    DecryptError,
    HandshakeError,
    LimitExceeded,
    LocalProtocolError,
)

ALICE, BOB = Identity.derive(bytes([7]) * 32), Identity.derive(bytes([8]) * 32)


def drain(conn):
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionEnded):
            break
    return events


def connected(limits=None, **kwargs):
    limits = limits or Limits()
    initiator = Connection(ALICE, Role.INITIATOR, listen_addrs=["127.0.0.1:9000"], limits=limits, **kwargs)
    responder = Connection(BOB, Role.RESPONDER, limits=limits)
    responder.receive_data(initiator.initiate())
    assert drain(responder) == []
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    assert [type(e) for e in drain(initiator)] == [HandshakeComplete]
    assert [type(e) for e in drain(responder)] == [HandshakeComplete]
    return initiator, responder


def test_handshake_events_and_attributes():
    initiator = Connection(ALICE, Role.INITIATOR, expected_peer_id=BOB.peer_id)
    responder = Connection(BOB, Role.RESPONDER, listen_addrs=["[::1]:4001"])
    assert initiator.state is ConnectionState.HANDSHAKING
    assert initiator.remote_peer_id is None
    responder.receive_data(initiator.initiate())
    message2 = responder.data_to_send()
    assert len(message2) > 2
    assert responder.data_to_send() == b""
    initiator.receive_data(message2)
    assert initiator.state is ConnectionState.OPEN
    (event,) = drain(initiator)
    assert event == HandshakeComplete(
        peer_id=BOB.peer_id, public_key=BOB.public_key, listen_addrs=("[::1]:4001",),
        handshake_hash=initiator.handshake_hash,
    )
    responder.receive_data(initiator.data_to_send())
    (event,) = drain(responder)
    assert event.peer_id == ALICE.peer_id
    assert event.listen_addrs == ()
    assert responder.remote_peer_id == ALICE.peer_id
    assert responder.remote_public_key == ALICE.public_key
    assert responder.handshake_hash == initiator.handshake_hash
    assert responder.protocol_version == 1
    assert initiator.remote_listen_addrs == ("[::1]:4001",)


def test_messages_both_ways():
    initiator, responder = connected()
    for size in (0, 1, 65519, 65520, 1 << 20):
        payload = os.urandom(size)
        responder.receive_data(initiator.send(payload))
        assert drain(responder) == [MessageReceived(payload=payload)]
        initiator.receive_data(responder.send(payload[::-1]))
        assert drain(initiator) == [MessageReceived(payload=payload[::-1])]


def test_whole_and_byte_at_a_time_give_the_same_events():
    # Fixed keys, so the responder's message 2 is the same every time and one
    # recorded initiator stream can be replayed into fresh responders.
    def fresh_responder():
        return Connection(BOB, Role.RESPONDER, static_private_key=bytes(32), ephemeral_private_key=bytes([5]) * 32)

    initiator = Connection(ALICE, Role.INITIATOR, static_private_key=bytes([1]) * 32,
                           ephemeral_private_key=bytes([6]) * 32)
    recorder = fresh_responder()
    stream = initiator.initiate()
    recorder.receive_data(stream)
    initiator.receive_data(recorder.data_to_send())
    payloads = [b"", b"a", os.urandom(70000), b"b" * 10]
    stream += initiator.data_to_send() + b"".join(initiator.send(p) for p in payloads)

    conn = fresh_responder()
    conn.receive_data(stream)
    conn.receive_data(b"")
    events_whole = drain(conn)
    conn = fresh_responder()
    events_bytes = []
    for n in range(len(stream)):
        conn.receive_data(stream[n : n + 1])
        events_bytes += drain(conn)
    conn.receive_data(b"")
    events_bytes += drain(conn)
    assert [type(e) for e in events_whole] == [HandshakeComplete] + [MessageReceived] * 4 + [ConnectionEnded]
    assert events_whole == events_bytes
    assert [e.payload for e in events_whole[1:5]] == payloads


def test_send_before_handshake_is_local_error_and_harmless():
    initiator = Connection(ALICE, Role.INITIATOR)
    with pytest.raises(LocalProtocolError):
        initiator.send(b"x")
    assert initiator.state is ConnectionState.HANDSHAKING
    initiator.initiate()
    with pytest.raises(LocalProtocolError):
        initiator.initiate()
    with pytest.raises(LocalProtocolError):
        Connection(BOB, Role.RESPONDER).initiate()


def test_oversized_send_leaves_the_connection_usable():
    initiator, responder = connected(Limits(max_message_size=100))
    with pytest.raises(LocalProtocolError):
        initiator.send(bytes(101))
    assert initiator.state is ConnectionState.OPEN
    responder.receive_data(initiator.send(bytes(100)))
    assert drain(responder) == [MessageReceived(payload=bytes(100))]


def test_oversized_receive_is_limit_exceeded():
    big_i = Connection(ALICE, Role.INITIATOR)
    small_r = Connection(BOB, Role.RESPONDER, limits=Limits(max_message_size=100))
    small_r.receive_data(big_i.initiate())
    big_i.receive_data(small_r.data_to_send())
    small_r.receive_data(big_i.data_to_send() + big_i.send(bytes(101)))
    assert isinstance(small_r.next_event(), HandshakeComplete)
    with pytest.raises(LimitExceeded):
        small_r.next_event()
    assert small_r.state is ConnectionState.ERROR


def test_send_prepends_pending_handshake_bytes():
    initiator = Connection(ALICE, Role.INITIATOR)
    responder = Connection(BOB, Role.RESPONDER)
    responder.receive_data(initiator.initiate())
    initiator.receive_data(responder.data_to_send())
    data = initiator.send(b"early")  # message 3 not yet collected with data_to_send
    assert initiator.data_to_send() == b""
    responder.receive_data(data)
    assert [type(e) for e in drain(responder)] == [HandshakeComplete, MessageReceived]


def test_error_is_permanent_and_repeated():
    initiator, responder = connected()
    data = bytearray(initiator.send(b"hello"))
    data[5] ^= 1
    responder.receive_data(bytes(data))
    with pytest.raises(DecryptError) as first:
        responder.next_event()
    assert responder.state is ConnectionState.ERROR
    for call in (responder.next_event, lambda: responder.receive_data(b"x"), responder.data_to_send):
        with pytest.raises(DecryptError) as again:
            call()
        assert again.value is first.value
    # Our own direction is intact: the side closing for the peer's violation may still
    # say why (a connection-level ERROR, spec section 6) before it closes.
    initiator.receive_data(responder.send(b"why"))
    assert initiator.next_event() == MessageReceived(payload=b"why")


def test_replayed_and_reordered_frames():
    initiator, responder = connected()
    one, two = initiator.send(b"1"), initiator.send(b"2")
    responder.receive_data(one + one)
    assert responder.next_event() == MessageReceived(payload=b"1")
    with pytest.raises(DecryptError):
        responder.next_event()
    initiator, responder = connected()
    one, two = initiator.send(b"1"), initiator.send(b"2")
    responder.receive_data(two + one)
    with pytest.raises(DecryptError):
        responder.next_event()


def test_clean_eof():
    initiator, responder = connected()
    responder.receive_data(initiator.send(b"bye"))
    responder.receive_data(b"")
    assert drain(responder) == [MessageReceived(payload=b"bye"), ConnectionEnded()]
    assert responder.state is ConnectionState.CLOSED
    assert responder.next_event() == ConnectionEnded()
    responder.receive_data(b"")  # EOF twice is harmless
    with pytest.raises(LocalProtocolError):
        responder.receive_data(b"more")
    initiator.receive_data(responder.send(b"still writing"))  # half-close: our side may still send
    assert drain(initiator) == [MessageReceived(payload=b"still writing")]


@pytest.mark.parametrize("cut", [1, 2, 10, -1])
def test_eof_mid_frame_is_connection_closed(cut):
    initiator, responder = connected()
    responder.receive_data(initiator.send(b"x" * 100)[:cut])
    responder.receive_data(b"")
    with pytest.raises(ConnectionClosed):
        responder.next_event()
    assert responder.state is ConnectionState.ERROR


def test_eof_mid_message_is_connection_closed():
    initiator, responder = connected()
    data = initiator.send(bytes(100000))
    first_frame = 2 + int.from_bytes(data[:2], "big")
    responder.receive_data(data[:first_frame])
    assert responder.next_event() is NEED_DATA
    responder.receive_data(b"")
    with pytest.raises(ConnectionClosed):
        responder.next_event()


@pytest.mark.parametrize("received", [b"", b"\x00", b"\x00\x20" + bytes(10)])
def test_eof_during_handshake_is_handshake_error(received):
    responder = Connection(BOB, Role.RESPONDER)
    if received:
        responder.receive_data(received)
    responder.receive_data(b"")
    with pytest.raises(HandshakeError):
        responder.next_event()


def test_initiator_receiving_before_initiate_is_a_handshake_failure():
    initiator = Connection(ALICE, Role.INITIATOR)
    initiator.receive_data(b"\x00\x01x")
    with pytest.raises(HandshakeError):
        initiator.next_event()


def test_handshake_failure_surfaces_from_next_event():
    carol = Identity.generate()
    initiator = Connection(ALICE, Role.INITIATOR, expected_peer_id=carol.peer_id)
    responder = Connection(BOB, Role.RESPONDER)
    responder.receive_data(initiator.initiate())
    initiator.receive_data(responder.data_to_send())  # does not raise: h11 style
    assert initiator.state is ConnectionState.ERROR
    with pytest.raises(HandshakeError):
        initiator.next_event()
    with pytest.raises(HandshakeError):
        initiator.data_to_send()


def test_garbage_frame_to_a_responder():
    responder = Connection(BOB, Role.RESPONDER)
    responder.receive_data(b"\x00\x05hello")
    with pytest.raises(HandshakeError):
        responder.next_event()


def test_data_after_message3_in_the_same_chunk():
    initiator = Connection(ALICE, Role.INITIATOR)
    responder = Connection(BOB, Role.RESPONDER)
    responder.receive_data(initiator.initiate())
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send() + initiator.send(b"a") + initiator.send(b"b"))
    assert [getattr(e, "payload", None) for e in drain(responder)] == [None, b"a", b"b"]


def test_nonce_exhaustion_on_send_breaks_the_connection():
    initiator, responder = connected()
    initiator._encoder.cipher.n = MAX_NONCE - 1
    responder._decoder.cipher.n = MAX_NONCE - 1
    responder.receive_data(initiator.send(b"last"))
    assert drain(responder) == [MessageReceived(payload=b"last")]
    with pytest.raises(NonceExhausted):
        initiator.send(b"more")
    assert initiator.state is ConnectionState.ERROR
    with pytest.raises(NonceExhausted):
        initiator.send(b"more")


def test_buffered_bytes_is_bounded_by_frames_not_messages():
    initiator, responder = connected()
    data = initiator.send(bytes(200000))
    responder.receive_data(data)
    assert responder.buffered_bytes == len(data)  # held encrypted until asked for
    assert isinstance(responder.next_event(), MessageReceived)
    assert responder.buffered_bytes == 0


def test_frames_decrypted_ahead_give_the_same_events_and_count_as_held():
    initiator, responder = connected()
    payloads = [os.urandom(n) for n in (300_000, 5, 70_000)]
    data = b"".join(initiator.send(p) for p in payloads)
    responder.receive_data(data[:-7])  # the last frame incomplete: it stays encrypted
    responder.decrypt_received()
    assert responder.undecrypted_bytes < 65_536 + 2
    # held as plaintext now (without the frames' headers and tags): still counted
    assert sum(map(len, payloads[:2])) < responder.buffered_bytes <= len(data) - 7
    assert drain(responder)[:2] == [MessageReceived(payload=payloads[0]), MessageReceived(payload=payloads[1])]
    responder.receive_data(data[-7:])
    responder.decrypt_received()
    assert responder.undecrypted_bytes == 0
    assert drain(responder) == [MessageReceived(payload=payloads[2])]
    assert responder.buffered_bytes == 0


def test_a_frame_that_fails_to_decrypt_ahead_fails_after_the_messages_before_it():
    initiator, responder = connected()
    good = initiator.send(b"first")
    bad = bytearray(initiator.send(b"second"))
    bad[-1] ^= 1
    responder.receive_data(good + bytes(bad) + initiator.send(b"third"))
    responder.decrypt_received()
    assert responder.next_event() == MessageReceived(payload=b"first")
    with pytest.raises(DecryptError):
        responder.next_event()
    assert responder.state is ConnectionState.ERROR


def test_decrypting_ahead_during_the_handshake_does_nothing():
    initiator = Connection(ALICE, Role.INITIATOR)
    responder = Connection(BOB, Role.RESPONDER)
    responder.receive_data(initiator.initiate())
    responder.decrypt_received()
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send() + initiator.send(b"hello"))
    assert [type(e) for e in drain(responder)] == [HandshakeComplete, MessageReceived]


def test_need_data_is_a_sentinel_and_events_validate():
    with pytest.raises(TypeError):
        NEED_DATA()
    with pytest.raises(TypeError):
        MessageReceived(payload="text")
    with pytest.raises(ValueError, match="peer_id must be the peer id of public_key"):
        HandshakeComplete(peer_id=bytes(20), public_key=BOB.public_key, listen_addrs=(), handshake_hash=bytes(32))
    with pytest.raises(TypeError):
        HandshakeComplete(peer_id=BOB.peer_id, public_key=BOB.public_key, listen_addrs=["a:1"], handshake_hash=bytes(32))
    assert ConnectionEnded() == ConnectionEnded()


def test_repr_names_the_peer():
    initiator, _ = connected()
    assert BOB.peer_id.hex() in repr(initiator)
    assert "OPEN" in repr(initiator)
