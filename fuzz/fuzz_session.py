"""The inference session table: every (state, event) pair ends in a legal state or a
ProtocolError; a rule-based machine compares SessionState with a simple model, rollbacks
(a step below the length, spec 11.1) included: the history digest, recomputed from the
model's events, and the kept rows of the transcript, which must be the model's tokens."""

import hashlib

import torch

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import (
    EMPTY_HISTORY,
    SESSION_TRANSITIONS,
    ProtocolError,
    SessionEvent,
    SessionPhase,
    SessionState,
    SignedStep,
    decode_tensor,
    cbor_encode,
    encode_tensor,
    kept_rows,
)


def session(max_length: int, **kw) -> SessionState:
    return SessionState(client=b"c" * 20, server=b"s" * 20, session=b"x" * 16, model="m@0", span=(0, 2),
                        max_length=max_length, **kw)


@given(st.sampled_from(list(SessionPhase)), st.sampled_from(list(SessionEvent)),
       st.integers(0, 3), st.integers(0, 20), st.integers(0, 20))
def test_every_state_event_pair(phase, event, step, position, n):
    s = session(16, phase=phase)
    before = (s.phase, s.next_step, s.length)
    try:
        if event is SessionEvent.FORWARD:
            s.forward(step=step, position=position, n_tokens=n)
        else:
            {SessionEvent.OPEN: s.open, SessionEvent.CLOSE: s.close, SessionEvent.EVICT: s.evict}[event]()
    except ProtocolError:
        assert (s.phase, s.next_step, s.length) == before
        return
    assert s.phase is SESSION_TRANSITIONS[(phase, event)]


class SessionMachine(RuleBasedStateMachine):
    MAX = 12

    def __init__(self):
        super().__init__()
        self.s = session(self.MAX)
        self.model_open = False
        self.model_closed = False
        self.model_len = 0
        self.model_steps = 0
        self.model_history = EMPTY_HISTORY
        self.model_tokens: list[int] = []

    @rule()
    def open(self):
        ok = not self.model_open and not self.model_closed
        try:
            self.s.open()
            assert ok
            self.model_open = True
        except ProtocolError:
            assert not ok

    @rule(n=st.integers(0, 6), step_delta=st.integers(-1, 1), back=st.integers(-1, 5))
    def forward(self, n, step_delta, back):
        step, pos = self.model_steps + step_delta, max(self.model_len - back, 0)
        ok = self.model_open and step_delta == 0 and pos <= self.model_len and n >= 1 and pos + n <= self.MAX
        # each row's first value names the step and row it came from (the model's tokens)
        rows = torch.tensor([[[float(step * 100 + r), 0.0]] for r in range(max(n, 1))]).transpose(0, 1)
        x = encode_tensor(rows[:, :n] if n else rows[:, :0], "f32")
        try:
            self.s.record(SignedStep(step=step, position=pos, input=x, request_signature=b"r" * 64))
            assert ok
        except ProtocolError:
            assert not ok
            return
        history = self.model_history
        if pos < self.model_len:
            history = hashlib.blake2b(history + cbor_encode(["swarm/1/rollback", pos]), digest_size=32).digest()
        self.model_history = hashlib.blake2b(history + x.digest(), digest_size=32).digest()
        self.model_tokens = self.model_tokens[:pos] + [step * 100 + r for r in range(n)]
        self.model_len = pos + n
        self.model_steps += 1

    @precondition(lambda self: self.model_open)
    @rule(evict=st.booleans())
    def close(self, evict):
        (self.s.evict if evict else self.s.close)()
        self.model_open, self.model_closed = False, True

    @invariant()
    def agrees_with_model(self):
        assert self.s.length == self.model_len
        assert self.s.next_step == self.model_steps
        expected = SessionPhase.OPEN if self.model_open else SessionPhase.CLOSED if self.model_closed else SessionPhase.NEW
        assert self.s.phase is expected
        assert self.s.length <= self.MAX
        assert self.s.history == self.model_history
        kept = [int(decode_tensor(step.input)[0, r, 0])
                for step, k in kept_rows(self.s.transcript, self.s.length) for r in range(k)]
        assert kept == self.model_tokens


TestSessionMachine = SessionMachine.TestCase
