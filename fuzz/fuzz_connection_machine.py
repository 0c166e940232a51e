"""Two Connection objects driven by a hypothesis state machine against a simple model.

The model of each direction of the byte stream is: the bytes written and not yet
delivered, the queue of payloads the receiver must produce in order, and whether an
EOF follows. A damaged direction (a flipped byte, a replayed frame, a stream cut in
the middle of a message) holds a ``Doom`` where the damage is: the receiver must
produce every payload before it, then raise that error type, then stay in ERROR.
Bytes are delivered in arbitrary chunks, so frame and message boundaries fall
anywhere.
"""

from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

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
from protocol.errors import ConnectionClosed, DecryptError, HandshakeError, ProtocolError

I, R = Role.INITIATOR, Role.RESPONDER
IDENTITIES = {I: Identity.derive(bytes([0x1A]) * 32), R: Identity.derive(bytes([0x2B]) * 32)}
ADDRS = {I: ("127.0.0.1:7001",), R: ("[::1]:7002", "peer.example:7003")}
LIMITS = Limits(max_message_size=100_000)
MAX_FRAME = 2 + 65535

payloads = st.one_of(st.binary(max_size=48), st.sampled_from([65_515, 65_516, 70_000, 100_000]).map(bytes))
chunk_sizes = st.one_of(st.integers(0, 64), st.integers(0, 250_000))


def other(role: Role) -> Role:
    return R if role is I else I


@dataclass(frozen=True)
class Doom:
    error: type[ProtocolError]


@dataclass
class Direction:
    """One direction of the stream, keyed by its sender."""

    pending: bytearray = field(default_factory=bytearray)
    expected: deque = field(default_factory=deque)  # bytes payloads, or one Doom at the end
    eof_queued: bool = False
    eof_delivered: bool = False
    closed: bool = False  # the sender wrote its last byte (EOF, damage)
    last_send: int = 0  # wire size of the sender's latest message


