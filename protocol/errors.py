"""One error hierarchy for the whole project, each class with a wire code.

``SwarmError`` is the root of every error swarm-peer raises on purpose.
``ProtocolError`` covers the wire protocol and says whose fault it is, the h11 way:
``LocalProtocolError`` (this side misused the API or tried to send something
illegal) and ``RemoteProtocolError`` (the peer sent something illegal: the
connection to it is dropped, never the whole peer). ``RemoteError`` is an ``ERROR``
message a peer sent us on purpose. Other packages subclass ``SwarmError`` for
their own failures (model, routing, identity files).

The numeric codes travel in ``ERROR`` messages (spec/SPEC.md section 14, "Errors").
``ERROR_RULES`` is the one rule for every code: who detects it, how it is reported
(the ``ERROR`` answering a request, or an ``ERROR`` with id 0 before the connection is
closed, or not at all) and whether the connection ends. Section 14's table is
generated from it and a test holds the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

__all__ = [
    "ErrorCode",
    "ErrorRule",
    "ERROR_RULES",
    "Report",
    "rule_of",
    "SwarmError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "DecodeError",
    "LimitExceeded",
    "HandshakeError",
    "DecryptError",
    "BadSignature",
    "UnexpectedMessage",
    "ConnectionClosed",
    "ConnectionAborted",
    "IdentityError",
    "InvalidRequest",
    "RemoteError",
    "swarm_error_in",
]


class ErrorCode(IntEnum):
    """Wire error codes. 1xx: the protocol (messages, signatures, states); 2xx: the
    request's arguments; 5xx: the server. Which codes end a connection: ``ERROR_RULES``."""

    MALFORMED = 100  # bytes that do not decode, are not canonical, or fail validation
    UNKNOWN_MESSAGE = 101  # a message type this peer does not know
    LIMIT_EXCEEDED = 102  # a size, count or element limit of the spec was exceeded
    HANDSHAKE_FAILED = 103  # Noise handshake or identity binding failed
    DECRYPT_FAILED = 104  # a transport frame failed authentication or arrived out of order
    BAD_SIGNATURE = 105  # a signed statement or record does not verify
    BAD_STATE = 106  # a message that the current state does not allow
    CONNECTION_CLOSED = 107  # the stream ended (possibly in the middle of a frame)

    INVALID_REQUEST = 200  # well-formed but semantically invalid arguments
    UNKNOWN_SESSION = 201  # no such inference session (never opened, closed or evicted)
    BUSY = 202  # no capacity right now; retry_after says when to try again
    MODEL_MISMATCH = 203  # this peer serves another model id
    SPAN_NOT_SERVED = 204  # the requested blocks are not served here
    MAX_LENGTH_EXCEEDED = 205  # a session would exceed its max_length
    OUT_OF_MEMORY = 206  # the session cache budget cannot fit the request
    BANNED = 207  # the requester is banned by this peer
    STALE_RECORD = 208  # a DHT record older (sequence) than the stored one
    EXPIRED = 209  # a record or receipt past its expiry
    INVALID_PROOF = 210  # a fraud proof that does not verify
    STORAGE_FULL = 211  # a DHT node's storage for the record (its publisher, source, key or class) is full

    INTERNAL = 500  # an unexpected failure on the server
    SHUTTING_DOWN = 501  # the server is stopping and accepts no new work
    LOADING = 502  # the server is starting and cannot serve yet; retry_after says when to try again


class Report(Enum):
    """How a code reaches the peer whose message caused it."""

    ANSWER = "the ERROR answering the request"
    NOTICE = "MAY be sent as ERROR with id 0, then the connection is closed"
    NONE = "never sent"


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """The one rule for an error code (spec section 14's table, row by row)."""

    meaning: str
    detected_by: str  # who finds the condition and so sends (or would send) the code
    report: Report
    ends_connection: bool
    retry_after: bool = False  # whether an ERROR with this code MAY carry retry_after


def _answer(meaning: str, detected_by: str, *, retry_after: bool = False) -> ErrorRule:
    return ErrorRule(meaning, detected_by, Report.ANSWER, False, retry_after)


_ANY = "any receiver of a message"
_SERVER = "a server"

