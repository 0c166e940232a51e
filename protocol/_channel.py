"""Request multiplexing over one connection, sans-IO (spec/SPEC.md section 6,
"Connections and requests", and section 7.1).

Theory of operation. A ``Channel`` sits on top of a ``Connection``'s application
messages (payload bytes in, payload bytes out) and owns everything about requests
and responses: the envelope ids, the map of requests this side has outstanding, the
check that a response has the type its request calls for, the count of requests the
peer has open on us and its limit, and the answers to types nobody can serve.

- ``send_request(request, token)`` numbers the request (1, 2, 3, ... per connection),
  records it as outstanding with the caller's opaque ``token`` and returns the
  payload to write. ``abandon(id)`` records that the requester stopped waiting: the
  request still counts against the peer's limit until its response arrives.
- ``receive(payload)`` returns what a received message means: ``RequestReceived``
  (a request to serve), ``RequestRefused`` (a request of a type that is unknown or
  not served here, with its ``ERROR`` already encoded), ``ResponseReceived`` (the
  outcome of one of our requests, carrying its token) or None (a response that
  matches nothing outstanding: ignored). Request types are even and response types
  odd, so a message of an unknown type is still known to be one or the other.
- ``answer(event, result)`` encodes the response to a ``RequestReceived`` (a
  handler's return value, or the ``ERROR`` its exception maps to) and
  ``answered()`` says it was written, freeing one of the peer's request slots.
- ``close()`` ends the channel and hands back the tokens of requests still awaited.

- ``message_cap(type, id)`` is the size cap of an incoming message, which the
  connection checks against its declared length before buffering it (spec section
  6): a request type this side serves has its type's cap (the largest its field
  table allows, or a lower one the application set: ``caps`` for the peer's
  defaults, ``allow`` to raise one for this connection, e.g. FORWARD once a session
  with its size is open); a request type not served, or unknown, is answered from
  its envelope alone and gets ``UNSERVED_CAP``; ``ERROR`` its type's cap; any other
  response the cap its request called for (``response_cap``: for FORWARD and
  FORWARD_ONCE, a tensor as large as the request's in the widest dtype), and
  ``UNSERVED_CAP`` if it answers nothing outstanding.
- ``decode(payload)`` is the pure part of ``receive`` (strict, budgeted decoding of
  the envelope and body, no state touched), so that the shell may run a large one in
  a worker thread; ``accept(decoded)`` is the rest. ``receive`` is both.

Connection-level errors (spec section 6, "ERROR", and section 14). Request ids start
at 1; id 0 is reserved for an ``ERROR`` that is about the connection, not a request:
a peer that is about to close the connection for a violation (MALFORMED,
LIMIT_EXCEEDED, DECRYPT_FAILED) MAY first send one, built by ``abort_payload``. When
one arrives, ``receive`` raises ``ConnectionAborted`` with the peer's code and
message: the connection is ending. Which code is answered and which ends the
connection is ``errors.ERROR_RULES``; ``error_for`` applies it to what a handler raised.

What is left to the caller (``swarm.transport``): writing, waiting, timeouts, and
waiting for a free slot before ``send_request`` (``can_request``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._fields import TensorCodec, envelope_size
from ._limits import DEFAULT_LIMITS, Limits
from ._messages import CONNECTION_ERROR_ID, MESSAGE_TYPES, RESPONSES, Error, Message, decode_envelope, encode_message
from .errors import (
    ConnectionAborted,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    Report,
    SwarmError,
    UnexpectedMessage,
    rule_of,
)

__all__ = [
    "Channel",
    "ChannelEvent",
    "RequestReceived",
    "RequestRefused",
    "ResponseReceived",
    "Decoded",
    "UNSERVED_CAP",
    "error_for",
    "response_cap",
    "type_cap",
]

_MAX_ERROR_TEXT = 1024  # bytes; Error.message's limit
_ID_SPACE = 2**64
#: Size cap of a message answered or ignored from its envelope alone: a request type
#: this side does not serve or know, a response to nothing outstanding (one Noise message).
UNSERVED_CAP = 65_536


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """Base class of what ``Channel.receive`` returns."""


@dataclass(frozen=True, slots=True)
class RequestReceived(ChannelEvent):
    """A request to serve: answer it with ``Channel.answer`` exactly once."""

    request_id: int
    request: Message


@dataclass(frozen=True, slots=True)
class RequestRefused(ChannelEvent):
    """A request of a type unknown or not served here; write ``payload`` (its
    ``ERROR UNKNOWN_MESSAGE``) and call ``Channel.answered``."""

    request_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ResponseReceived(ChannelEvent):
    """The outcome of one of our requests: ``response`` of the right type, or ``error``
    (``RemoteError`` for ``ERROR``, ``UnexpectedMessage`` for a type that does not fit).
    ``token`` is what ``send_request`` was given, None if the requester abandoned it."""

    request_id: int
    token: Any
    response: Message | None = None
    error: SwarmError | None = None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A received message decoded (``Channel.decode``), not yet accepted: ``message``
    is None for a type this side does not know."""

    type_: int
    request_id: int
    message: Message | None


