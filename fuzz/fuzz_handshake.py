"""Hostile bytes against the handshake, and the handshake state table pair by pair.

Oracle (h11's): arbitrary bytes, fed whole, in arbitrary chunks or one byte at a
time, give events or a ProtocolError, never another exception, the same outcome
for every chunking, and never more buffered than one incomplete frame.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol._connection import NEED_DATA, Connection, ConnectionEnded, ConnectionState, HandshakeComplete
from protocol._handshake import (
    HANDSHAKE_TRANSITIONS,
    Handshake,
    HandshakeEvent,
    HandshakeState,
    Role,
    next_handshake_state,
)
from protocol._identity import Identity
from protocol.errors import HandshakeError, LocalProtocolError, ProtocolError

ALICE, BOB = Identity.derive(bytes([0xA1]) * 32), Identity.derive(bytes([0xB0]) * 32)
MAX_FRAME = 2 + 65535


def outcome(conn: Connection, chunks, *, eof=True):
    """(events, error type and message or None) for feeding ``chunks`` then EOF."""
    events = []
    feeds = [c for c in chunks if c] + ([b""] if eof else [])  # b"" would be EOF
    try:
        for chunk in feeds:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
                if isinstance(event, ConnectionEnded):
                    break
            else:
                # NEED_DATA: everything complete has been consumed.
                assert conn.buffered_bytes < MAX_FRAME + conn.limits.max_message_size + 4
                if conn.state is ConnectionState.HANDSHAKING:
                    assert conn.buffered_bytes < MAX_FRAME
    except ProtocolError as exc:
        assert conn.state is ConnectionState.ERROR
        return events, (type(exc), str(exc))
    return events, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def responder() -> Connection:
    return Connection(BOB, Role.RESPONDER, static_private_key=bytes([3]) * 32, ephemeral_private_key=bytes([4]) * 32)


def started_initiator() -> tuple[Connection, bytes]:
    conn = Connection(ALICE, Role.INITIATOR, static_private_key=bytes([5]) * 32, ephemeral_private_key=bytes([6]) * 32)
    return conn, conn.initiate()


def check_chunkings(make, data, cuts):
    whole = outcome(make(), [data])
    assert whole == outcome(make(), split(data, cuts))
    if len(data) <= 300:
        assert whole == outcome(make(), [data[i : i + 1] for i in range(len(data))])
    # EOF always ends a handshake: either completes or fails, never hangs.
    assert whole[1] is not None or any(isinstance(e, ConnectionEnded) for e in whole[0])


frames = st.binary(max_size=200).map(lambda b: len(b).to_bytes(2, "big") + b)
hostile = st.one_of(
    st.binary(max_size=400),
    st.lists(frames, max_size=4).map(b"".join),
    st.tuples(st.integers(0, 65535), st.binary(max_size=64)).map(lambda t: t[0].to_bytes(2, "big") + t[1]),
)
cut_lists = st.lists(st.integers(0, 500), max_size=8)


@given(hostile, cut_lists)
def test_arbitrary_bytes_to_a_responder(data, cuts):
    check_chunkings(responder, data, cuts)


@given(st.binary(max_size=200), cut_lists)
def test_arbitrary_bytes_after_a_valid_message1(tail, cuts):
    """Reaches message 3 parsing: the responder has answered and waits."""
    _, message1 = started_initiator()
    check_chunkings(responder, message1 + tail, cuts)
    _, error = outcome(responder(), [message1 + tail])
    assert error is not None and error[0] is HandshakeError


@given(hostile, cut_lists)
def test_arbitrary_bytes_to_an_initiator_as_message2(data, cuts):
    check_chunkings(lambda: started_initiator()[0], data, cuts)


@settings(max_examples=100)
@given(st.integers(0, 2), st.integers(0, 10**6), st.integers(1, 255))
def test_any_flipped_byte_in_a_real_transcript_fails_the_handshake(which, position, mask):
    initiator = Connection(ALICE, Role.INITIATOR)
    peer = Connection(BOB, Role.RESPONDER)
    wire = [initiator.initiate()]

    def flip(data: bytes) -> bytes:
        if len(wire) - 1 != which:
            return data
        tampered = bytearray(data)
        tampered[position % len(data)] ^= mask
        return bytes(tampered)

    wire[0] = flip(wire[0])
    try:
        peer.receive_data(wire[0])
        wire.append(peer.data_to_send())
        initiator.receive_data(flip(wire[1]))
        wire.append(initiator.data_to_send())
        peer.receive_data(flip(wire[2]))
    except ProtocolError:
        pass
    for conn in (initiator, peer):  # an EOF ends whatever is still waiting
        if conn.state is ConnectionState.HANDSHAKING:
            assert outcome(conn, [])[1] is not None
    completed = [
        conn.state is not ConnectionState.ERROR and conn.handshake_hash is not None for conn in (initiator, peer)
    ]
    assert not all(completed), "a tampered transcript completed on both sides"


# -- the state table -----------------------------------------------------------

LEGAL_STATES = set(HandshakeState) - {HandshakeState.ERROR}


@given(st.sampled_from(list(Role)), st.sampled_from(list(HandshakeState)), st.sampled_from(list(HandshakeEvent)))
def test_every_role_state_event_triple(role, state, event):
    try:
        new = next_handshake_state(role, state, event)
    except ProtocolError as exc:
        assert (role, state, event) not in HANDSHAKE_TRANSITIONS
        expected = LocalProtocolError if event is HandshakeEvent.SEND_MESSAGE else HandshakeError
        assert isinstance(exc, expected)
        return
    assert HANDSHAKE_TRANSITIONS[role, state, event] is new
    assert new in LEGAL_STATES


def _walk_to(role: Role, state: HandshakeState):
    """A real Handshake of ``role`` driven into ``state``, plus the message its peer
    has written for it to read next (or None); None if the role never has that state."""
    i, r = Handshake(ALICE, Role.INITIATOR), Handshake(BOB, Role.RESPONDER)
    me = i if role is Role.INITIATOR else r
    if state is HandshakeState.ERROR:
        try:
            me.read_message(b"")
        except ProtocolError:
            pass
        return me, None
    sent: dict[int, bytes] = {}
    script = [  # (who acts, action): the whole handshake, line by line
        (i, lambda: sent.__setitem__(1, i.write_message())),
        (r, lambda: r.read_message(sent[1])),
        (r, lambda: sent.__setitem__(2, r.write_message())),
        (i, lambda: i.read_message(sent[2])),
        (i, lambda: sent.__setitem__(3, i.write_message())),
        (r, lambda: r.read_message(sent[3])),
    ]
    line = 0
    while me.state is not state:
        if line == len(script):
            return None
        script[line][1]()
        line += 1
    # Let the peer act until it is this side's turn, so its next message exists.
    while line < len(script) and script[line][0] is not me:
        script[line][1]()
        line += 1
    pending = {(i, 3): 2, (r, 1): 1, (r, 5): 3}.get((me, line))
    return me, sent.get(pending) if pending else None


@settings(max_examples=60)
@given(st.sampled_from(list(Role)), st.sampled_from(list(HandshakeState)), st.sampled_from(list(HandshakeEvent)),
       st.binary(min_size=32, max_size=200))
def test_every_reachable_pair_through_the_real_object(role, state, event, junk):
    found = _walk_to(role, state)
    if found is None:
        assert not any(r is role and (s is state or new is state) for (r, s, _), new in HANDSHAKE_TRANSITIONS.items())
        return
    me, message = found
    assert me.state is state
    legal = (role, state, event) in HANDSHAKE_TRANSITIONS
    try:
        if event is HandshakeEvent.SEND_MESSAGE:
            me.write_message()
        else:
            me.read_message(message if message is not None else junk)
    except ProtocolError as exc:
        assert me.state is HandshakeState.ERROR
        assert not legal or message is None
        if not legal and state is not HandshakeState.ERROR:
            assert isinstance(exc, LocalProtocolError if event is HandshakeEvent.SEND_MESSAGE else HandshakeError)
        return
    assert legal
    assert me.state is HANDSHAKE_TRANSITIONS[role, state, event]
    assert (me.result is not None) == (me.state is HandshakeState.DONE)


def test_a_clean_handshake_gives_exactly_one_handshake_complete_each():
    initiator, message1 = started_initiator()
    peer = responder()
    assert outcome(peer, [message1], eof=False) == ([], None)
    events, error = outcome(initiator, [peer.data_to_send()], eof=False)
    assert error is None and [type(e) for e in events] == [HandshakeComplete]
    events, error = outcome(peer, [initiator.data_to_send()], eof=False)
    assert error is None and [type(e) for e in events] == [HandshakeComplete]
