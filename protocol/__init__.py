"""The swarm-peer wire protocol, sans-IO: bytes in, messages and events out.

No sockets, no clocks, no trio (a test checks it); torch only in the tensor codec.
Normative description: spec/SPEC.md.

This is the package's public surface; its modules are private (``_x.py``) and nothing
outside ``protocol/`` imports them (a test checks that too). The tensor codec
(``WireTensor``, ``encode_tensor``, ``decode_tensor``, ``DTYPES``, ...) is loaded on
first use, so ``import protocol`` does not import torch.
"""

from typing import TYPE_CHECKING, Any

from ._cbor import decode as cbor_decode, encode as cbor_encode
from ._channel import (
    UNSERVED_CAP,
    Channel,
    ChannelEvent,
    Decoded,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    error_for,
    response_cap,
    type_cap,
)
from ._connection import (
    NEED_DATA,
    Connection,
    ConnectionEnded,
    ConnectionState,
    Event,
    HandshakeComplete,
    MessageReceived,
)
from ._handshake import HANDSHAKE_TRANSITIONS, MINOR_VERSION, PROTOCOL_VERSION, VERSION_TEXT, Role
from ._identity import (
    PEER_ID_SIZE,
    PUBLIC_KEY_SIZE,
    PUZZLE_BITS,
    PUZZLE_DOMAIN,
    Identity,
    atomic_write,
    derive_counter,
    derive_seed,
    peer_id_of,
    puzzle_hash,
    satisfies_puzzle,
    verify_signature,
)
from ._limits import DEFAULT_LIMITS, NOISE_MAX_MESSAGE, Limits
from ._model_id import (
    CONFIG_KEYS,
    MODEL_ID_DOMAIN,
    MODEL_ID_PATTERN,
    json_to_cbor,
    make_model_id,
    model_digest,
    model_id_document,
)
from ._messages import (
    CONNECTION_ERROR_ID,
    MAX_BLOCKS,
    MAX_MODELS,
    MAX_NEXT_PINGS,
    MAX_NODES,
    MAX_RECORD_VALUE,
    MAX_RECORDS,
    MESSAGE_TYPES,
    RESPONSES,
    Announcement,
    CloseSession,
    CreditQuery,
    CreditReport,
    Error,
    FindNode,
    FindValue,
    Forward,
    ForwardEvidence,
    ForwardOnce,
    ForwardOnceResult,
    ForwardResult,
    FraudProof,
    FraudProofAck,
    FraudProofNotice,
    Message,
    ModelDescriptor,
    ModelEntry,
    ModelQuery,
    ModelReport,
    NextPing,
    NodeInfo,
    Nodes,
    OpenSession,
    Ping,
    Pong,
    Receipt,
    ReceiptAck,
    ReceiptRecord,
    SessionClosed,
    SessionOpened,
    SignedRecord,
    Store,
    Stored,
    Structure,
    Value,
    decode_envelope,
    decode_message,
    encode_message,
)
from ._push_messages import (
    MAX_PUSH_HOPS,
    HopOutput,
    Push,
    Pushed,
    PushFailure,
    PushHop,
    PushResult,
    PushResultAck,
)
from ._exchange import (
    DEFAULT_BLOCKSIZE,
    accept_forward_once_result,
    accept_result,
    check_forward,
    check_forward_once,
    check_input,
    check_open_session,
    check_result_signature,
    forward_once_state,
    replay_requests,
    request_statement,
    result_statement,
    sign_forward,
    sign_forward_once,
    sign_forward_once_result,
    sign_result,
    sign_push,
    push_input,
    check_push,
    sign_push_output,
    push_onward,
    sign_push_failure,
    check_push_failure,
    PushOutcome,
    accept_push_result,
    sign_pushed_requests,
)
from ._session import SESSION_TRANSITIONS, SessionEvent, SessionPhase, SessionState, SignedStep, kept_rows
from ._statements import (
    DOMAIN_FORWARD_REQUEST,
    DOMAIN_FORWARD_RESULT,
    DOMAIN_RECEIPT,
    DOMAIN_RECEIPT_COUNTERSIGN,
    DOMAIN_RECORD,
    EMPTY_HISTORY,
    extend_history,
    rollback_history,
    forward_request_statement,
    forward_result_statement,
    receipt_statement,
    record_statement,
    DOMAIN_PUSH_REQUEST,
    DOMAIN_PUSH_FAILURE,
    push_request_statement,
    push_failure_statement,
)
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

if TYPE_CHECKING:
    # Re-exported (listed in __all__ through _TENSOR_NAMES) for type checkers only; at
    # run time __getattr__ imports them on first access.
    from ._tensor import BLOCKSIZES as BLOCKSIZES, DTYPES as DTYPES, LOSSLESS as LOSSLESS
    from ._tensor import QUANTIZED as QUANTIZED, WireTensor as WireTensor
    from ._tensor import decode_tensor as decode_tensor, encode_tensor as encode_tensor

