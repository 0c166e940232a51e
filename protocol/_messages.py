"""Message types and the envelope (spec/SPEC.md, "Messages" and "Message registry").

Every application message is the deterministic CBOR array ``[type, id, body]``:
``type`` a uint from the registry, ``id`` the request id (a response echoes its
request's), ``body`` a map with small-integer keys declared by the class's
``FIELDS``. Classes are frozen, slotted, keyword-only dataclasses validated on
construction; the registry below is the only dispatch from type numbers to
classes. Unknown body keys are ignored; an unknown type is ``UNKNOWN_MESSAGE``.

A message class holds the body only: the id belongs to the envelope, and the
request multiplexer (``_channel``) is what numbers requests and matches responses.
Request ids are 1 .. 2**64-1: id 0 is reserved for the connection-level ``ERROR`` a
peer MAY send before it closes a connection (spec section 6, "ERROR"), so a request
or a response other than ``ERROR`` with id 0 is malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ._cbor import ENVELOPE_HEAD_MAX, decode as cbor_decode, encode as cbor_encode, envelope_head
from ._fields import (
    Bool,
    Bytes,
    Field,
    Float,
    ListOf,
    Span,
    Struct,
    TensorCodec,
    Text,
    UInt,
    envelope_items,
    fields_from_cbor,
    fields_to_cbor,
    validate_fields,
)
from ._identity import PEER_ID_SIZE, PUBLIC_KEY_SIZE, Identity, peer_id_of
from ._limits import DEFAULT_LIMITS, Limits
from ._statements import record_statement, receipt_statement, verify
from .errors import DecodeError, ErrorCode, LocalProtocolError, ProtocolError, UnexpectedMessage

__all__ = [
    "Structure",
    "Message",
    "MESSAGE_TYPES",
    "RESPONSES",
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
    "ModelDescriptor",
    "ModelEntry",
    "CONNECTION_ERROR_ID",
    "MAX_BLOCKS",
    "MAX_MODELS",
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
    "ModelQuery",
    "ModelReport",
]

_STRUCT = dict(frozen=True, slots=True, kw_only=True)

PEER_ID = Bytes(size=PEER_ID_SIZE)
PUBKEY = Bytes(size=PUBLIC_KEY_SIZE)
SIGNATURE = Bytes(size=64)
DIGEST = Bytes(size=32)
SESSION_ID = Bytes(size=16)
MODEL_ID = Text(max=128, nonempty=True)
ADDRESS = Text(max=64, nonempty=True)
WIRE_DTYPE = Text(max=8, nonempty=True)
TENSOR = TensorCodec()
MAX_RECORD_VALUE = 2048
MAX_NODES = 20  # k
MAX_RECORDS = 64
MAX_BLOCKS = 1 << 16  # Span's bound: the most blocks a model may have
MAX_MODELS = 16  # models one MODEL_REPORT lists
#: The envelope id of a connection-level ERROR: never a request's.
CONNECTION_ERROR_ID = 0
_VERSION_TEXT = Text(max=16, nonempty=True)


class Structure:
    """Base of every structure and message body: a map with small-integer keys, one
    per entry of ``FIELDS``, validated on construction."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[Field, ...]] = ()

    def __post_init__(self) -> None:
        validate_fields(self)

    def to_cbor(self) -> dict[int, Any]:
        """The structure as the CBOR data model (the map the wire carries)."""
        return fields_to_cbor(self, self.FIELDS)

    @classmethod
    def from_cbor(cls, obj: Any, *, limits: Limits = DEFAULT_LIMITS) -> Any:
        """The structure from the CBOR data model, checked strictly.

        Raises:
            DecodeError: not a map of the declared fields, or fields invalid together.
            LimitExceeded: a tensor in it exceeds ``limits``.
        """
        return _construct(cls, fields_from_cbor(obj, cls.FIELDS, limits))


# --- structures carried inside messages ----------------------------------------------


@dataclass(**_STRUCT)
class NodeInfo(Structure):
    """A DHT contact. The peer id must be the hash of the public key."""

    peer_id: bytes
    public_key: bytes
    addrs: tuple[str, ...]
    FIELDS: ClassVar = (
        Field(0, "peer_id", PEER_ID),
        Field(1, "public_key", PUBKEY),
        Field(2, "addrs", ListOf(ADDRESS, max=8)),
    )

    def __post_init__(self) -> None:
        Structure.__post_init__(self)
        if peer_id_of(self.public_key) != self.peer_id:
            raise LocalProtocolError("NodeInfo.peer_id is not the hash of its public key")


