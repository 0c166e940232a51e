"""A sans-IO swarm connection, h11 style: handshake plus encrypted transport
(spec/SPEC.md, "Handshake" and "Transport").

Theory of operation. ``Connection`` owns no socket and no clock. The caller feeds it
whatever bytes arrive (``receive_data``; ``b""`` for EOF), writes whatever it hands
back (``initiate``, ``data_to_send``, ``send``), and pulls events (``next_event``)
until ``NEED_DATA``. Handshake messages are processed as soon as they arrive, so the
reply a handshake message calls for is ready in ``data_to_send`` right after
``receive_data``; transport frames are decrypted lazily, one per event pulled, so
received bytes are held encrypted until the application asks for them and a
partial application message never holds more than ``Limits.max_message_size``.
``decrypt_received`` is the exception: it decrypts the frames already held (no more
bytes than before), touching only the receiving cipher and buffer, so that a shell
may run the costly half of a big message's receipt in a worker thread (a 2 MiB
message is about 2 ms of ChaCha20-Poly1305 that other connections would wait for).

Errors follow h11. A ``RemoteProtocolError`` (the peer's fault) found while handling
received bytes is raised by the next call, puts the connection in ``ERROR``, and
every later call raises the same error again. A ``LocalProtocolError`` for a call
made at the wrong time or with a bad argument (sending before the handshake, a
message over the size limit) leaves the connection as it was; one that breaks the
channel (the sending nonce is exhausted) puts it in ``ERROR`` too.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ._handshake import Handshake, HandshakeState, Role
from ._identity import PEER_ID_SIZE, Identity, peer_id_of
from ._limits import DEFAULT_LIMITS, Limits
from ._noise import NonceExhausted
from ._transport import FrameReader, MessageCap, MessageDecoder, MessageEncoder, frame
from .errors import ConnectionClosed, DecryptError, HandshakeError, LocalProtocolError, ProtocolError

__all__ = [
    "NEED_DATA",
    "Connection",
    "ConnectionEnded",
    "ConnectionState",
    "Event",
    "HandshakeComplete",
    "MessageReceived",
    "Role",
]


class ConnectionState(enum.Enum):
    HANDSHAKING = "handshaking"
    OPEN = "open"  # handshake complete; messages flow both ways
    CLOSED = "closed"  # the peer ended its stream cleanly; sending still works
    ERROR = "error"  # permanent; every call raises the error that caused it


class NEED_DATA:
    """Sentinel returned by ``next_event``: feed more bytes with ``receive_data``."""

    def __init__(self) -> None:
        raise TypeError("NEED_DATA is a sentinel class, not to be instantiated")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of the events ``next_event`` returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete(Event):
    """The peer proved its identity; application messages may flow."""

    peer_id: bytes
    public_key: bytes
    listen_addrs: tuple[str, ...]
    handshake_hash: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, bytes) or len(self.peer_id) != PEER_ID_SIZE:
            raise ValueError(f"peer_id is {PEER_ID_SIZE} bytes")
        if self.peer_id != peer_id_of(self.public_key):
            raise ValueError("peer_id must be the peer id of public_key")
        if not isinstance(self.listen_addrs, tuple) or not all(isinstance(a, str) for a in self.listen_addrs):
            raise TypeError("listen_addrs must be a tuple of str")
        if not isinstance(self.handshake_hash, bytes) or len(self.handshake_hash) != 32:
            raise ValueError("handshake_hash is 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived(Event):
    """One complete application message, still encoded."""

    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.payload, bytes):
            raise TypeError("payload must be bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEnded(Event):
    """The peer closed its stream at a message boundary; no more events will come."""


class Connection:
    """One side of a swarm connection as a state machine over bytes.

    Args:
        identity: this peer's Ed25519 identity.
        role: INITIATOR if this side dialled, RESPONDER if it accepted.
        listen_addrs: this peer's listen addresses, told to the remote peer.
        limits: protocol limits enforced on what is received (and sent).
        expected_peer_id: the peer id the remote must prove (a dialler usually
            knows it); a mismatch is a HandshakeError.
        static_private_key: the X25519 Noise static key; generated if None.
        ephemeral_private_key: fixes the Noise ephemeral key. Test vectors only:
            reusing an ephemeral key destroys forward secrecy.

    Raises:
        LocalProtocolError: a bad argument.
    """

    def __init__(
        self,
        identity: Identity,
        role: Role,
        *,
        listen_addrs: Sequence[str] = (),
        limits: Limits = DEFAULT_LIMITS,
        expected_peer_id: bytes | None = None,
        static_private_key: bytes | None = None,
        ephemeral_private_key: bytes | None = None,
    ) -> None:
        self.role = role
        self.limits = limits
        self._handshake = Handshake(
            identity,
            role,
            listen_addrs=listen_addrs,
            limits=limits,
            expected_peer_id=expected_peer_id,
            static_private_key=static_private_key,
            ephemeral_private_key=ephemeral_private_key,
        )
        self.state = ConnectionState.HANDSHAKING
        self._reader = FrameReader()
        self._plaintexts: deque[bytes] = deque()  # frames decrypted ahead (decrypt_received)
        self._plaintext_bytes = 0
        self._decrypt_error: DecryptError | None = None  # met by decrypt_received, raised in turn
        self._encoder: MessageEncoder | None = None
        self._decoder: MessageDecoder | None = None
        self._message_cap: MessageCap | None = None
        self._events: deque[Event] = deque()
        self._outgoing: list[bytes] = []
        self._eof = False
        self._error: ProtocolError | None = None
        self._send_failed = False  # our sending direction failed (nonce exhausted)
        self.remote_peer_id: bytes | None = None
        self.remote_public_key: bytes | None = None
        self.remote_listen_addrs: tuple[str, ...] | None = None
        self.handshake_hash: bytes | None = None
        self.protocol_version: int | None = None

    def __repr__(self) -> str:
        peer = self.remote_peer_id.hex() if self.remote_peer_id else "?"
        return f"<Connection {self.role.value} {self.state.name} peer={peer}>"

    @property
    def local_static_public_key(self) -> bytes:
        """This side's X25519 Noise static public key."""
        return self._handshake.static_public_key

    @property
    def buffered_bytes(self) -> int:
        """Received bytes held: undecrypted frames plus a partial application message."""
        return len(self._reader) + self._plaintext_bytes + (self._decoder.buffered if self._decoder else 0)

    @property
    def undecrypted_bytes(self) -> int:
        """Received bytes not yet decrypted: what ``decrypt_received`` would work on."""
        return len(self._reader)

    @property
    def incomplete_message(self) -> int:
        """The declared length of the application message being received, 0 if none:
        what the shell accounts and holds to a deadline (spec section 15)."""
        return self._decoder.incomplete if self._decoder is not None else 0

    def set_message_cap(self, cap: MessageCap | None) -> None:
        """Check every application message's declared length against ``cap(type, id)``
        as soon as its envelope head has arrived (``Channel.message_cap``), before the
        rest is buffered; a message over it is ``LimitExceeded``. None: only
        ``Limits.max_message_size``, and messages may be any bytes."""
        self._message_cap = cap
        if self._decoder is not None:
            self._decoder.cap = cap

    # -- errors ----------------------------------------------------------------

    def _check_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, exc: ProtocolError) -> None:
        self.state = ConnectionState.ERROR
        self._error = exc

    # -- the handshake ---------------------------------------------------------

    def initiate(self) -> bytes:
        """The initiator's first handshake message, to write before anything else.

        Raises:
            LocalProtocolError: not the initiator, or already initiated.
        """
        self._check_error()
        if self.role is not Role.INITIATOR or self._handshake.state is not HandshakeState.START:
            raise LocalProtocolError("initiate() is for an initiator that has not started its handshake")
        return frame(self._handshake.write_message())

    def _drive_handshake(self) -> None:
        handshake = self._handshake
        while self.state is ConnectionState.HANDSHAKING:
            content = self._reader.next_frame()
            if content is None:
                if self._eof:
                    raise HandshakeError("the peer closed the connection during the handshake")
                return
            handshake.read_message(content)
            if handshake.state in (HandshakeState.WRITE_MSG2, HandshakeState.WRITE_MSG3):
                self._outgoing.append(frame(handshake.write_message()))
            if handshake.state is HandshakeState.DONE:
                self._open()

    def _open(self) -> None:
        result = self._handshake.result
        assert result is not None
        self._encoder = MessageEncoder(result.send_cipher, self.limits)
        self._decoder = MessageDecoder(result.recv_cipher, self.limits, self._message_cap)
        self.remote_peer_id = result.peer_id
        self.remote_public_key = result.public_key
        self.remote_listen_addrs = result.listen_addrs
        self.handshake_hash = result.handshake_hash
        self.protocol_version = result.protocol_version
        self.state = ConnectionState.OPEN
        self._events.append(
            HandshakeComplete(
                peer_id=result.peer_id,
                public_key=result.public_key,
                listen_addrs=result.listen_addrs,
                handshake_hash=result.handshake_hash,
            )
        )

    # -- receiving -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer; ``b""`` means the peer closed its stream.

        A protocol violation found here is raised by the next ``next_event``.

        Raises:
            LocalProtocolError: bytes fed after EOF.
            ProtocolError: the connection already failed (the same error again).
        """
        self._check_error()
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if data:
            self._reader.feed(data)
        else:
            self._eof = True
        if self.state is ConnectionState.HANDSHAKING:
            try:
                self._drive_handshake()
            except ProtocolError as exc:
                self._fail(exc)

    def next_event(self) -> Event | type[NEED_DATA]:
        """The next event, or ``NEED_DATA`` until more bytes are received.

        After ``ConnectionEnded`` it returns ``ConnectionEnded`` again.

        Raises:
            RemoteProtocolError: the peer violated the protocol (HandshakeError,
                UnexpectedMessage, DecryptError, LimitExceeded, ConnectionClosed);
                the connection is then in ERROR for good (receiving; ``send`` still
                works, to say why before closing).
        """
        self._check_error()
        if self._events:
            return self._events.popleft()
        if self.state is ConnectionState.HANDSHAKING:
            return NEED_DATA
        if self.state is ConnectionState.CLOSED:
            return ConnectionEnded()
        decoder = self._decoder
        assert decoder is not None
        try:
            while True:
                payload = decoder.next_message()
                if payload is not None:
                    return MessageReceived(payload=payload)
                if self._plaintexts:
                    plaintext = self._plaintexts.popleft()
                    self._plaintext_bytes -= len(plaintext)
                    decoder.feed_plaintext(plaintext)
                    continue
                if self._decrypt_error is not None:
                    raise self._decrypt_error
                content = self._reader.next_frame()
                if content is None:
                    break
                decoder.feed_frame(content)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        if not self._eof:
            return NEED_DATA
        if len(self._reader) or decoder.in_message:
            error = ConnectionClosed("the peer closed the connection in the middle of a frame or message")
            self._fail(error)
            raise error
        self.state = ConnectionState.CLOSED
        return ConnectionEnded()

    def decrypt_received(self) -> None:
        """Decrypt every complete transport frame received so far, ahead of
        ``next_event``, which then only parses them.

        It touches only the receiving cipher and the received bytes, so it may run in
        a worker thread as long as nothing else receives meanwhile (``send`` may). A
        frame that fails to decrypt stops it; ``next_event`` raises that error after
        the messages before it. Before the handshake completes it does nothing.
        """
        decoder = self._decoder
        if decoder is None or self.state is not ConnectionState.OPEN or self._decrypt_error is not None:
            return
        while (content := self._reader.next_frame()) is not None:
            try:
                plaintext = decoder.decrypt(content)
            except DecryptError as exc:
                self._decrypt_error = exc
                return
            self._plaintexts.append(plaintext)
            self._plaintext_bytes += len(plaintext)

    # -- sending ---------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes that received data made necessary (the responder's message
        2, the initiator's message 3); ``b""`` if none. Write them in order."""
        self._check_error()
        out = b"".join(self._outgoing)
        self._outgoing.clear()
        return out

    def send(self, payload: bytes) -> bytes:
        """Encrypt and frame one application message; return the bytes to write.

        Handshake bytes still pending in ``data_to_send`` are put in front, so what
        this returns is always safe to write.

        Raises:
            LocalProtocolError: the handshake is not complete, or ``payload`` exceeds
                ``Limits.max_message_size`` (the connection stays usable).
            NonceExhausted: 2**64-1 messages sent; the connection is in ERROR.
        """
        # A failure of what the peer sent (a bad frame or message) leaves our direction
        # intact, so that the side closing for it can first say why with a
        # connection-level ERROR (spec section 6); only a failure of our own sending
        # direction, or one before the handshake completed, stops it.
        if self._error is not None and (self._encoder is None or self._send_failed):
            raise self._error
        if self._encoder is None:
            raise LocalProtocolError("send() before the handshake is complete")
        try:
            data = self._encoder.encode(payload)
        except NonceExhausted as exc:
            self._send_failed = True
            self._fail(exc)
            raise
        if self._outgoing:
            data = self.data_to_send() + data
        return data
