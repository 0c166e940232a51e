"""The messages and structures of server-to-server push (spec/SPEC.md section 11.4,
registry in section 7.3).

They are declared like every other message (``protocol._messages``) and added to its
registry (``MESSAGE_TYPES``, ``RESPONSES``) when this module is imported, which
``protocol/__init__`` does: the registry stays the one dispatch from type numbers to
classes, and the push family stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ._fields import Field, Float, ListOf, Span, Struct, Text, UInt
from ._messages import (
    ADDRESS,
    DIGEST,
    MESSAGE_TYPES,
    PEER_ID,
    RESPONSES,
    SESSION_ID,
    SIGNATURE,
    TENSOR,
    _STRUCT,
    Message,
    Structure,
    _message,
)
from .errors import LocalProtocolError

__all__ = ["MAX_PUSH_HOPS", "PushHop", "HopOutput", "PushFailure", "Push", "Pushed", "PushResult", "PushResultAck"]

#: Hops of one PUSH route at most.
MAX_PUSH_HOPS = 32


@dataclass(**_STRUCT)
class PushHop(Structure):
    """One hop of a PUSH route: the server, its session (opened by the client), the
    step that session is at, the blocks and where to reach the server."""

    peer_id: bytes
    session: bytes
    step: int
    span: tuple[int, int]
    addrs: tuple[str, ...]
    FIELDS: ClassVar = (
        Field(0, "peer_id", PEER_ID),
        Field(1, "session", SESSION_ID),
        Field(2, "step", UInt()),
        Field(3, "span", Span()),
        Field(4, "addrs", ListOf(ADDRESS, max=8)),
    )

    def statement_entry(self) -> list:
        """The hop as the push request statement lists it."""
        return [self.peer_id, self.session, self.step, [self.span[0], self.span[1]], list(self.addrs)]


@dataclass(**_STRUCT)
class HopOutput(Structure):
    """A hop's signed output in a PUSH step: the tensor, the history digest its forward
    result statement covers, and the signature over that statement."""

    hidden: Any  # WireTensor
    history: bytes
    signature: bytes
    FIELDS: ClassVar = (
        Field(0, "hidden", TENSOR),
        Field(1, "history", DIGEST),
        Field(2, "signature", SIGNATURE),
    )


@dataclass(**_STRUCT)
class PushFailure(Structure):
    """A hop's signed report that a PUSH step stopped: who reports, whom it blames,
    the error code and message (signed over push_failure_statement)."""

    reporter: bytes
    failed: bytes
    code: int
    message: str
    signature: bytes
    FIELDS: ClassVar = (
        Field(0, "reporter", PEER_ID),
        Field(1, "failed", PEER_ID),
        Field(2, "code", UInt(max=65535)),
        Field(3, "message", Text(max=1024)),
        Field(4, "signature", SIGNATURE),
    )



@_message(32, "request")
@dataclass(**_STRUCT)
class Push(Message):
    """One step pushed along a chain (spec section 11.4): the client sends it to the
    first hop, each hop to the next with its own output appended to ``outputs``. The
    receiver is ``route[len(outputs)]``; its input is the last output (the first hop's:
    ``hidden``)."""

    route: tuple[PushHop, ...]
    position: int
    hidden: Any  # WireTensor: the first hop's input
    timeout: float  # seconds each hop may take (a hop waits for the rest of the chain)
    authorization: bytes  # the client's, over push_request_statement
    outputs: tuple[HopOutput, ...] = ()
    FIELDS: ClassVar = (
        Field(0, "route", ListOf(Struct(PushHop), max=MAX_PUSH_HOPS)),
        Field(1, "position", UInt()),
        Field(2, "hidden", TENSOR),
        Field(3, "timeout", Float()),
        Field(4, "authorization", SIGNATURE),
        Field(5, "outputs", ListOf(Struct(HopOutput), max=MAX_PUSH_HOPS)),
    )

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not self.route:
            raise LocalProtocolError("a PUSH route has at least one hop")
        if len(self.outputs) >= len(self.route):
            raise LocalProtocolError("a PUSH carries fewer outputs than its route has hops")

    @property
    def index(self) -> int:
        """The receiving hop's place in the route."""
        return len(self.outputs)


@_message(33, "response")
@dataclass(**_STRUCT)
class Pushed(Message):
    """The receiver of a PUSH did its part (computed, and handed on or delivered)."""

    FIELDS: ClassVar = ()


@_message(34, "request")
@dataclass(**_STRUCT)
class PushResult(Message):
    """To the client, from the last hop (every output) or from the hop that saw a
    failure (the outputs so far and the signed ``failure``). The push is named by the
    first hop's session and step."""

    session: bytes
    step: int
    outputs: tuple[HopOutput, ...]
    failure: PushFailure | None = None
    FIELDS: ClassVar = (
        Field(0, "session", SESSION_ID),
        Field(1, "step", UInt()),
        Field(2, "outputs", ListOf(Struct(HopOutput), max=MAX_PUSH_HOPS)),
        Field(3, "failure", Struct(PushFailure), optional=True),
    )


@_message(35, "response")
@dataclass(**_STRUCT)
class PushResultAck(Message):
    FIELDS: ClassVar = ()


MESSAGE_TYPES.update({cls.TYPE: cls for cls in (Push, Pushed, PushResult, PushResultAck)})
RESPONSES.update({Push: Pushed, PushResult: PushResultAck})