@dataclass(**_STRUCT)
class SignedRecord(Structure):
    """A DHT value, signed by its publisher; see record_statement for the signed bytes."""

    key: bytes
    publisher: bytes  # Ed25519 public key
    seq: int
    expires: int  # unix time, seconds
    value: bytes
    signature: bytes
    FIELDS: ClassVar = (
        Field(0, "key", DIGEST),
        Field(1, "publisher", PUBKEY),
        Field(2, "seq", UInt()),
        Field(3, "expires", UInt()),
        Field(4, "value", Bytes(max=MAX_RECORD_VALUE)),
        Field(5, "signature", SIGNATURE),
    )

    @classmethod
    def create(cls, identity: Identity, *, key: bytes, seq: int, expires: int, value: bytes) -> SignedRecord:
        statement = record_statement(key=key, publisher=identity.public_key, seq=seq, expires=expires, value=value)
        return cls(key=key, publisher=identity.public_key, seq=seq, expires=expires, value=value,
                   signature=identity.sign(statement))

    @property
    def publisher_id(self) -> bytes:
        return peer_id_of(self.publisher)

    def verify_signature(self) -> None:
        """Raises BadSignature unless the publisher signed exactly these fields."""
        statement = record_statement(key=self.key, publisher=self.publisher, seq=self.seq,
                                     expires=self.expires, value=self.value)
        verify(self.publisher, statement, self.signature)


@dataclass(**_STRUCT)
class NextPing(Structure):
    """A round trip a server measured to a server of the blocks after its span."""

    peer_id: bytes
    rtt: float  # seconds
    FIELDS: ClassVar = (
        Field(0, "peer_id", PEER_ID),
        Field(1, "rtt", Float()),
    )


#: Entries of ``Announcement.next_pings`` at most (a block record is at most 2,048 bytes).
MAX_NEXT_PINGS = 8


