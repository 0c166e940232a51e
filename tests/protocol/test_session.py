import pytest

from protocol import ErrorCode, LocalProtocolError, UnexpectedMessage
from protocol._session import SESSION_TRANSITIONS, SessionEvent, SessionPhase, SessionState


def test_a_session_steps_through_positions():
    s = SessionState(max_length=10)
    s.open()
    s.forward(step=0, position=0, n_tokens=4)
    s.forward(step=1, position=4, n_tokens=1)
    assert (s.next_step, s.length, s.history) == (2, 5, [(0, 4), (4, 1)])
    s.close()
    assert s.phase is SessionPhase.CLOSED


@pytest.mark.parametrize(
    "step,position,n,code",
    [(1, 0, 1, ErrorCode.BAD_STATE), (0, 3, 1, ErrorCode.BAD_STATE), (0, 0, 0, ErrorCode.BAD_STATE),
     (0, 0, 11, ErrorCode.MAX_LENGTH_EXCEEDED)],
)
def test_bad_forward_is_rejected_without_changing_state(step, position, n, code):
    s = SessionState(max_length=10)
    s.open()
    with pytest.raises(UnexpectedMessage) as info:
        s.forward(step=step, position=position, n_tokens=n)
    assert info.value.code == code
    assert (s.phase, s.next_step, s.length) == (SessionPhase.OPEN, 0, 0)


def test_closed_sessions_are_unknown():
    s = SessionState(max_length=10)
    s.open()
    s.evict()
    with pytest.raises(UnexpectedMessage) as info:
        s.forward(step=0, position=0, n_tokens=1)
    assert info.value.code == ErrorCode.UNKNOWN_SESSION


def test_every_pair_outside_the_table_is_rejected():
    for phase in SessionPhase:
        for event in SessionEvent:
            s = SessionState(max_length=4, phase=phase)
            action = {SessionEvent.OPEN: s.open, SessionEvent.CLOSE: s.close, SessionEvent.EVICT: s.evict,
                      SessionEvent.FORWARD: lambda: s.forward(step=0, position=0, n_tokens=1)}[event]
            if (phase, event) in SESSION_TRANSITIONS:
                action()
                assert s.phase is SESSION_TRANSITIONS[(phase, event)]
            else:
                with pytest.raises(UnexpectedMessage):
                    action()
                assert s.phase is phase


def test_max_length_must_be_positive():
    with pytest.raises(LocalProtocolError):
        SessionState(max_length=0)