#: Names of the tensor codec, imported from ``_tensor`` (and torch) on first access.
_TENSOR_NAMES = ("WireTensor", "encode_tensor", "decode_tensor", "DTYPES", "LOSSLESS", "QUANTIZED", "BLOCKSIZES")

__all__ = [
    # CBOR
    "cbor_decode",
    "cbor_encode",
    # the connection (handshake and transport)
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
    "MINOR_VERSION",
    "VERSION_TEXT",
    # requests and responses over a connection
    "Channel",
    "Decoded",
    "UNSERVED_CAP",
    "response_cap",
    "type_cap",
    "ChannelEvent",
    "RequestReceived",
    "RequestRefused",
    "ResponseReceived",
    "error_for",
    # messages and the structures they carry
    "Message",
    "Structure",
    "MESSAGE_TYPES",
    "RESPONSES",
    "MAX_RECORD_VALUE",
    "MAX_RECORDS",
    "MAX_NODES",
    "MAX_MODELS",
    "MAX_BLOCKS",
    "CONNECTION_ERROR_ID",
    "encode_message",
    "decode_envelope",
    "decode_message",
    "NodeInfo",
    "SignedRecord",
    "Announcement",
    "NextPing",
    "MAX_NEXT_PINGS",
    "ReceiptRecord",
    "ForwardEvidence",
    "FraudProof",
    "Error",
    "Ping",
    "Pong",
    "FindNode",
    "Nodes",
    "FindValue",
    "Value",
    "Store",
    "Stored",
    "OpenSession",
    "SessionOpened",
    "Forward",
    "ForwardResult",
    "ForwardOnce",
    "ForwardOnceResult",
    "CloseSession",
    "SessionClosed",
    "Receipt",
    "ReceiptAck",
    "CreditQuery",
    "CreditReport",
    "FraudProofNotice",
    "FraudProofAck",
    "ModelDescriptor",
    "ModelEntry",
    "ModelQuery",
    "ModelReport",
    "HopOutput",
    "MAX_PUSH_HOPS",
    "Push",
    "Pushed",
    "PushFailure",
    "PushHop",
    "PushResult",
    "PushResultAck",
    # tensors (lazy)
    *_TENSOR_NAMES,
    # signed statements
    "DOMAIN_FORWARD_REQUEST",
    "DOMAIN_FORWARD_RESULT",
    "DOMAIN_RECORD",
    "DOMAIN_RECEIPT",
    "DOMAIN_RECEIPT_COUNTERSIGN",
    "EMPTY_HISTORY",
    "extend_history",
    "rollback_history",
    "forward_request_statement",
    "forward_result_statement",
    "record_statement",
    "DOMAIN_PUSH_REQUEST",
    "DOMAIN_PUSH_FAILURE",
    "push_request_statement",
    "push_failure_statement",
    "receipt_statement",
    # sessions and the forward exchange
    "SESSION_TRANSITIONS",
    "SessionEvent",
    "SessionPhase",
    "SessionState",
    "SignedStep",
    "kept_rows",
    "sign_forward",
    "check_forward",
    "sign_result",
    "sign_push",
    "push_input",
    "check_push",
    "sign_push_output",
    "push_onward",
    "sign_push_failure",
    "check_push_failure",
    "PushOutcome",
    "accept_push_result",
    "sign_pushed_requests",
    "accept_result",
    "sign_forward_once",
    "forward_once_state",
    "check_forward_once",
    "sign_forward_once_result",
    "accept_forward_once_result",
    "check_input",
    "check_open_session",
    "DEFAULT_BLOCKSIZE",
    "request_statement",
    "result_statement",
    "replay_requests",
    "check_result_signature",
    # identities
    "Identity",
    "peer_id_of",
    "verify_signature",
    "satisfies_puzzle",
    "PUZZLE_BITS",
    "PUZZLE_DOMAIN",
    "puzzle_hash",
    "derive_seed",
    "derive_counter",
    "atomic_write",
    "PEER_ID_SIZE",
    "PUBLIC_KEY_SIZE",
    # model ids
    "CONFIG_KEYS",
    "MODEL_ID_DOMAIN",
    "MODEL_ID_PATTERN",
    "json_to_cbor",
    "make_model_id",
    "model_digest",
    "model_id_document",
    # limits
    "Limits",
    "DEFAULT_LIMITS",
    "NOISE_MAX_MESSAGE",
    # errors
    *_errors_all,
]


def __getattr__(name: str) -> Any:
    if name in _TENSOR_NAMES:
        from . import _tensor

        value = getattr(_tensor, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'protocol' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