@dataclass(**_STRUCT)
class Announcement(Structure):
    """The value of a block record: a server announcing the span it serves, and
    (optionally, Petals' ``next_pings``) the RTTs it measured to servers of the blocks
    that follow its span, one entry per peer, sorted by peer id."""

    peer_id: bytes
    addrs: tuple[str, ...]
    model: str
    span: tuple[int, int]
    throughput: float  # tokens/s through the whole span, measured at start-up
    free_sessions: int
    expires: int
    next_pings: tuple[NextPing, ...] | None = None
    # 8 and 9 (protocol 1.1): the model's shape, so a client can plan a chain and size
    # its tensors from the announcements alone.
    num_blocks: int | None = None  # L, the model's block count
    hidden_size: int | None = None  # H, the width of the hidden states between spans
    FIELDS: ClassVar = (
        Field(0, "peer_id", PEER_ID),
        Field(1, "addrs", ListOf(ADDRESS, max=8)),
        Field(2, "model", MODEL_ID),
        Field(3, "span", Span()),
        Field(4, "throughput", Float()),
        Field(5, "free_sessions", UInt()),
        Field(6, "expires", UInt()),
        Field(7, "next_pings", ListOf(Struct(NextPing), max=MAX_NEXT_PINGS), optional=True),
        Field(8, "num_blocks", UInt(max=MAX_BLOCKS), optional=True),
        Field(9, "hidden_size", UInt(max=1 << 20), optional=True),
    )

    def __post_init__(self) -> None:
        Structure.__post_init__(self)
        if self.num_blocks is not None and self.span[1] > self.num_blocks:
            raise LocalProtocolError(f"Announcement.span {list(self.span)} ends past num_blocks {self.num_blocks}")
        if self.hidden_size == 0:
            raise LocalProtocolError("Announcement.hidden_size must be at least 1")
        if self.next_pings is not None:
            ids = [p.peer_id for p in self.next_pings]
            if ids != sorted(set(ids)):
                raise LocalProtocolError("Announcement.next_pings must be sorted by peer id, each peer once")

    def to_bytes(self) -> bytes:
        return cbor_encode(self.to_cbor())

    @classmethod
    def from_bytes(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Announcement:
        return cls.from_cbor(cbor_decode(data, max_size=MAX_RECORD_VALUE), limits=limits)


@dataclass(**_STRUCT)
class ReceiptRecord(Structure):
    """A client's signed acknowledgement of cumulative work received from a server,
    countersigned by the server (a double-signed bilateral record)."""

    client: bytes  # Ed25519 public key of the client (who received the work)
    server: bytes  # Ed25519 public key of the server (who did the work)
    handshake_hash: bytes
    seq: int
    work: int  # cumulative blocks x tokens received from this server
    client_signature: bytes
    server_signature: bytes | None = None
    FIELDS: ClassVar = (
        Field(0, "client", PUBKEY),
        Field(1, "server", PUBKEY),
        Field(2, "handshake_hash", DIGEST),
        Field(3, "seq", UInt()),
        Field(4, "work", UInt()),
        Field(5, "client_signature", SIGNATURE),
        Field(6, "server_signature", SIGNATURE, optional=True),
    )

    def statement(self, *, countersign: bool = False) -> bytes:
        return receipt_statement(client=self.client, server=self.server, handshake_hash=self.handshake_hash,
                                 seq=self.seq, work=self.work, countersign=countersign)

    def verify(self, *, require_countersignature: bool = True) -> None:
        """Raises BadSignature unless both signatures (or the client's alone) verify."""
        verify(self.client, self.statement(), self.client_signature)
        if self.server_signature is not None or require_countersignature:
            if self.server_signature is None:
                raise DecodeError("receipt lacks the server's countersignature")
            verify(self.server, self.statement(countersign=True), self.server_signature)


@dataclass(**_STRUCT)
class ForwardEvidence(Structure):
    """One client-signed FORWARD request of a session, as kept for audits and proofs."""

    step: int
    position: int
    hidden: Any  # WireTensor
    signature: bytes  # the client's, over forward_request_statement
    FIELDS: ClassVar = (
        Field(0, "step", UInt()),
        Field(1, "position", UInt()),
        Field(2, "hidden", TENSOR),
        Field(3, "signature", SIGNATURE),
    )


@dataclass(**_STRUCT)
class FraudProof(Structure):
    """Evidence that ``accused`` signed a wrong output: the client-signed inputs of the
    session up to the disputed step and the accused's signed output for that step.
    Anyone holding the span recomputes and compares (spec "Fraud proofs")."""

    accused: bytes  # Ed25519 public key of the accused server
    client: bytes  # Ed25519 public key of the client that signed the requests
    model: str
    span: tuple[int, int]
    session: bytes
    requests: tuple[ForwardEvidence, ...]  # steps 0..k, in order
    output: Any  # WireTensor the accused returned for step k
    output_signature: bytes
    FIELDS: ClassVar = (
        Field(0, "accused", PUBKEY),
        Field(1, "client", PUBKEY),
        Field(2, "model", MODEL_ID),
        Field(3, "span", Span()),
        Field(4, "session", SESSION_ID),
        Field(5, "requests", ListOf(Struct(ForwardEvidence), max=4096)),
        Field(6, "output", TENSOR),
        Field(7, "output_signature", SIGNATURE),
    )


@dataclass(**_STRUCT)
class ModelDescriptor(Structure):
    """What a server tells about the model it serves (MODEL_REPORT, spec section 11.3):
    everything a client needs before OPEN_SESSION."""

    model: str  # the model id, name@digest (spec section 1)
    num_blocks: int  # L
    hidden_size: int  # H
    span: tuple[int, int]  # the blocks this server serves
    wire_dtypes: tuple[str, ...]  # the dtypes OPEN_SESSION accepts
    max_length: int  # the largest max_length OPEN_SESSION accepts (the model's context)
    source: str  # where a client gets embeddings, head and tokenizer: a hub id or built-in name; "" if none
    compute_dtype: str  # the dtype the server computes in (f32, f16, bf16): the audit precision class
    FIELDS: ClassVar = (
        Field(0, "model", MODEL_ID),
        Field(1, "num_blocks", UInt(max=MAX_BLOCKS)),
        Field(2, "hidden_size", UInt(max=1 << 20)),
        Field(3, "span", Span()),
        Field(4, "wire_dtypes", ListOf(WIRE_DTYPE, max=8)),
        Field(5, "max_length", UInt(max=1 << 20)),
        Field(6, "source", Text(max=256)),
        Field(7, "compute_dtype", WIRE_DTYPE),
    )

    def __post_init__(self) -> None:
        Structure.__post_init__(self)
        if self.num_blocks < 1 or self.hidden_size < 1:
            raise LocalProtocolError("ModelDescriptor: num_blocks and hidden_size are at least 1")
        if self.span[1] > self.num_blocks:
            raise LocalProtocolError(f"ModelDescriptor.span {list(self.span)} ends past num_blocks {self.num_blocks}")


@dataclass(**_STRUCT)
class ModelEntry(Structure):
    """One model of the swarm's model index in the DHT (kind ``swarm/1/model``, spec
    section 10): what a reader lists before it asks any server."""

    model: str
    num_blocks: int
    hidden_size: int
    source: str
    FIELDS: ClassVar = (
        Field(0, "model", MODEL_ID),
        Field(1, "num_blocks", UInt(max=MAX_BLOCKS)),
        Field(2, "hidden_size", UInt(max=1 << 20)),
        Field(3, "source", Text(max=256)),
    )

    def __post_init__(self) -> None:
        Structure.__post_init__(self)
        if self.num_blocks < 1 or self.hidden_size < 1:
            raise LocalProtocolError("ModelEntry: num_blocks and hidden_size are at least 1")


# --- messages -----------------------------------------------------------------------


class Message(Structure):
    """Base of all messages. ``TYPE`` is the registry number, ``KIND`` request/response."""

    __slots__ = ()
    TYPE: ClassVar[int]
    KIND: ClassVar[str]



def _message(type_: int, kind: str):
    def wrap(cls):
        cls.TYPE = type_
        cls.KIND = kind
        return cls

    return wrap


@_message(1, "response")
@dataclass(**_STRUCT)
class Error(Message):
    code: int
    message: str
    retry_after: float | None = None
    FIELDS: ClassVar = (Field(0, "code", UInt(max=65535)), Field(1, "message", Text(max=1024)),
                        Field(2, "retry_after", Float(), optional=True))

    @property
    def error_code(self) -> ErrorCode | int:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return self.code


@_message(2, "request")
@dataclass(**_STRUCT)
class Ping(Message):
    FIELDS: ClassVar = ()


@_message(3, "response")
@dataclass(**_STRUCT)
class Pong(Message):
    FIELDS: ClassVar = ()


@_message(4, "request")
@dataclass(**_STRUCT)
class FindNode(Message):
    target: bytes
    FIELDS: ClassVar = (Field(0, "target", PEER_ID),)


@_message(5, "response")
@dataclass(**_STRUCT)
class Nodes(Message):
    nodes: tuple[NodeInfo, ...]
    FIELDS: ClassVar = (Field(0, "nodes", ListOf(Struct(NodeInfo), max=MAX_NODES)),)


@_message(6, "request")
@dataclass(**_STRUCT)
class FindValue(Message):
    key: bytes
    FIELDS: ClassVar = (Field(0, "key", DIGEST),)


@_message(7, "response")
@dataclass(**_STRUCT)
class Value(Message):
    records: tuple[SignedRecord, ...]
    nodes: tuple[NodeInfo, ...]
    FIELDS: ClassVar = (Field(0, "records", ListOf(Struct(SignedRecord), max=MAX_RECORDS)),
                        Field(1, "nodes", ListOf(Struct(NodeInfo), max=MAX_NODES)))


@_message(8, "request")
@dataclass(**_STRUCT)
class Store(Message):
    record: SignedRecord
    FIELDS: ClassVar = (Field(0, "record", Struct(SignedRecord)),)


@_message(9, "response")
@dataclass(**_STRUCT)
class Stored(Message):
    FIELDS: ClassVar = ()


@_message(10, "request")
@dataclass(**_STRUCT)
class OpenSession(Message):
    model: str
    span: tuple[int, int]
    max_length: int
    wire_dtype: str = "f32"
    # q8/nf4 only (protocol 1.1): the block size of every tensor of the session, both
    # directions; absent means 4096. Lossless dtypes carry none.
    blocksize: int | None = None
    FIELDS: ClassVar = (Field(0, "model", MODEL_ID), Field(1, "span", Span()),
                        Field(2, "max_length", UInt(max=1 << 20)), Field(3, "wire_dtype", WIRE_DTYPE),
                        Field(4, "blocksize", UInt(max=1 << 20), optional=True))


@_message(11, "response")
@dataclass(**_STRUCT)
class SessionOpened(Message):
    session: bytes
    FIELDS: ClassVar = (Field(0, "session", SESSION_ID),)


@_message(12, "request")
@dataclass(**_STRUCT)
class Forward(Message):
    """One step of a session: hidden states of ``n`` tokens starting at ``position``."""

    session: bytes
    step: int
    position: int
    hidden: Any  # WireTensor of shape [1, n, hidden_size]
    signature: bytes  # client's, over forward_request_statement
    FIELDS: ClassVar = (Field(0, "session", SESSION_ID), Field(1, "step", UInt()), Field(2, "position", UInt()),
                        Field(3, "hidden", TENSOR), Field(4, "signature", SIGNATURE))


@_message(13, "response")
@dataclass(**_STRUCT)
class ForwardResult(Message):
    session: bytes
    step: int
    hidden: Any  # WireTensor
    signature: bytes  # server's, over forward_result_statement
    FIELDS: ClassVar = (Field(0, "session", SESSION_ID), Field(1, "step", UInt()), Field(2, "hidden", TENSOR),
                        Field(3, "signature", SIGNATURE))


@_message(14, "request")
@dataclass(**_STRUCT)
class ForwardOnce(Message):
    """Stateless forward of a whole sequence from position 0 (replays and audits)."""

    nonce: bytes  # stands in for the session id in the signed statements
    model: str
    span: tuple[int, int]
    hidden: Any  # WireTensor
    signature: bytes
    FIELDS: ClassVar = (Field(0, "nonce", SESSION_ID), Field(1, "model", MODEL_ID), Field(2, "span", Span()),
                        Field(3, "hidden", TENSOR), Field(4, "signature", SIGNATURE))


@_message(15, "response")
@dataclass(**_STRUCT)
class ForwardOnceResult(Message):
    hidden: Any  # WireTensor
    signature: bytes
    FIELDS: ClassVar = (Field(0, "hidden", TENSOR), Field(1, "signature", SIGNATURE))


@_message(16, "request")
@dataclass(**_STRUCT)
class CloseSession(Message):
    session: bytes
    FIELDS: ClassVar = (Field(0, "session", SESSION_ID),)


@_message(17, "response")
@dataclass(**_STRUCT)
class SessionClosed(Message):
    FIELDS: ClassVar = ()


@_message(18, "request")
@dataclass(**_STRUCT)
class Receipt(Message):
    receipt: ReceiptRecord  # signed by the client; the server countersigns in ReceiptAck
    FIELDS: ClassVar = (Field(0, "receipt", Struct(ReceiptRecord)),)


@_message(19, "response")
@dataclass(**_STRUCT)
class ReceiptAck(Message):
    receipt: ReceiptRecord  # double-signed
    FIELDS: ClassVar = (Field(0, "receipt", Struct(ReceiptRecord)),)


@_message(20, "request")
@dataclass(**_STRUCT)
class CreditQuery(Message):
    FIELDS: ClassVar = ()


@_message(21, "response")
@dataclass(**_STRUCT)
class CreditReport(Message):
    records: tuple[ReceiptRecord, ...]  # the latest double-signed record per pair the answerer holds
    FIELDS: ClassVar = (Field(0, "records", ListOf(Struct(ReceiptRecord), max=1024)),)


@_message(22, "request")
@dataclass(**_STRUCT)
class FraudProofNotice(Message):
    proof: FraudProof
    FIELDS: ClassVar = (Field(0, "proof", Struct(FraudProof)),)


@_message(23, "response")
@dataclass(**_STRUCT)
class FraudProofAck(Message):
    accepted: bool
    FIELDS: ClassVar = (Field(0, "accepted", Bool()),)


@_message(24, "request")
@dataclass(**_STRUCT)
class ModelQuery(Message):
    """What do you serve? Every server answers (spec section 11.3)."""

    FIELDS: ClassVar = ()


@_message(25, "response")
@dataclass(**_STRUCT)
class ModelReport(Message):
    versions: tuple[str, ...]  # the protocol versions this peer speaks, "major.minor"
    models: tuple[ModelDescriptor, ...]  # the models it serves (none for a peer that serves none)
    FIELDS: ClassVar = (Field(0, "versions", ListOf(_VERSION_TEXT, max=8)),
                        Field(1, "models", ListOf(Struct(ModelDescriptor), max=MAX_MODELS)))

    def __post_init__(self) -> None:
        Structure.__post_init__(self)
        for version in self.versions:
            major, dot, minor = version.partition(".")
            if not (dot and major.isdigit() and minor.isdigit() and major.isascii() and minor.isascii()):
                raise LocalProtocolError(f"ModelReport.versions: {version!r} is not major.minor")


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (Error, Ping, Pong, FindNode, Nodes, FindValue, Value, Store, Stored, OpenSession, SessionOpened,
                Forward, ForwardResult, ForwardOnce, ForwardOnceResult, CloseSession, SessionClosed, Receipt,
                ReceiptAck, CreditQuery, CreditReport, FraudProofNotice, FraudProofAck, ModelQuery, ModelReport)
}

