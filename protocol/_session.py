"""Inference session state, sans-IO (spec/SPEC.md, "Inference sessions").

A server keeps one ``SessionState`` per open session. ``SESSION_TRANSITIONS`` is the
whole state machine: a (state, event) pair missing from it is rejected with
``UnexpectedMessage`` (code BAD_STATE), and the session state does not change.
Beyond the table, FORWARD carries arguments that must line up with the session:
steps are numbered 0, 1, 2, ... without gaps, each step's ``position`` equals the
number of tokens already processed, and no step may take the session past
``max_length``. The client keeps the same object to know what to send next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import ErrorCode, LocalProtocolError, UnexpectedMessage

__all__ = ["SessionPhase", "SessionEvent", "SESSION_TRANSITIONS", "SessionState"]


class SessionPhase(Enum):
    NEW = "NEW"  # before OPEN_SESSION was accepted
    OPEN = "OPEN"
    CLOSED = "CLOSED"  # closed by the client, evicted when idle, or ended with its connection


class SessionEvent(Enum):
    OPEN = "OPEN"  # OPEN_SESSION accepted
    FORWARD = "FORWARD"
    CLOSE = "CLOSE"  # CLOSE_SESSION
    EVICT = "EVICT"  # idle timeout, memory pressure or the connection ended


SESSION_TRANSITIONS: dict[tuple[SessionPhase, SessionEvent], SessionPhase] = {
    (SessionPhase.NEW, SessionEvent.OPEN): SessionPhase.OPEN,
    (SessionPhase.OPEN, SessionEvent.FORWARD): SessionPhase.OPEN,
    (SessionPhase.OPEN, SessionEvent.CLOSE): SessionPhase.CLOSED,
    (SessionPhase.OPEN, SessionEvent.EVICT): SessionPhase.CLOSED,
}


@dataclass(slots=True)
class SessionState:
    """Bookkeeping for one session; raises instead of moving to an illegal state."""

    max_length: int
    phase: SessionPhase = SessionPhase.NEW
    next_step: int = 0
    length: int = 0  # tokens processed so far (the next position)
    history: list[tuple[int, int]] = field(default_factory=list)  # (position, n_tokens) per step

    def __post_init__(self) -> None:
        if type(self.max_length) is not int or self.max_length <= 0:
            raise LocalProtocolError(f"max_length must be a positive integer, got {self.max_length!r}")

    def _advance(self, event: SessionEvent) -> None:
        nxt = SESSION_TRANSITIONS.get((self.phase, event))
        if nxt is None:
            code = ErrorCode.UNKNOWN_SESSION if self.phase is SessionPhase.CLOSED else ErrorCode.BAD_STATE
            raise UnexpectedMessage(f"{event.value} is not allowed in session state {self.phase.value}", code=code)
        self.phase = nxt

    def open(self) -> None:
        self._advance(SessionEvent.OPEN)

    def check_forward(self, *, step: int, position: int, n_tokens: int) -> None:
        """Raise unless a FORWARD with these arguments is legal now; changes nothing."""
        if (self.phase, SessionEvent.FORWARD) not in SESSION_TRANSITIONS:
            self._advance(SessionEvent.FORWARD)  # raises with the table's message
        if step != self.next_step:
            raise UnexpectedMessage(f"expected step {self.next_step}, got {step}")
        if position != self.length:
            raise UnexpectedMessage(f"expected position {self.length}, got {position}")
        if n_tokens < 1:
            raise UnexpectedMessage("a step carries at least one token")
        if position + n_tokens > self.max_length:
            raise UnexpectedMessage(
                f"step would reach {position + n_tokens} tokens, over the session's max_length {self.max_length}",
                code=ErrorCode.MAX_LENGTH_EXCEEDED,
            )

    def forward(self, *, step: int, position: int, n_tokens: int) -> None:
        """Record a FORWARD step (call after the compute succeeded)."""
        self.check_forward(step=step, position=position, n_tokens=n_tokens)
        self._advance(SessionEvent.FORWARD)
        self.next_step += 1
        self.length += n_tokens
        self.history.append((position, n_tokens))

    def close(self) -> None:
        self._advance(SessionEvent.CLOSE)

    def evict(self) -> None:
        self._advance(SessionEvent.EVICT)