@dataclass(slots=True)
class _Outstanding:
    request_type: type[Message]
    token: Any  # None once abandoned
    response_cap: int  # the most bytes its response may declare


def type_cap(cls: type[Message], limits: Limits, elements: int | None = None) -> int:
    """The most bytes a message of ``cls`` can take by its field table (tensors of at
    most ``elements`` elements, default ``limits.max_tensor_elements``), at most
    ``limits.max_message_size``: spec section 7.5."""
    return envelope_size(cls.TYPE, cls.FIELDS, limits, elements)


def response_cap(request: Message, limits: Limits) -> int:
    """The size cap of the response ``request`` calls for: its response type's cap,
    with tensors no larger than the request's own (FORWARD and FORWARD_ONCE answer a
    tensor of the shape they were sent, in any dtype). ``ERROR`` has its own cap."""
    response = RESPONSES[type(request)]
    elements = None
    if any(isinstance(f.codec, TensorCodec) for f in response.FIELDS):
        tensors = [getattr(request, f.name) for f in request.FIELDS if isinstance(f.codec, TensorCodec)]
        if tensors:
            elements = sum(t.numel for t in tensors if t is not None)
    return type_cap(response, limits, elements)


def error_for(exc: BaseException) -> Error:
    """The ``ERROR`` an exception raised while serving a request becomes: a
    ``SwarmError`` keeps its code and message (a ``RemoteError`` its retry_after, where
    the code's rule allows one); anything else is ``INTERNAL`` with a generic message,
    so no internals leak.

    Only codes whose rule is to answer a request are answered (``errors.ERROR_RULES``):
    a connection-level code a handler raised about something inside the request (a
    nested value that does not decode, say) is the request's fault, ``INVALID_REQUEST``;
    a ``LocalProtocolError`` is this side's own, ``INTERNAL``.
    """
    if isinstance(exc, SwarmError):
        code, text = int(exc.code), str(exc)
    else:
        code, text = int(ErrorCode.INTERNAL), "internal error"
    if not 0 <= code <= 65535:
        code = int(ErrorCode.INTERNAL)
    rule = rule_of(code)
    if rule.report is not Report.ANSWER:
        code = int(ErrorCode.INVALID_REQUEST if isinstance(exc, RemoteProtocolError) else ErrorCode.INTERNAL)
        rule = rule_of(code)
    retry_after = getattr(exc, "retry_after", None) if isinstance(exc, RemoteError) and rule.retry_after else None
    if retry_after is not None and not (isinstance(retry_after, (int, float)) and math.isfinite(retry_after)
                                        and retry_after >= 0):
        retry_after = None
    return Error(code=code, message=_one_line(text), retry_after=None if retry_after is None else float(retry_after))


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text.encode("utf-8", "replace")[:_MAX_ERROR_TEXT].decode("utf-8", "ignore")


