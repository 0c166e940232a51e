"""The swarm handshake: Noise XX plus the libp2p-style identity binding
(spec/SPEC.md, "Handshake").

Theory of operation. ``Handshake`` runs one side of
``Noise_XX_25519_ChaChaPoly_SHA256`` with the prologue ``b"swarm/1"``. Message 1
(-> e) carries nothing; messages 2 (<- e, ee, s, es) and 3 (-> s, se) carry the
sender's ``HandshakePayload``: its Ed25519 identity key and a signature by that key
over ``b"swarm/1/noise-static-key:"`` plus its X25519 Noise static key. The
signature ties the identity (and so the peer id) to the static key that Noise has
proven the peer holds, so the peer id is authenticated when the handshake ends.

Which call is legal when is decided by one table, ``HANDSHAKE_TRANSITIONS``, keyed by
(role, state, event); the events are the two things that can happen to a handshake,
writing and reading a message. A pair missing from the table is rejected:
``LocalProtocolError`` for a write (our misuse), ``HandshakeError`` for a read (the
peer's: every failure before the handshake completes is HANDSHAKE_FAILED and ends
the connection, spec section 14). After any error the object stays in ``ERROR`` and
repeats that error. Every other failure of the peer's messages (short,
undecryptable, bad CBOR, bad binding, a version it cannot speak) is a
``HandshakeError`` too.

Versions (spec section 16). A version is major.minor. The major is in the prologue
and every domain string (``swarm/1``); HandshakePayload key 3 repeats it and MUST be
1. Key 4 is the highest minor the sender speaks (absent: 0, protocol 1.0). The
connection speaks ``min(local minor, remote minor)`` and a side that does not
implement that minor fails the handshake: this implementation speaks 1.1 only
(``MIN_MINOR_VERSION``). Both payloads travel inside the Noise handshake, encrypted
and authenticated under keys only the two proven identities hold, and are mixed into
the handshake hash, so no one between them can make them agree on a lower version.

This module works on Noise messages; the 2-byte length framing is the caller's
(``_transport.frame``, ``_transport.FrameReader``).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _cbor
from ._identity import (
    PEER_ID_SIZE,
    PUBLIC_KEY_SIZE,
    PUZZLE_BITS,
    SIGNATURE_SIZE,
    Identity,
    peer_id_of,
    satisfies_puzzle,
    verify_signature,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._noise import DHLEN, CipherState, generate_private_key
from ._noise import HandshakeState as NoiseHandshakeState
from .errors import (
    BadSignature,
    DecodeError,
    DecryptError,
    HandshakeError,
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
)

__all__ = [
    "BINDING_PREFIX",
    "HANDSHAKE_TRANSITIONS",
    "MAX_ADDRESS_LENGTH",
    "PROLOGUE",
    "PROTOCOL_VERSION",
    "MINOR_VERSION",
    "MIN_MINOR_VERSION",
    "VERSION_TEXT",
    "Handshake",
    "HandshakeEvent",
    "HandshakeResult",
    "HandshakeState",
    "Role",
    "decode_handshake_payload",
    "encode_handshake_payload",
    "negotiate_minor",
    "next_handshake_state",
    "validate_listen_addr",
]

PROLOGUE = b"swarm/1"
BINDING_PREFIX = b"swarm/1/noise-static-key:"
#: The major version (prologue, domain strings, HandshakePayload key 3).
PROTOCOL_VERSION = 1
#: The highest minor version this implementation speaks (key 4), and the lowest.
MINOR_VERSION = 1
MIN_MINOR_VERSION = 1
VERSION_TEXT = f"{PROTOCOL_VERSION}.{MINOR_VERSION}"
MAX_ADDRESS_LENGTH = 64
NOISE_PATTERN = "XX"

# HandshakePayload map keys.
_KEY_PUBLIC_KEY = 0
_KEY_SIGNATURE = 1
_KEY_ADDRS = 2
_KEY_VERSION = 3
_KEY_MINOR = 4

_HOST_PORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+)):([0-9]{1,5})")


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class HandshakeState(enum.Enum):
    START = "start"  # nothing written or read yet
    AWAIT_MSG2 = "await-msg2"  # initiator wrote message 1
    WRITE_MSG2 = "write-msg2"  # responder read message 1
    AWAIT_MSG3 = "await-msg3"  # responder wrote message 2
    WRITE_MSG3 = "write-msg3"  # initiator read message 2
    DONE = "done"  # keys split, peer authenticated
    ERROR = "error"  # permanent


class HandshakeEvent(enum.Enum):
    SEND_MESSAGE = "send-message"
    RECEIVE_MESSAGE = "receive-message"


HANDSHAKE_TRANSITIONS: dict[tuple[Role, HandshakeState, HandshakeEvent], HandshakeState] = {
    (Role.INITIATOR, HandshakeState.START, HandshakeEvent.SEND_MESSAGE): HandshakeState.AWAIT_MSG2,
    (Role.INITIATOR, HandshakeState.AWAIT_MSG2, HandshakeEvent.RECEIVE_MESSAGE): HandshakeState.WRITE_MSG3,
    (Role.INITIATOR, HandshakeState.WRITE_MSG3, HandshakeEvent.SEND_MESSAGE): HandshakeState.DONE,
    (Role.RESPONDER, HandshakeState.START, HandshakeEvent.RECEIVE_MESSAGE): HandshakeState.WRITE_MSG2,
    (Role.RESPONDER, HandshakeState.WRITE_MSG2, HandshakeEvent.SEND_MESSAGE): HandshakeState.AWAIT_MSG3,
    (Role.RESPONDER, HandshakeState.AWAIT_MSG3, HandshakeEvent.RECEIVE_MESSAGE): HandshakeState.DONE,
}


def next_handshake_state(role: Role, state: HandshakeState, event: HandshakeEvent) -> HandshakeState:
    """The table lookup. Raises LocalProtocolError (a send) or HandshakeError (a
    receive) for a pair the table does not have."""
    try:
        return HANDSHAKE_TRANSITIONS[role, state, event]
    except KeyError:
        pass
    if event is HandshakeEvent.SEND_MESSAGE:
        raise LocalProtocolError(f"{role.value} cannot send a handshake message in state {state.name}")
    raise HandshakeError(f"{role.value} did not expect a handshake message in state {state.name}")


# -- payload -------------------------------------------------------------------


def validate_listen_addr(addr: object) -> str:
    """Check one listen address ("host:port" or "[v6]:port"); return it or raise ValueError."""
    if not isinstance(addr, str):
        raise ValueError("a listen address is a text string")
    if len(addr.encode("utf-8")) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"listen address longer than {MAX_ADDRESS_LENGTH} bytes")
    match = _HOST_PORT.fullmatch(addr)
    if match is None or not 1 <= int(match[3]) <= 65535:
        raise ValueError(f"listen address {addr!r} is not host:port or [v6]:port")
    if match[1] is not None:
        try:
            ipaddress.IPv6Address(match[1])
        except ValueError:
            raise ValueError(f"listen address {addr!r} has an invalid IPv6 host") from None
    return addr


def _binding_message(noise_static_public_key: bytes) -> bytes:
    return BINDING_PREFIX + noise_static_public_key


def encode_handshake_payload(identity: Identity, noise_static_public_key: bytes, listen_addrs: Sequence[str],
                             *, minor_version: int = MINOR_VERSION) -> bytes:
    """The CBOR HandshakePayload binding ``identity`` to the Noise static key.

    ``minor_version`` is the highest minor offered (tests offer others)."""
    payload: dict[int, Any] = {
        _KEY_PUBLIC_KEY: identity.public_key,
        _KEY_SIGNATURE: identity.sign(_binding_message(noise_static_public_key)),
        _KEY_ADDRS: list(listen_addrs),
        _KEY_VERSION: PROTOCOL_VERSION,
    }
    if minor_version:  # 1.0 peers sent no key 4
        payload[_KEY_MINOR] = minor_version
    return _cbor.encode(payload)


def negotiate_minor(local: int, remote: int, *, minimum: int = MIN_MINOR_VERSION) -> int:
    """The minor version a connection speaks: the lower of the two offers.

    Raises:
        HandshakeError: that minor is below ``minimum`` (this side does not speak it).
    """
    minor = min(local, remote)
    if minor < minimum:
        raise HandshakeError(f"the peer speaks protocol {PROTOCOL_VERSION}.{remote}; this peer needs "
                             f"{PROTOCOL_VERSION}.{minimum} or later (upgrade the older side)")
    return minor


def decode_handshake_payload(
    payload: bytes, noise_static_public_key: bytes, limits: Limits = DEFAULT_LIMITS
) -> tuple[bytes, tuple[str, ...], int]:
    """Validate a peer's HandshakePayload against the Noise static key it proved.

    Returns (Ed25519 public key, listen addresses, the peer's highest minor version).

    Raises:
        HandshakeError: anything wrong with it, a major version other than 1 included.
    """
    try:
        obj: Any = _cbor.decode(payload, max_size=len(payload))
    except DecodeError as exc:
        raise HandshakeError(f"handshake payload is not canonical CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise HandshakeError("handshake payload is not a CBOR map")
    for key in (_KEY_PUBLIC_KEY, _KEY_SIGNATURE, _KEY_ADDRS, _KEY_VERSION):
        if key not in obj:
            raise HandshakeError(f"handshake payload lacks key {key}")
    public_key, signature, addrs, version = (obj[k] for k in (_KEY_PUBLIC_KEY, _KEY_SIGNATURE, _KEY_ADDRS, _KEY_VERSION))
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise HandshakeError(f"handshake payload: the identity key is not {PUBLIC_KEY_SIZE} bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise HandshakeError(f"handshake payload: the binding signature is not {SIGNATURE_SIZE} bytes")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise HandshakeError("handshake payload: protocol version is not a positive integer")
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"handshake payload: the peer speaks protocol {version}, not {PROTOCOL_VERSION} "
                             f"(the prologue 'swarm/{PROTOCOL_VERSION}')")
    minor = obj.get(_KEY_MINOR, 0)
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
        raise HandshakeError("handshake payload: the minor version is not an unsigned integer")
    if not isinstance(addrs, list):
        raise HandshakeError("handshake payload: listen addresses are not an array")
    if len(addrs) > limits.max_addresses:
        raise HandshakeError(f"handshake payload: more than {limits.max_addresses} listen addresses")
    try:
        listen_addrs = tuple(validate_listen_addr(a) for a in addrs)
    except ValueError as exc:
        raise HandshakeError(f"handshake payload: {exc}") from None
    try:
        verify_signature(public_key, _binding_message(noise_static_public_key), signature)
    except BadSignature:
        raise HandshakeError("handshake payload: the identity key did not sign this Noise static key") from None
    if not satisfies_puzzle(peer_id_of(public_key)):
        raise HandshakeError(f"handshake payload: the peer id does not solve the identity puzzle ({PUZZLE_BITS} "
                             "leading zero bits); the peer must run 'swarm-peer keygen --force'")
    return public_key, listen_addrs, minor


# -- the handshake -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeResult:
    """What a completed handshake established. The cipher states are live: the
    transport layer advances their counters."""

    peer_id: bytes
    public_key: bytes
    listen_addrs: tuple[str, ...]
    handshake_hash: bytes
    protocol_version: int  # the major version: 1
    minor_version: int  # the negotiated minor
    send_cipher: CipherState
    recv_cipher: CipherState

    def __post_init__(self) -> None:
        if len(self.public_key) != PUBLIC_KEY_SIZE or self.peer_id != peer_id_of(self.public_key):
            raise ValueError("peer_id must be the peer id of public_key")
        if len(self.handshake_hash) != 32:
            raise ValueError("handshake_hash is 32 bytes")
        if not isinstance(self.listen_addrs, tuple):
            raise TypeError("listen_addrs must be a tuple")


class Handshake:
    """One side of the swarm handshake, message by message (no framing, no I/O).

    Args:
        identity: this peer's Ed25519 identity.
        role: INITIATOR (dialled out) or RESPONDER (accepted).
        listen_addrs: addresses this peer accepts connections on, sent to the peer.
        limits: protocol limits (max_addresses).
        expected_peer_id: if given, the peer must prove this peer id.
        static_private_key: the X25519 Noise static key (one is generated if None).
        ephemeral_private_key: fixes the ephemeral key; test vectors only.
        minor_version, min_minor_version: the highest minor offered and the lowest
            accepted (tests of the version rule; peers keep the defaults).

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
        minor_version: int = MINOR_VERSION,
        min_minor_version: int = MIN_MINOR_VERSION,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, not {role!r}")
        if isinstance(listen_addrs, (str, bytes)):
            raise LocalProtocolError("listen_addrs must be a sequence of addresses, not one string")
        try:
            addrs = tuple(validate_listen_addr(a) for a in listen_addrs)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if len(addrs) > limits.max_addresses:
            raise LocalProtocolError(f"at most {limits.max_addresses} listen addresses")
        if expected_peer_id is not None and (not isinstance(expected_peer_id, bytes) or len(expected_peer_id) != PEER_ID_SIZE):
            raise LocalProtocolError(f"expected_peer_id must be {PEER_ID_SIZE} bytes")
        for name, key in (("static_private_key", static_private_key), ("ephemeral_private_key", ephemeral_private_key)):
            if key is not None and (not isinstance(key, bytes) or len(key) != DHLEN):
                raise LocalProtocolError(f"{name} must be {DHLEN} bytes")
        self.role = role
        self.state = HandshakeState.START
        self._limits = limits
        self._expected_peer_id = expected_peer_id
        self._noise = NoiseHandshakeState(
            NOISE_PATTERN,
            initiator=role is Role.INITIATOR,
            prologue=PROLOGUE,
            static_private_key=static_private_key if static_private_key is not None else generate_private_key(),
            ephemeral_private_key=ephemeral_private_key,
        )
        assert self._noise.static_public_key is not None
        self.static_public_key: bytes = self._noise.static_public_key
        self._minor = minor_version
        self._min_minor = min_minor_version
        self._payload = encode_handshake_payload(identity, self.static_public_key, addrs,
                                                 minor_version=minor_version)
        self._error: ProtocolError | None = None
        self._remote: tuple[bytes, tuple[str, ...], int] | None = None
        self.result: HandshakeResult | None = None

    def _advance(self, event: HandshakeEvent) -> HandshakeState:
        if self._error is not None:
            raise self._error
        try:
            return next_handshake_state(self.role, self.state, event)
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: ProtocolError) -> None:
        self.state = HandshakeState.ERROR
        self._error = exc

    def write_message(self) -> bytes:
        """The next Noise message this side must send (message 1, 2 or 3).

        Raises:
            LocalProtocolError: it is not this side's turn (then the state is ERROR).
        """
        new_state = self._advance(HandshakeEvent.SEND_MESSAGE)
        try:
            payload = b"" if self.state is HandshakeState.START else self._payload
            message = self._noise.write_message(payload)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        self.state = new_state
        if new_state is HandshakeState.DONE:
            self._finish()
        return message

    def read_message(self, message: bytes) -> None:
        """Process the peer's next Noise message.

        Raises:
            HandshakeError: the peer may not send now, the message is malformed, the
                peer's identity binding is invalid or not the expected one, or its
                version cannot be spoken.
        """
        new_state = self._advance(HandshakeEvent.RECEIVE_MESSAGE)
        try:
            if self.state is HandshakeState.START:  # responder reading message 1: just "e"
                if len(message) != DHLEN:
                    raise HandshakeError(f"handshake message 1 must be {DHLEN} bytes, not {len(message)}")
                self._noise.read_message(message)
            else:
                payload = self._noise.read_message(message)
                assert self._noise.remote_static is not None
                self._remote = decode_handshake_payload(payload, self._noise.remote_static, self._limits)
                negotiate_minor(self._minor, self._remote[2], minimum=self._min_minor)
                peer_id = peer_id_of(self._remote[0])
                if self._expected_peer_id is not None and peer_id != self._expected_peer_id:
                    raise HandshakeError(
                        f"peer proved id {peer_id.hex()}, expected {self._expected_peer_id.hex()}"
                    )
        except (DecryptError, DecodeError, LimitExceeded) as exc:
            error = HandshakeError(f"handshake message failed: {exc}")
            self._fail(error)
            raise error from None
        except ProtocolError as exc:
            self._fail(exc)
            raise
        self.state = new_state
        if new_state is HandshakeState.DONE:
            self._finish()

    def _finish(self) -> None:
        assert self._remote is not None
        public_key, listen_addrs, remote_minor = self._remote
        send_cipher, recv_cipher = self._noise.split()
        self.result = HandshakeResult(
            peer_id=peer_id_of(public_key),
            public_key=public_key,
            listen_addrs=listen_addrs,
            handshake_hash=self._noise.handshake_hash,
            protocol_version=PROTOCOL_VERSION,
            minor_version=negotiate_minor(self._minor, remote_minor, minimum=self._min_minor),
            send_cipher=send_cipher,
            recv_cipher=recv_cipher,
        )