#: The response type(s) a request may be answered with (ERROR is always allowed).
RESPONSES: dict[type[Message], type[Message]] = {
    Ping: Pong, FindNode: Nodes, FindValue: Value, Store: Stored, OpenSession: SessionOpened,
    Forward: ForwardResult, ForwardOnce: ForwardOnceResult, CloseSession: SessionClosed,
    Receipt: ReceiptAck, CreditQuery: CreditReport, FraudProofNotice: FraudProofAck, ModelQuery: ModelReport,
}


def encode_message(message: Message, request_id: int) -> bytes:
    """The deterministic CBOR envelope ``[type, id, body]`` of ``message``.

    Raises:
        LocalProtocolError: ``request_id`` is not an unsigned 64-bit integer, or is 0
            (reserved for a connection-level ``ERROR``) for another message.
    """
    if type(request_id) is not int or not 0 <= request_id < 2**64:
        raise LocalProtocolError(f"a request id is an unsigned 64-bit integer, got {request_id!r}")
    if request_id == CONNECTION_ERROR_ID and type(message) is not Error:
        raise LocalProtocolError("id 0 is reserved for a connection-level ERROR; request ids start at 1")
    return cbor_encode([message.TYPE, request_id, fields_to_cbor(message, message.FIELDS)])


def decode_envelope(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int, Any]:
    """``(type, id, body)`` of one envelope, the body not yet decoded.

    Raises:
        LimitExceeded: the bytes exceed ``limits.max_message_size``, or hold more
            data items than the type's budget (spec section 7.5).
        DecodeError: not the array ``[type, id, body]`` of unsigned type and id, or id 0
            on anything but an ``ERROR`` (a connection-level one).
    """
    head = envelope_head(data[:ENVELOPE_HEAD_MAX])
    if head is None:  # shorter than an envelope's head: nothing to budget, it fails below
        budget = None
    else:
        cls = MESSAGE_TYPES.get(head[0])
        budget = envelope_items(cls.FIELDS if cls is not None else None, limits)
    obj = cbor_decode(data, max_size=limits.max_message_size, max_items=budget)
    if type(obj) is not list or len(obj) != 3:
        raise DecodeError("a message is the array [type, id, body]")
    type_, id_, body = obj
    if type(type_) is not int or type(id_) is not int or not 0 <= id_ < 2**64 or type_ < 0:
        raise DecodeError("message type and id must be unsigned integers")
    if id_ == CONNECTION_ERROR_ID and type_ != Error.TYPE:
        raise DecodeError(f"message type {type_} with id 0: id 0 is reserved for a connection-level ERROR")
    return type_, id_, body


def decode_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> tuple[int, Message]:
    """Decode one envelope strictly into ``(id, message)``.

    Raises:
        LimitExceeded: the bytes or a tensor in them exceed ``limits``.
        UnexpectedMessage: an unknown message type (code UNKNOWN_MESSAGE).
        DecodeError: anything else malformed.
    """
    type_, id_, body = decode_envelope(data, limits=limits)
    cls = MESSAGE_TYPES.get(type_)
    if cls is None:
        raise UnexpectedMessage(f"unknown message type {type_}", code=ErrorCode.UNKNOWN_MESSAGE)
    return id_, cls.from_cbor(body, limits=limits)


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except ProtocolError as exc:  # a field was decodable but the whole is invalid
        raise DecodeError(str(exc)) from None