class Channel:
    """See the module docstring.

    Args:
        limits: ``max_concurrent_requests`` bounds both directions, ``max_message_size``
            what is received and answered.
        serves: whether this side serves a request type (checked when a request
            arrives, so handlers may be added while the channel is open); default all.
        caps: request type -> this side's size cap for it, or None for the type's own
            cap (read when each message arrives: a live mapping's ``get`` works).
    """

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS,
                 serves: Callable[[type[Message]], bool] | None = None,
                 caps: Callable[[type[Message]], int | None] | None = None) -> None:
        self.limits = limits
        self._serves = serves or (lambda _type: True)
        self._caps = caps or (lambda _type: None)
        self._allowed: dict[type[Message], int] = {}
        self._outstanding: dict[int, _Outstanding] = {}
        self._next_id = 1
        self._incoming = 0
        self._closed = False

    # -- inspection -----------------------------------------------------------------

    @property
    def next_id(self) -> int:
        """The id the next request will get."""
        return self._next_id

    @property
    def outstanding(self) -> int:
        """Our requests whose responses have not arrived (abandoned ones included: the
        peer still counts them)."""
        return len(self._outstanding)

    @property
    def awaited(self) -> int:
        """Outstanding requests whose requester still waits."""
        return sum(1 for o in self._outstanding.values() if o.token is not None)

    @property
    def incoming(self) -> int:
        """Requests the peer has open on us (received, answer not yet written)."""
        return self._incoming

    @property
    def can_request(self) -> bool:
        """Whether ``send_request`` stays within the peer's concurrency limit."""
        return len(self._outstanding) < self.limits.max_concurrent_requests

    # -- our requests ---------------------------------------------------------------

    def send_request(self, request: Message, token: Any) -> tuple[int, bytes]:
        """Number ``request`` and return ``(id, payload)``; the payload must be written.

        ``token`` (not None) comes back in the ``ResponseReceived`` that answers it.

        Raises:
            LocalProtocolError: not a request, the channel is closed, or
                ``max_concurrent_requests`` are outstanding (wait for ``can_request``).
        """
        if request.KIND != "request":
            raise LocalProtocolError(f"{type(request).__name__} is not a request")
        if token is None:
            raise LocalProtocolError("a request needs a token to match its response to")
        if self._closed:
            raise LocalProtocolError("the channel is closed")
        if not self.can_request:
            raise LocalProtocolError(f"{self.limits.max_concurrent_requests} requests are already outstanding")
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id + 1 < _ID_SPACE else 1
        payload = encode_message(request, request_id)
        self._outstanding[request_id] = _Outstanding(type(request), token, response_cap(request, self.limits))
        return request_id, payload

    def abandon(self, request_id: int) -> None:
        """The requester stopped waiting; its slot stays taken until the response comes."""
        outstanding = self._outstanding.get(request_id)
        if outstanding is not None:
            outstanding.token = None

    # -- size caps ------------------------------------------------------------------

    def allow(self, request_type: type[Message], size: int) -> None:
        """Let this connection's peer send ``request_type`` messages of up to ``size``
        bytes (at most ``max_message_size``); a cap is only ever raised this way."""
        size = min(size, self.limits.max_message_size)
        if size > self._allowed.get(request_type, 0):
            self._allowed[request_type] = size

    def message_cap(self, type_: int, request_id: int) -> int:
        """The most bytes an incoming message with this envelope head may declare
        (see the module docstring); ``Connection.set_message_cap`` takes this."""
        cls = MESSAGE_TYPES.get(type_)
        if type_ % 2 == 0:
            if cls is None or not self._serves(cls):
                return min(UNSERVED_CAP, self.limits.max_message_size)
            cap = self._caps(cls)
            cap = type_cap(cls, self.limits) if cap is None else min(cap, self.limits.max_message_size)
            return max(cap, self._allowed.get(cls, 0))
        if cls is Error:
            return type_cap(Error, self.limits)
        outstanding = self._outstanding.get(request_id)
        if outstanding is None:
            return min(UNSERVED_CAP, self.limits.max_message_size)
        return outstanding.response_cap

    # -- receiving ------------------------------------------------------------------

    def decode(self, payload: bytes) -> Decoded:
        """Decode one received message strictly, within its type's item budget, touching
        no state (safe in another thread). A type this side does not know decodes to
        None (its body is not read).

        Raises:
            DecodeError, LimitExceeded: see ``receive``.
        """
        type_, request_id, body = decode_envelope(payload, limits=self.limits)
        cls = MESSAGE_TYPES.get(type_)
        return Decoded(type_, request_id, cls.from_cbor(body, limits=self.limits) if cls is not None else None)

    def receive(self, payload: bytes) -> ChannelEvent | None:
        """What one received application message means (see the module docstring).

        Raises:
            DecodeError, LimitExceeded: the message does not decode or validate, holds
                more items than its type allows, or the peer has more than
                ``max_concurrent_requests`` requests open on us; the connection must end
                (spec section 6, "Unknown and malformed messages").
            ConnectionAborted: the peer sent a connection-level ``ERROR`` (id 0): it is
                closing the connection, for the reason in the error.
        """
        return self.accept(self.decode(payload))

    def accept(self, decoded: Decoded) -> ChannelEvent | None:
        """What a decoded message means (``receive`` after ``decode``). Raises
        LimitExceeded for a request beyond ``max_concurrent_requests``."""
        type_, request_id = decoded.type_, decoded.request_id
        cls = MESSAGE_TYPES.get(type_)
        if request_id == CONNECTION_ERROR_ID:  # decode_envelope let only ERROR through
            notice = decoded.message
            assert isinstance(notice, Error)  # decode_envelope lets id 0 through on ERROR only
            name = notice.error_code.name if isinstance(notice.error_code, ErrorCode) else str(notice.code)
            raise ConnectionAborted(f"the peer is closing the connection: {name} ({notice.code}): "
                                    f"{_one_line(notice.message)}", code=notice.code)
        if type_ % 2 == 0:  # a request, known or not
            if self._incoming >= self.limits.max_concurrent_requests:
                raise LimitExceeded(f"more than {self.limits.max_concurrent_requests} concurrent requests")
            request = decoded.message
            self._incoming += 1
            if request is None or not self._serves(cls):
                what = f"unknown message type {type_}" if request is None else f"{cls.__name__} is not served by this peer"
                refusal = Error(code=int(ErrorCode.UNKNOWN_MESSAGE), message=what)
                return RequestRefused(request_id, encode_message(refusal, request_id))
            return RequestReceived(request_id, request)
        response = decoded.message
        outstanding = self._outstanding.pop(request_id, None)
        if outstanding is None:
            return None  # nothing outstanding has that id (e.g. we answered it by closing)
        asked = outstanding.request_type.__name__
        if response is None:
            error: SwarmError | None = UnexpectedMessage(f"answered {asked} with unknown message type {type_}",
                                                         code=ErrorCode.UNKNOWN_MESSAGE)
        elif type(response) is Error:
            error = RemoteError(response.message, code=response.code, retry_after=response.retry_after)
        elif type(response) is not RESPONSES.get(outstanding.request_type):
            error = UnexpectedMessage(f"answered {asked} with {type(response).__name__}")
        else:
            return ResponseReceived(request_id, outstanding.token, response=response)
        return ResponseReceived(request_id, outstanding.token, error=error)

    # -- answering ------------------------------------------------------------------

    def answer(self, event: RequestReceived, result: Message | BaseException) -> tuple[bytes, str | None]:
        """The payload answering ``event``: ``result`` if it is the request's response
        type or ``ERROR``; the ``ERROR`` for an exception (``error_for``). A response of
        the wrong type, or too large to send, is answered ``ERROR INTERNAL`` instead.

        Returns ``(payload, problem)``: ``problem`` says what was wrong with ``result``
        (for the log), None if nothing. Call ``answered`` once the payload is written.
        """
        problem = None
        if isinstance(result, BaseException):
            response = error_for(result)
        elif not isinstance(result, Message) or (type(result) is not Error
                                                 and type(result) is not RESPONSES.get(type(event.request))):
            problem = (f"the handler for {type(event.request).__name__} returned {type(result).__name__}, "
                       f"not {RESPONSES[type(event.request)].__name__}")
            response = error_for(Exception())
        else:
            response = result
        payload = encode_message(response, event.request_id)
        if len(payload) > self.limits.max_message_size:
            problem = f"the {type(response).__name__} of {len(payload)} bytes exceeds the message size limit"
            payload = encode_message(error_for(Exception()), event.request_id)
        return payload, problem

    def answered(self) -> None:
        """One request of the peer's was answered (or cannot be: the connection closed)."""
        if self._incoming <= 0:
            raise LocalProtocolError("answered() without a request to answer")
        self._incoming -= 1

    # -- closing --------------------------------------------------------------------

    def abort_payload(self, exc: BaseException) -> bytes | None:
        """The connection-level ``ERROR`` (id 0) telling the peer why this side closes
        the connection for ``exc``, or None when ``exc``'s code is not one to tell
        (its rule is not ``Report.NOTICE``: handshake failures, the stream ending, or
        the peer's own notice). Write it, if at all, just before closing."""
        if isinstance(exc, ConnectionAborted) or not isinstance(exc, SwarmError):
            return None
        if rule_of(int(exc.code)).report is not Report.NOTICE:
            return None
        return encode_message(Error(code=int(exc.code), message=_one_line(str(exc))), CONNECTION_ERROR_ID)

    def close(self) -> list[Any]:
        """End the channel; the tokens of our requests still awaited, to fail them."""
        self._closed = True
        tokens = [o.token for o in self._outstanding.values() if o.token is not None]
        self._outstanding.clear()
        return tokens
