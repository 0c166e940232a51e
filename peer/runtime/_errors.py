"""Typed errors of the model runtime.

Every failure a caller can cause (a bad source, a span outside the model, a session
that outgrew its ``max_length``, a cache budget that is full) is one of these, with a
one-line message that says what to do. They subclass :class:`protocol.errors.SwarmError`
so the server can answer them as ``ERROR {code, message}`` without translation.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, SwarmError

__all__ = [
    "ModelError",
    "UnknownModel",
    "ModelFileMissing",
    "UnsupportedArchitecture",
    "HubUnavailable",
    "SpanOutOfRange",
    "InvalidArgument",
    "QuantizationUnavailable",
    "MaxLengthExceeded",
    "SessionMemoryExhausted",
    "UnknownSession",
    "PositionMismatch",
]


class ModelError(SwarmError):
    """A model could not be resolved or loaded."""

    code = ErrorCode.INVALID_REQUEST


class UnknownModel(ModelError):
    """The source is neither a built-in name, a local path nor a hub id."""


class ModelFileMissing(ModelError):
    """A file the model needs (weights, config, the built-in package) is not there."""


class UnsupportedArchitecture(ModelError):
    """The model is not a decoder family this runtime can split into spans."""


class HubUnavailable(ModelError):
    """A hub id was given but the Hugging Face Hub cannot be reached (offline)."""

    code = ErrorCode.INTERNAL


class SpanOutOfRange(ModelError):
    """The requested blocks [start, end) are not a non-empty range inside the model."""


class InvalidArgument(SwarmError):
    """An argument with an invalid value (sampling parameters, dtype, shapes)."""

    code = ErrorCode.INVALID_REQUEST


class QuantizationUnavailable(ModelError):
    """bitsandbytes quantization was requested but cannot run here."""


class MaxLengthExceeded(SwarmError):
    """A forward step would take the session past the max_length it was opened with."""

    code = ErrorCode.MAX_LENGTH_EXCEEDED


class SessionMemoryExhausted(SwarmError):
    """The cache budget cannot hold a new session of the requested max_length."""

    code = ErrorCode.OUT_OF_MEMORY


class UnknownSession(SwarmError):
    """No such session: never opened, already closed, or evicted for idleness."""

    code = ErrorCode.UNKNOWN_SESSION


class PositionMismatch(SwarmError):
    """A forward step's position is not the session's current length."""

    code = ErrorCode.BAD_STATE
