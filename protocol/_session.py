"""Inference session state, sans-IO (spec/SPEC.md, "Inference sessions" and "Signed
statements").

A session's server and its client each keep one ``SessionState``: who the two parties
are, what the session runs (model, span, wire dtype, ``max_length``), where it stands
(phase, next step, tokens so far), the running history digest that every result is
signed over, and the signed transcript. Both sides check and advance it the same way
(``protocol._exchange`` drives it for both), so there is one account of a session,
not one per layer.

``SESSION_TRANSITIONS`` is the whole state machine: a (state, event) pair missing from
it is rejected with ``UnexpectedMessage`` (code BAD_STATE), and the session state does
not change. Beyond the table, FORWARD carries arguments that must line up with the
session: steps are numbered 0, 1, 2, ... without gaps, each step's ``position`` is at
most the number of tokens already processed, and no step may take the session past
``max_length``. A step pushed to a hop (spec 11.4) is a FORWARD of its session.

Rollback (spec 11.1, speculative decoding): a step at a ``position`` below the
session's length first cuts the session there (the tokens from ``position`` on are
dropped), then runs its own tokens. It is a step like any other (numbered, signed by
the client, its result signed by the server); the history digest records the cut
(``rollback_history``) before the step's input, so a signed result names every
rollback before it. ``kept_rows`` says which rows of a transcript's inputs the
session still holds: what a replacement is replayed and an audit recomputes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ._messages import ForwardEvidence
from ._statements import EMPTY_HISTORY, extend_history, rollback_history
from .errors import ErrorCode, LocalProtocolError, UnexpectedMessage

__all__ = ["SessionPhase", "SessionEvent", "SESSION_TRANSITIONS", "SessionState", "SignedStep", "kept_rows"]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedStep:
    """One step of a session's signed transcript: the client-signed input and, where
    the keeper holds it (a client does, a server does not), the server-signed output.
    A client's pushed step (spec 11.4) has no request signature until
    ``sign_pushed_requests`` makes one; a server's pushed step keeps the client's push
    authorization in its place."""

    step: int
    position: int
    input: Any  # WireTensor
    request_signature: bytes | None  # the client's, over forward_request_statement (None: not yet, 11.4)
    output: Any = None  # WireTensor
    result_signature: bytes | None = None  # the server's, over forward_result_statement

    @property
    def n_tokens(self) -> int:
        return int(self.input.shape[1])

    def evidence(self) -> ForwardEvidence:
        """The client-signed request, as a fraud proof carries it."""
        if self.request_signature is None:
            raise LocalProtocolError("a pushed step's request is not signed yet (sign_pushed_requests)")
        return ForwardEvidence(step=self.step, position=self.position, hidden=self.input,
                               signature=self.request_signature)


@dataclass(slots=True, kw_only=True)
class SessionState:
    """One session as both of its parties keep it; raises instead of moving to an
    illegal state. A FORWARD_ONCE is a session of one step whose id is its nonce.

    Args:
        client, server: peer ids of the party that signs the requests and of the one
            that signs the results.
        session: the session id (a FORWARD_ONCE's nonce).
        model, span, max_length, wire_dtype, blocksize: what OPEN_SESSION asked for;
            ``blocksize`` (4096 unless asked) is that of every q8/nf4 tensor of the
            session, both ways, and unused for lossless dtypes.
    """

    client: bytes
    server: bytes
    session: bytes
    model: str
    span: tuple[int, int]
    max_length: int
    wire_dtype: str = "f32"
    blocksize: int = 4096
    phase: SessionPhase = SessionPhase.NEW
    next_step: int = 0
    length: int = 0  # tokens processed so far (the next position)
    history: bytes = EMPTY_HISTORY  # the running digest of every input so far (signed with every result)
    transcript: list[SignedStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        if type(self.max_length) is not int or self.max_length <= 0:
            raise LocalProtocolError(f"max_length must be a positive integer, got {self.max_length!r}")

    @property
    def blocks(self) -> int:
        """Blocks the session runs: work units per token (spec section 12)."""
        return self.span[1] - self.span[0]

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
        if position > self.length:
            raise UnexpectedMessage(f"position {position} is past the session's length {self.length}; "
                                    f"send a position of at most {self.length}")
        if n_tokens < 1:
            raise UnexpectedMessage("a step carries at least one token")
        if position + n_tokens > self.max_length:
            raise UnexpectedMessage(
                f"step would reach {position + n_tokens} tokens, over the session's max_length {self.max_length}",
                code=ErrorCode.MAX_LENGTH_EXCEEDED,
            )

    def forward(self, *, step: int, position: int, n_tokens: int) -> None:
        """Move past a FORWARD step (the state table and the counters only); a step at a
        position below the length rolls the session back to it first."""
        self.check_forward(step=step, position=position, n_tokens=n_tokens)
        self._advance(SessionEvent.FORWARD)
        self.next_step += 1
        self.length = position + n_tokens

    def next_history(self, *, position: int, input_digest: bytes) -> bytes:
        """The history digest a step at ``position`` with input ``input_digest`` is signed
        over (spec section 9): the running digest, cut first if the step rolls back."""
        history = self.history if position >= self.length else rollback_history(self.history, position)
        return extend_history(history, input_digest)

    def record(self, step: SignedStep) -> bytes:
        """Move past ``step``: the counters, the history digest (which now covers its
        input, and the rollback if it is one: the digest its result is signed over,
        returned) and the transcript."""
        history = self.next_history(position=step.position, input_digest=step.input.digest())
        self.forward(step=step.step, position=step.position, n_tokens=step.n_tokens)
        self.history = history
        self.transcript.append(step)
        return self.history

    def kept(self) -> list[tuple[SignedStep, int]]:
        """``kept_rows`` of this session's transcript at its length."""
        return kept_rows(self.transcript, self.length)

    def close(self) -> None:
        self._advance(SessionEvent.CLOSE)

    def evict(self) -> None:
        self._advance(SessionEvent.EVICT)


def kept_rows(steps: Sequence[SignedStep], length: int | None = None) -> list[tuple[SignedStep, int]]:
    """Which input rows of ``steps`` (a transcript from step 0, in order) a session holds
    at ``length`` tokens (default: where the last step left it): each step with the
    number of its first rows kept, those whose positions no later step rolled back and
    that are below ``length``. Their concatenation, in order, is the session's input
    prefix, positions 0 .. length-1 (what a replacement is replayed, what an audit
    recomputes)."""
    if length is None:
        length = steps[-1].position + steps[-1].n_tokens if steps else 0
    out: list[tuple[SignedStep, int]] = []
    bound = length
    for step in reversed(steps):
        out.append((step, max(0, min(step.n_tokens, bound - step.position))))
        bound = min(bound, step.position)
    out.reverse()
    return out
