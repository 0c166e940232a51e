"""PUSH checks (spec 11.4) against hostile changes: a valid two-hop push step, changed
in any field a sender controls, is refused by the receiving hop with the protocol's own
error and leaves its session untouched; unchanged, it passes. The client's check of a
PUSH_RESULT stops at the first output it cannot verify."""

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as M
from protocol import SessionState, SwarmError

from strategies import IDENTITIES

CLIENT, FIRST, SECOND, OTHER = IDENTITIES
MODEL = "m@0"
SPANS = ((0, 2), (2, 4))
H = 4


def _states():
    states = [SessionState(client=CLIENT.peer_id, server=server.peer_id, session=bytes([i + 1]) * 16, model=MODEL,
                           span=span, max_length=16) for i, (server, span) in enumerate(zip((FIRST, SECOND), SPANS))]
    for state in states:
        state.open()
    return states


def _tensor(seed: float):
    return M.encode_tensor(torch.full((1, 1, H), seed), "f32")


def _valid():
    """(client states, server states, PUSH to the first hop, PUSH handed on to the second)."""
    client_states, server_states = _states(), _states()
    push = M.sign_push(CLIENT, client_states, [("127.0.0.1:1",), ("127.0.0.1:2",)], _tensor(0.5), timeout=1.0)
    first = M.sign_push_output(FIRST, server_states[0], push, _tensor(1.5))
    return client_states, server_states, push, M.push_onward(push, first)


def _check(state, push, sender):
    return M.check_push(state, push, client_public_key=CLIENT.public_key, sender=sender.peer_id,
                        sender_public_key=sender.public_key, hidden_size=H)


MUTATIONS = ["position", "timeout", "hidden", "output", "history", "signature", "authorization", "route_step",
             "route_span", "route_addrs", "route_swap", "sender", "upstream_peer"]


def _mutate(push, what, data):
    route = list(push.route)
    if what == "position":
        return dataclasses.replace(push, position=push.position + data.draw(st.integers(1, 5))), FIRST
    if what == "timeout":
        return dataclasses.replace(push, timeout=push.timeout + 1.0), FIRST
    if what == "hidden":
        return dataclasses.replace(push, hidden=_tensor(data.draw(st.floats(-4, 4).filter(lambda x: x != 0.5)))), FIRST
    out = push.outputs[0]
    if what == "output":
        changed = dataclasses.replace(out, hidden=_tensor(data.draw(st.floats(-4, 4).filter(lambda x: x != 1.5))))
        return dataclasses.replace(push, outputs=(changed,)), FIRST
    if what == "history":
        return dataclasses.replace(push, outputs=(dataclasses.replace(out, history=bytes(32)),)), FIRST
    if what == "signature":
        i = data.draw(st.integers(0, 63))
        sig = bytearray(out.signature)
        sig[i] ^= 1 << data.draw(st.integers(0, 7))
        return dataclasses.replace(push, outputs=(dataclasses.replace(out, signature=bytes(sig)),)), FIRST
    if what == "authorization":
        return dataclasses.replace(push, authorization=bytes(64)), FIRST
    if what == "route_step":
        route[1] = dataclasses.replace(route[1], step=route[1].step + 1)
    elif what == "route_span":
        route[0] = dataclasses.replace(route[0], span=(0, 3))
    elif what == "route_addrs":
        route[1] = dataclasses.replace(route[1], addrs=("127.0.0.1:9",))
    elif what == "route_swap":
        route[0], route[1] = route[1], route[0]
    elif what == "sender":
        return push, OTHER
    elif what == "upstream_peer":
        route[0] = dataclasses.replace(route[0], peer_id=OTHER.peer_id)
        return dataclasses.replace(push, route=tuple(route)), OTHER
    return dataclasses.replace(push, route=tuple(route)), FIRST


def test_the_valid_push_passes_and_the_client_verifies_every_hop():
    client_states, server_states, push, onward = _valid()
    assert _check(server_states[1], onward, FIRST) == 1
    result = M.push_onward(onward, M.sign_push_output(SECOND, server_states[1], onward, _tensor(2.5)))
    outcome = M.accept_push_result(CLIENT, client_states, push, result,
                                   public_keys=[FIRST.public_key, SECOND.public_key])
    assert outcome.complete
    assert len(outcome.steps) == 2
    assert [s.history for s in client_states] == [s.history for s in server_states]


@settings(max_examples=60)
@given(st.sampled_from(MUTATIONS), st.data())
def test_a_changed_push_is_refused_and_changes_nothing(what, data):
    _, server_states, _, onward = _valid()
    state = server_states[1]
    before = (state.phase, state.next_step, state.length, state.history)
    changed, sender = _mutate(onward, what, data)
    try:
        _check(state, changed, sender)
    except SwarmError:
        assert (state.phase, state.next_step, state.length, state.history) == before
        return
    raise AssertionError(f"a PUSH changed in {what} passed the checks")


@settings(max_examples=40)
@given(st.integers(0, 1), st.sampled_from(["hidden", "history", "signature", "missing"]))
def test_the_client_stops_at_the_first_output_it_cannot_verify(bad, what):
    client_states, server_states, push, onward = _valid()
    result = M.push_onward(onward, M.sign_push_output(SECOND, server_states[1], onward, _tensor(2.5)))
    outputs = list(result.outputs)
    if what == "missing":
        outputs = outputs[:bad]
    else:
        change = {"hidden": {"hidden": _tensor(9.0)}, "history": {"history": bytes(32)},
                  "signature": {"signature": bytes(64)}}[what]
        outputs[bad] = dataclasses.replace(outputs[bad], **change)
    outcome = M.accept_push_result(CLIENT, client_states, push, dataclasses.replace(result, outputs=tuple(outputs)),
                                   public_keys=[FIRST.public_key, SECOND.public_key])
    assert len(outcome.steps) == bad
    assert not outcome.complete
    assert [s.next_step for s in client_states] == [1] * bad + [0] * (2 - bad)


def test_pushed_steps_make_fraud_proof_evidence_that_verifies():
    """A pushed step's transcript entry, once the client signed its request, passes a
    fraud proof verifier's checks 2 and 3 (spec 13.4) against the hop's own signature."""
    client_states, server_states, push, onward = _valid()
    result = M.push_onward(onward, M.sign_push_output(SECOND, server_states[1], onward, _tensor(2.5)))
    M.accept_push_result(CLIENT, client_states, push, result, public_keys=[FIRST.public_key, SECOND.public_key])
    for state, server in zip(client_states, (FIRST, SECOND)):
        M.sign_pushed_requests(CLIENT, state)
        step = state.transcript[-1]
        fresh = SessionState(client=state.client, server=state.server, session=state.session, model=MODEL,
                             span=state.span, max_length=16)
        fresh.open()
        M.replay_requests(fresh, [s.evidence() for s in state.transcript], client_public_key=CLIENT.public_key)
        M.check_result_signature(fresh, step=step.step, input_digest=step.input.digest(), output=step.output,
                                 signature=step.result_signature, history=fresh.history,
                                 server_public_key=server.public_key)
