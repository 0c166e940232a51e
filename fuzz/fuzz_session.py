"""The inference session table: every (state, event) pair ends in a legal state or a
ProtocolError; a rule-based machine compares SessionState with a simple model."""

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import SESSION_TRANSITIONS, ProtocolError, SessionEvent, SessionPhase, SessionState


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

    @rule()
    def open(self):
        ok = not self.model_open and not self.model_closed
        try:
            self.s.open()
            assert ok
            self.model_open = True
        except ProtocolError:
            assert not ok

    @rule(n=st.integers(0, 6), step_delta=st.integers(-1, 1), pos_delta=st.integers(-1, 1))
    def forward(self, n, step_delta, pos_delta):
        step, pos = self.model_steps + step_delta, self.model_len + pos_delta
        ok = (self.model_open and step_delta == 0 and pos_delta == 0 and n >= 1 and pos + n <= self.MAX)
        try:
            self.s.forward(step=step, position=pos, n_tokens=n)
            assert ok
            self.model_len += n
            self.model_steps += 1
        except ProtocolError:
            assert not ok

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


TestSessionMachine = SessionMachine.TestCase