class ConnectionPair(RuleBasedStateMachine):
    sent = Bundle("sent")

    def __init__(self) -> None:
        super().__init__()
        self.conns = {
            role: Connection(IDENTITIES[role], role, listen_addrs=ADDRS[role], limits=LIMITS,
                             expected_peer_id=IDENTITIES[R].peer_id if role is I else None)
            for role in Role
        }
        self.dirs = {I: Direction(), R: Direction()}
        self.dirs[I].pending += self.conns[I].initiate()
        self.completed = {I: False, R: False}
        self.ended = {I: False, R: False}
        self.dead: dict[Role, ProtocolError | None] = {I: None, R: None}
        self.message2_written = False

    # -- helpers -----------------------------------------------------------------

    def can_send(self, sender: Role) -> bool:
        conn = self.conns[sender]
        return (
            self.dead[sender] is None
            and self.dead[other(sender)] is None
            and not self.dirs[sender].closed
            and conn.state in (ConnectionState.OPEN, ConnectionState.CLOSED)
        )

    def can_deliver(self, sender: Role) -> bool:
        d = self.dirs[sender]
        return self.dead[other(sender)] is None and (bool(d.pending) or (d.eof_queued and not d.eof_delivered))

    def deliver(self, sender: Role, size: int) -> None:
        receiver, d = other(sender), self.dirs[sender]
        conn = self.conns[receiver]
        chunk = bytes(d.pending[:size])
        del d.pending[:size]
        if chunk:
            conn.receive_data(chunk)
        if not d.pending and d.eof_queued and not d.eof_delivered:
            d.eof_delivered = True
            conn.receive_data(b"")
        self.drain(receiver)
        if self.dead[receiver] is None:
            reply = conn.data_to_send()  # the handshake message this made necessary
            if reply and not self.dirs[receiver].closed:  # after a close it is never written
                assert not self.completed[receiver] or receiver is I
                self.dirs[receiver].pending += reply
                self.message2_written = self.message2_written or receiver is R

    def drain(self, receiver: Role) -> None:
        d, conn = self.dirs[other(receiver)], self.conns[receiver]
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, HandshakeComplete):
                    assert not self.completed[receiver], "two HandshakeComplete events"
                    self.completed[receiver] = True
                    peer = IDENTITIES[other(receiver)]
                    assert event.peer_id == peer.peer_id
                    assert event.public_key == peer.public_key
                    assert event.listen_addrs == ADDRS[other(receiver)]
                elif isinstance(event, MessageReceived):
                    assert self.completed[receiver], "a message before the handshake completed"
                    assert d.expected, "a message nobody sent"
                    assert d.expected.popleft() == event.payload
                else:
                    assert isinstance(event, ConnectionEnded)
                    assert d.eof_delivered
                    assert not d.pending
                    assert not d.expected
                    self.ended[receiver] = True
                    break
        except ProtocolError as exc:
            assert d.expected, f"unexpected {exc!r}"
            assert isinstance(d.expected[0], Doom), f"unexpected {exc!r}"
            assert isinstance(exc, d.expected[0].error), f"{exc!r} instead of {d.expected[0].error}"
            d.expected.clear()
            self.dead[receiver] = exc

    def send(self, sender: Role, payload: bytes) -> bytes:
        data = self.conns[sender].send(payload)
        d = self.dirs[sender]
        d.pending += data
        d.last_send = len(data)
        return data

    # -- rules -------------------------------------------------------------------

    @precondition(lambda self: self.can_deliver(I))
    @rule(size=chunk_sizes)
    def deliver_to_responder(self, size):
        self.deliver(I, size)

    @precondition(lambda self: self.can_deliver(R))
    @rule(size=chunk_sizes)
    def deliver_to_initiator(self, size):
        self.deliver(R, size)

    @precondition(lambda self: self.can_send(I))
    @rule(target=sent, payload=payloads)
    def initiator_sends(self, payload):
        self.dirs[I].expected.append(payload)
        return (I, self.send(I, payload))

    @precondition(lambda self: self.can_send(R))
    @rule(target=sent, payload=payloads)
    def responder_sends(self, payload):
        self.dirs[R].expected.append(payload)
        return (R, self.send(R, payload))

    @precondition(lambda self: self.can_send(I) or self.can_send(R))
    @rule(sender=st.sampled_from([I, R]), payload=payloads, position=st.integers(0, 10**6), mask=st.integers(1, 255))
    def send_with_a_flipped_byte(self, sender, payload, position, mask):
        if not self.can_send(sender):
            return
        d = self.dirs[sender]
        start = len(d.pending)
        data = self.send(sender, payload)
        first_frame = int.from_bytes(data[:2], "big")
        d.pending[start + 2 + position % first_frame] ^= mask  # inside the ciphertext: the tag covers it
        d.expected.append(Doom(DecryptError))
        d.closed = True

    @rule(item=sent)
    def replay_an_old_message(self, item):
        sender, data = item
        if not self.can_send(sender):
            return
        d = self.dirs[sender]
        d.pending += data  # its nonce is behind the receiver's by now
        d.expected.append(Doom(DecryptError))
        d.closed = True

    @precondition(lambda self: any(self.dead[r] is None and not self.dirs[r].closed for r in Role))
    @rule(sender=st.sampled_from([I, R]))
    def close(self, sender):
        d = self.dirs[sender]
        if self.dead[sender] is not None or d.closed:
            return
        # The receiver needs the sender's last handshake message before the EOF: the
        # initiator writes message 3 as it opens, the responder message 2 on message 1.
        if sender is I:
            handshake_sent = self.conns[I].state is not ConnectionState.HANDSHAKING
        else:
            handshake_sent = self.message2_written
        if not handshake_sent:
            d.expected.append(Doom(HandshakeError))
        d.eof_queued = d.closed = True

    @precondition(lambda self: any(self.can_send(r) and self.dirs[r].pending and self.dirs[r].last_send for r in Role))
    @rule(sender=st.sampled_from([I, R]), cut=st.integers(1, 10**6))
    def close_in_the_middle_of_a_message(self, sender, cut):
        d = self.dirs[sender]
        if not (self.can_send(sender) and d.pending and d.last_send and d.expected):
            return
        tail = min(len(d.pending), d.last_send)  # undelivered bytes of the latest message
        k = 1 + cut % tail
        del d.pending[len(d.pending) - k :]
        if k == d.last_send:
            d.expected.pop()  # the whole message is gone: a clean end before it
        else:
            d.expected[-1] = Doom(ConnectionClosed)
        d.eof_queued = d.closed = True

    @rule()
    def poll_both(self):
        """The application asks for events without new bytes: nothing changes."""
        for role in Role:
            if self.dead[role] is None:
                self.drain(role)

    # -- invariants --------------------------------------------------------------

    @invariant()
    def errors_are_permanent(self):
        for role, error in self.dead.items():
            conn = self.conns[role]
            assert (error is not None) == (conn.state is ConnectionState.ERROR)
            if error is not None:
                try:
                    conn.next_event()
                except ProtocolError as again:
                    assert again is error
                else:
                    raise AssertionError("a connection in ERROR returned an event")

    @invariant()
    def states_agree_with_the_model(self):
        for role, conn in self.conns.items():
            if self.dead[role] is not None:
                continue
            assert (conn.state is ConnectionState.HANDSHAKING) == (not self.completed[role])
            assert (conn.state is ConnectionState.CLOSED) == self.ended[role]
            assert conn.buffered_bytes < MAX_FRAME + LIMITS.max_message_size + 4
        if all(self.completed.values()):
            assert self.conns[I].handshake_hash == self.conns[R].handshake_hash
            assert self.conns[I].remote_peer_id == IDENTITIES[R].peer_id
            assert self.conns[R].remote_peer_id == IDENTITIES[I].peer_id

    def teardown(self):
        # Deliver everything left, whole: every payload a live receiver is owed arrives.
        for _ in range(4):
            for sender in Role:
                if self.can_deliver(sender):
                    self.deliver(sender, len(self.dirs[sender].pending))
        for sender in Role:
            if self.dead[other(sender)] is None:
                assert not self.dirs[sender].expected, "payloads never delivered"


ConnectionPair.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_connection_pair = ConnectionPair.TestCase
