"""Hostile and honest byte streams against an OPEN connection and the transport layer.

Oracle: arbitrary bytes after a real handshake, fed whole or in any chunks, give
events or a ProtocolError and the same outcome for every chunking; honest streams
round-trip for any chunking; the reassembler agrees with a ten-line reference parser
of the plaintext stream, and never holds more than the size limit.
"""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol._connection import NEED_DATA, Connection, ConnectionEnded, ConnectionState, MessageReceived, Role
from protocol._identity import Identity
from protocol._limits import Limits
from protocol._noise import CipherState
from protocol._transport import MessageDecoder
from protocol.errors import ConnectionClosed, DecryptError, LimitExceeded, ProtocolError

ALICE, BOB = Identity.derive(bytes([0xA2]) * 32), Identity.derive(bytes([0xB2]) * 32)
LIMITS = Limits(max_message_size=150_000)
MAX_FRAME = 2 + 65535
KEY = bytes(range(32))


def open_pair():
    """A fixed-key handshake, so that every example starts from the same keys."""
    initiator = Connection(ALICE, Role.INITIATOR, limits=LIMITS, static_private_key=bytes([1]) * 32,
                           ephemeral_private_key=bytes([2]) * 32)
    responder = Connection(BOB, Role.RESPONDER, limits=LIMITS, static_private_key=bytes([3]) * 32,
                           ephemeral_private_key=bytes([4]) * 32)
    responder.receive_data(initiator.initiate())
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    assert responder.next_event() is not NEED_DATA
    assert initiator.next_event() is not NEED_DATA
    assert responder.state is initiator.state is ConnectionState.OPEN
    return initiator, responder


def outcome(conn, chunks, *, eof=True):
    events = []
    try:
        for chunk in [c for c in chunks if c] + ([b""] if eof else []):
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
                if isinstance(event, ConnectionEnded):
                    break
            else:
                assert conn.buffered_bytes < MAX_FRAME + LIMITS.max_message_size + 4
    except ProtocolError as exc:
        assert conn.state is ConnectionState.ERROR
        return events, (type(exc), str(exc))
    return events, None


def split(data, cuts):
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


payloads = st.one_of(st.binary(max_size=100), st.integers(65_400, 140_000).map(bytes))
cut_lists = st.lists(st.integers(0, 300_000), max_size=10)


@settings(max_examples=50)
@given(st.lists(payloads, max_size=4), cut_lists)
def test_honest_streams_round_trip_in_any_chunking(messages, cuts):
    initiator, responder = open_pair()
    data = b"".join(initiator.send(m) for m in messages)
    events, error = outcome(responder, split(data, cuts))
    assert error is None
    assert events == [MessageReceived(payload=m) for m in messages] + [ConnectionEnded()]


@given(st.binary(max_size=300), cut_lists)
def test_arbitrary_bytes_to_an_open_connection(data, cuts):
    whole = outcome(open_pair()[1], [data])
    assert whole == outcome(open_pair()[1], split(data, cuts))
    assert whole == outcome(open_pair()[1], [data[i : i + 1] for i in range(len(data))])
    if data:
        assert whole[1] is not None
        assert whole[1][0] in (DecryptError, ConnectionClosed)


@settings(max_examples=100)
@given(st.lists(payloads, min_size=1, max_size=3), st.integers(0, 10**7), st.integers(1, 255), cut_lists)
def test_a_flipped_byte_never_delivers_a_wrong_message(messages, position, mask, cuts):
    initiator, responder = open_pair()
    data = bytearray(b"".join(initiator.send(m) for m in messages))
    data[position % len(data)] ^= mask
    events, error = outcome(responder, split(bytes(data), cuts))
    assert error is not None
    assert error[0] in (DecryptError, ConnectionClosed, LimitExceeded)
    assert [e.payload for e in events] == messages[: len(events)]


@settings(max_examples=50)
@given(st.lists(payloads, min_size=1, max_size=3), st.integers(1, 10**7))
def test_truncated_stream_is_connection_closed(messages, cut):
    initiator, responder = open_pair()
    sent = [initiator.send(m) for m in messages]
    data = b"".join(sent)
    end = 1 + cut % (len(data) - 1)
    boundaries = {sum(len(x) for x in sent[:i]): i for i in range(1, len(sent))}
    events, error = outcome(responder, [data[:end]])
    if end in boundaries:  # a cut between two messages is a clean close: nothing is lost
        assert error is None
        assert events == [MessageReceived(payload=m) for m in messages[: boundaries[end]]] + [
            ConnectionEnded()]
        return
    assert error is not None
    assert error[0] is ConnectionClosed
    assert [e.payload for e in events] == messages[: len(events)]
    assert len(events) < len(messages)


def test_a_cut_exactly_between_two_messages_is_a_clean_end():  # shrunk from the property above
    initiator, responder = open_pair()
    first = initiator.send(bytes(7))
    events, error = outcome(responder, [first + initiator.send(bytes(2))[:0]])
    assert error is None
    assert events == [MessageReceived(payload=bytes(7)), ConnectionEnded()]


def reference(stream: bytes, limit: int):
    """The plaintext stream grammar, parsed directly: (messages, over_limit)."""
    out, pos = [], 0
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from(">I", stream, pos)
        if length > limit:
            return out, True
        if len(stream) - pos - 4 < length:
            break
        out.append(stream[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out, False


plain_streams = st.lists(
    st.one_of(
        st.binary(max_size=40).map(lambda b: struct.pack(">I", len(b)) + b),
        st.integers(0, 3000).map(lambda n: struct.pack(">I", n)),  # a header, body maybe missing
        st.binary(max_size=8),  # garbage
    ),
    max_size=8,
).map(b"".join)


@given(plain_streams, st.lists(st.integers(0, 400), max_size=8))
def test_reassembly_matches_the_reference_for_any_cutting(stream, cuts):
    """Another implementation may cut the plaintext anywhere: all must be accepted."""
    limit = 2000
    sender = CipherState(KEY)
    decoder = MessageDecoder(CipherState(KEY), Limits(max_message_size=limit))
    expected, over = reference(stream, limit)
    got = []
    try:
        for piece in split(stream, cuts):
            decoder.feed_frame(sender.encrypt_with_ad(b"", piece))
            while (m := decoder.next_message()) is not None:
                got.append(m)
            assert decoder.buffered <= limit + 4
    except LimitExceeded:
        # Messages completed before the oversized header were still delivered.
        assert over
        assert got == expected
        return
    assert not over
    assert got == expected
