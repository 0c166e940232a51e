"""The swarm-peer wire protocol, sans-IO: bytes in, messages and events out.

No sockets, no clocks, no trio (a test checks it); torch only in the tensor codec.
Normative description: spec/SPEC.md.
"""

from ._cbor import decode as cbor_decode, encode as cbor_encode
from ._connection import (
    NEED_DATA,
    Connection,
    ConnectionEnded,
    ConnectionState,
    Event,
    HandshakeComplete,
    MessageReceived,
)
from ._handshake import HANDSHAKE_TRANSITIONS, PROTOCOL_VERSION, Role
from ._messages import MESSAGE_TYPES, RESPONSES, Message, decode_message, encode_message
from ._session import SESSION_TRANSITIONS, SessionState
from ._identity import (
    PEER_ID_SIZE,
    PUBLIC_KEY_SIZE,
    PUZZLE_BITS,
    Identity,
    atomic_write,
    peer_id_of,
    satisfies_puzzle,
    verify_signature,
)
from ._limits import DEFAULT_LIMITS, NOISE_MAX_MESSAGE, Limits
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__all__ = [
    "cbor_decode",
    "cbor_encode",
    "Connection",
    "ConnectionState",
    "ConnectionEnded",
    "Event",
    "HandshakeComplete",
    "MessageReceived",
    "NEED_DATA",
    "Role",
    "HANDSHAKE_TRANSITIONS",
    "PROTOCOL_VERSION",
    "Message",
    "MESSAGE_TYPES",
    "RESPONSES",
    "encode_message",
    "decode_message",
    "SESSION_TRANSITIONS",
    "SessionState",
    "Identity",
    "peer_id_of",
    "verify_signature",
    "satisfies_puzzle",
    "PUZZLE_BITS",
    "atomic_write",
    "PEER_ID_SIZE",
    "PUBLIC_KEY_SIZE",
    "Limits",
    "DEFAULT_LIMITS",
    "NOISE_MAX_MESSAGE",
    *_errors_all,
]
