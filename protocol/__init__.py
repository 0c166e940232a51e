"""The swarm-peer wire protocol, sans-IO: bytes in, messages and events out.

No sockets, no clocks, no trio (a test checks it); torch only in the tensor codec.
Normative description: spec/SPEC.md.
"""

from ._cbor import decode as cbor_decode, encode as cbor_encode
from ._identity import PEER_ID_SIZE, PUBLIC_KEY_SIZE, Identity, atomic_write, peer_id_of, verify_signature
from ._limits import DEFAULT_LIMITS, NOISE_MAX_MESSAGE, Limits
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__all__ = [
    "cbor_decode",
    "cbor_encode",
    "Identity",
    "peer_id_of",
    "verify_signature",
    "atomic_write",
    "PEER_ID_SIZE",
    "PUBLIC_KEY_SIZE",
    "Limits",
    "DEFAULT_LIMITS",
    "NOISE_MAX_MESSAGE",
    *_errors_all,
]
