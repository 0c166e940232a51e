"""One error hierarchy for the whole project, each class with a wire code.

``SwarmError`` is the root of every error swarm-peer raises on purpose.
``ProtocolError`` covers the wire protocol and says whose fault it is, the h11 way:
``LocalProtocolError`` (this side misused the API or tried to send something
illegal) and ``RemoteProtocolError`` (the peer sent something illegal: the
connection to it is dropped, never the whole peer). ``RemoteError`` is an ``ERROR``
message a peer sent us on purpose. Other packages subclass ``SwarmError`` for
their own failures (model, routing, identity files).

The numeric codes travel in ``ERROR`` messages (spec/SPEC.md, "Error codes").
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ErrorCode",
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
    "IdentityError",
    "InvalidRequest",
    "RemoteError",
    "swarm_error_in",
]


class ErrorCode(IntEnum):
    """Wire error codes. 1xx: the connection is at fault; 2xx: the request; 5xx: the server."""

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

    INTERNAL = 500  # an unexpected failure on the server
    SHUTTING_DOWN = 501  # the server is stopping and accepts no new work
    LOADING = 502  # the server is starting and cannot serve yet; retry_after says when to try again


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