#: Every code's rule. A code missing here is a bug (a test checks the enum is covered).
ERROR_RULES: dict[ErrorCode, ErrorRule] = {
    ErrorCode.MALFORMED: ErrorRule("bytes that do not decode, are not canonical, or fail the registry's validation "
                                   "(section 7.2); id 0 on anything but ERROR", _ANY, Report.NOTICE, True),
    ErrorCode.UNKNOWN_MESSAGE: _answer("a request type the receiver does not know or does not serve",
                                       "the receiver of a request"),
    ErrorCode.LIMIT_EXCEEDED: ErrorRule("a size, count or element limit of section 15 exceeded by a message, a "
                                        "tensor or the requests in flight", _ANY, Report.NOTICE, True),
    ErrorCode.HANDSHAKE_FAILED: ErrorRule("any failure before the handshake completes: Noise, the payload, the "
                                          "identity binding or puzzle, the version, a message out of turn",
                                          "either side of a handshake", Report.NONE, True),
    ErrorCode.DECRYPT_FAILED: ErrorRule("a transport frame failed authentication (tampered, replayed, reordered)",
                                        _ANY, Report.NOTICE, True),
    ErrorCode.BAD_SIGNATURE: _answer("a signed request, record, receipt or statement does not verify",
                                     "the peer checking the signature"),
    ErrorCode.BAD_STATE: _answer("a session request the session state does not allow (step, position, a step "
                                 "still computing)", _SERVER),
    ErrorCode.CONNECTION_CLOSED: ErrorRule("the stream ended, possibly in the middle of a frame or message",
                                           "the side whose stream ended", Report.NONE, True),
    ErrorCode.INVALID_REQUEST: _answer("well-formed but semantically invalid arguments", "the peer answering the request"),
    ErrorCode.UNKNOWN_SESSION: _answer("no such session (never opened, closed, evicted, or another connection's)",
                                       _SERVER),
    ErrorCode.BUSY: _answer("no capacity now; `retry_after` says when to try again", _SERVER, retry_after=True),
    ErrorCode.MODEL_MISMATCH: _answer("this peer serves another model id", _SERVER),
    ErrorCode.SPAN_NOT_SERVED: _answer("the requested blocks are not served here", _SERVER),
    ErrorCode.MAX_LENGTH_EXCEEDED: _answer("the session's `max_length` or the model's context would be exceeded",
                                           _SERVER),
    ErrorCode.OUT_OF_MEMORY: _answer("the session cache budget cannot fit the request", _SERVER),
    ErrorCode.BANNED: _answer("the requester is banned by this peer", _SERVER),
    ErrorCode.STALE_RECORD: _answer("a record or receipt with a sequence number not above the stored one",
                                    "a storing node or credit server"),
    ErrorCode.EXPIRED: _answer("a record or receipt past its expiry", "a storing node"),
    ErrorCode.INVALID_PROOF: _answer("a fraud proof that does not verify", "a fraud proof verifier"),
    ErrorCode.STORAGE_FULL: _answer("a DHT node's storage for the record's publisher, source, key or class is full "
                                    "(section 10)", "a storing node"),
    ErrorCode.INTERNAL: _answer("an unexpected failure on the server", "the peer answering the request"),
    ErrorCode.SHUTTING_DOWN: _answer("the server is stopping and accepts no new work", _SERVER, retry_after=True),
    ErrorCode.LOADING: _answer("the server is starting and cannot serve yet; `retry_after` estimates when it can "
                               "(section 11.1)", _SERVER, retry_after=True),
}


def rule_of(code: int) -> ErrorRule:
    """The rule for ``code``; a code this version does not know is handled as 200
    (1xx and 2xx) or 500 (any other): it fails the request and keeps the connection."""
    try:
        return ERROR_RULES[ErrorCode(code)]
    except (ValueError, KeyError):
        return ERROR_RULES[ErrorCode.INVALID_REQUEST if 100 <= code < 300 else ErrorCode.INTERNAL]


class SwarmError(Exception):
    """Root of the project's errors. ``code`` is the wire code, ``message`` one line."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = _as_code(code)

    def __str__(self) -> str:
        return self.message


class ProtocolError(SwarmError):
    """A violation of the wire protocol; after it the connection is unusable."""

    code = ErrorCode.MALFORMED


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (a bug or bad argument)."""


class RemoteProtocolError(ProtocolError):
    """The remote peer violated the protocol; drop that connection, keep serving others."""


class DecodeError(RemoteProtocolError):
    """Bytes that are not a valid, canonical encoding of a message."""

    code = ErrorCode.MALFORMED


class LimitExceeded(RemoteProtocolError):
    """A received item exceeds a limit of the spec (size, elements, concurrency)."""

    code = ErrorCode.LIMIT_EXCEEDED


class HandshakeError(RemoteProtocolError):
    """The Noise handshake or the identity binding in it failed."""

    code = ErrorCode.HANDSHAKE_FAILED


class DecryptError(RemoteProtocolError):
    """A transport frame failed authentication (tampered, replayed, reordered)."""

    code = ErrorCode.DECRYPT_FAILED


class BadSignature(RemoteProtocolError):
    """A signature over a statement or record does not verify."""

    code = ErrorCode.BAD_SIGNATURE


class UnexpectedMessage(RemoteProtocolError):
    """A message the current handshake or session state does not allow."""

    code = ErrorCode.BAD_STATE


class ConnectionClosed(RemoteProtocolError):
    """The byte stream ended, possibly in the middle of a frame."""

    code = ErrorCode.CONNECTION_CLOSED


class ConnectionAborted(RemoteProtocolError):
    """The peer ended the connection and said why (``ERROR`` with id 0, spec section
    6); ``code`` is the code it sent, usually naming a violation of ours."""

    code = ErrorCode.CONNECTION_CLOSED


class InvalidRequest(SwarmError):
    """A well-formed request whose arguments this peer does not accept (wrong dtype or
    shape, say); it is answered ``ERROR`` and the connection stays open."""

    code = ErrorCode.INVALID_REQUEST


class IdentityError(SwarmError):
    """An identity key file that is missing, corrupt or readable by others."""

    code = ErrorCode.INVALID_REQUEST


class RemoteError(SwarmError):
    """An ``ERROR`` a peer answered a request with.

    ``code`` may be a code this version does not know; it is kept as an int then.
    """

    def __init__(
        self, message: str, *, code: ErrorCode | int, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


def _as_code(code: ErrorCode | int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return int(code)


def swarm_error_in(exc: BaseException) -> SwarmError | None:
    """The SwarmError that ``exc`` is or wraps (nurseries wrap task errors in exception
    groups), or None if ``exc`` holds anything else, which is then a bug to show."""
    if isinstance(exc, SwarmError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [swarm_error_in(e) for e in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None
