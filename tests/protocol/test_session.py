import pytest

from protocol import (
    EMPTY_HISTORY,
    SESSION_TRANSITIONS,
    ErrorCode,
    LocalProtocolError,
    SessionEvent,
    SessionPhase,
    SessionState,
    SignedStep,
    UnexpectedMessage,
    WireTensor,
    extend_history,
)


def session(max_length: int, **kw) -> SessionState:
    return SessionState(client=b"c" * 20, server=b"s" * 20, session=b"x" * 16, model="m@0", span=(0, 2),
                        max_length=max_length, **kw)


def _step(step: int, position: int, n: int) -> SignedStep:
    hidden = WireTensor(dtype="f32", shape=(1, n, 1), data=bytes([step]) * 4 * n)
    return SignedStep(step=step, position=position, input=hidden, request_signature=bytes(64))


def test_a_session_steps_through_positions():
    s = session(10)
    s.open()
    s.forward(step=0, position=0, n_tokens=4)
    s.forward(step=1, position=4, n_tokens=1)
    assert (s.next_step, s.length) == (2, 5)
    s.close()
    assert s.phase is SessionPhase.CLOSED


def test_recorded_steps_extend_the_history_digest_and_the_transcript():
    s = session(10)
    s.open()
    first, second = _step(0, 0, 3), _step(1, 3, 1)
    assert s.record(first) == extend_history(EMPTY_HISTORY, first.input.digest())
    assert s.record(second) == extend_history(extend_history(EMPTY_HISTORY, first.input.digest()),
                                              second.input.digest()) == s.history
    assert s.transcript == [first, second]
    assert (s.next_step, s.length) == (2, 4)
    with pytest.raises(UnexpectedMessage):
        s.record(_step(1, 4, 1))  # step 1 again
    assert s.transcript == [first, second]
    assert s.length == 4  # unchanged


@pytest.mark.parametrize(
    ("step", "position", "n", "code"),
    [(1, 0, 1, ErrorCode.BAD_STATE), (0, 3, 1, ErrorCode.BAD_STATE), (0, 0, 0, ErrorCode.BAD_STATE),
     (0, 0, 11, ErrorCode.MAX_LENGTH_EXCEEDED)],
)
def test_bad_forward_is_rejected_without_changing_state(step, position, n, code):
    s = session(10)
    s.open()
    with pytest.raises(UnexpectedMessage) as info:
        s.forward(step=step, position=position, n_tokens=n)
    assert info.value.code == code
    assert (s.phase, s.next_step, s.length) == (SessionPhase.OPEN, 0, 0)


def test_closed_sessions_are_unknown():
    s = session(10)
    s.open()
    s.evict()
    with pytest.raises(UnexpectedMessage) as info:
        s.forward(step=0, position=0, n_tokens=1)
    assert info.value.code == ErrorCode.UNKNOWN_SESSION


def test_every_pair_outside_the_table_is_rejected():
    for phase in SessionPhase:
        for event in SessionEvent:
            s = session(4, phase=phase)
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
        session(0)
