"""The forward exchange, both sides, sans-IO (spec/SPEC.md sections 9 and 11)."""

import dataclasses

import pytest

from protocol import (
    BadSignature,
    ErrorCode,
    Identity,
    InvalidRequest,
    LocalProtocolError,
    SessionState,
    UnexpectedMessage,
    WireTensor,
    accept_forward_once_result,
    accept_result,
    check_forward,
    check_forward_once,
    extend_history,
    replay_requests,
    rollback_history,
    sign_forward,
    sign_forward_once,
    sign_forward_once_result,
    sign_result,
)

CLIENT, SERVER = Identity.from_seed(bytes(range(32))), Identity.from_seed(bytes(range(32, 64)))
H = 4


def tensor(n: int, fill: int = 1, dtype: str = "f32") -> WireTensor:
    size = {"f32": 4, "f16": 2}[dtype]
    return WireTensor(dtype=dtype, shape=(1, n, H), data=bytes([fill]) * size * n * H)


def states(max_length: int = 8) -> tuple[SessionState, SessionState]:
    """(client's, server's) state of one open session."""
    pair = []
    for _ in range(2):
        state = SessionState(client=CLIENT.peer_id, server=SERVER.peer_id, session=b"s" * 16, model="m@0",
                             span=(2, 5), max_length=max_length)
        state.open()
        pair.append(state)
    return pair[0], pair[1]


def serve(server: SessionState, request, output: WireTensor | None = None):
    check_forward(server, request, client_public_key=CLIENT.public_key, hidden_size=H)
    return sign_result(SERVER, server, request, output or tensor(request.hidden.shape[1], fill=7))


def test_both_sides_keep_the_same_session():
    client, server = states()
    for n in (3, 1, 1):
        request = sign_forward(CLIENT, client, tensor(n, fill=n))
        step = accept_result(client, request, serve(server, request), server_public_key=SERVER.public_key)
        assert step.output is not None
        assert step.result_signature is not None
    assert (client.next_step, client.length, client.history) == (server.next_step, server.length, server.history)
    assert [s.input for s in client.transcript] == [s.input for s in server.transcript]
    assert [s.evidence() for s in client.transcript] == [s.evidence() for s in server.transcript]
    assert all(s.output is None for s in server.transcript)  # a server keeps the signed inputs only


@pytest.mark.parametrize("bad", ["dtype", "shape", "step", "over max_length", "signer", "tampered"])
def test_the_server_refuses_before_computing_and_keeps_its_state(bad):
    client, server = states(max_length=4)
    request = sign_forward(CLIENT, client, tensor(2))
    if bad == "dtype":
        request = dataclasses.replace(request, hidden=tensor(2, dtype="f16"))
    elif bad == "shape":
        request = dataclasses.replace(request, hidden=WireTensor(dtype="f32", shape=(2, H), data=bytes(8 * H)))
    elif bad == "step":
        request = dataclasses.replace(request, step=1)
    elif bad == "over max_length":
        request = sign_forward(CLIENT, client, tensor(5))
    elif bad == "signer":
        request = dataclasses.replace(request, signature=SERVER.sign(b"anything"))
    else:
        request = dataclasses.replace(request, hidden=tensor(2, fill=9))
    expected = {"dtype": InvalidRequest, "shape": InvalidRequest, "signer": BadSignature, "tampered": BadSignature}
    with pytest.raises(expected.get(bad, UnexpectedMessage)) as info:
        check_forward(server, request, client_public_key=CLIENT.public_key, hidden_size=H)
    if bad == "over max_length":
        assert info.value.code == ErrorCode.MAX_LENGTH_EXCEEDED
    assert (server.next_step, server.length, server.transcript) == (0, 0, [])


@pytest.mark.parametrize("bad", ["step echo", "shape", "signer", "history"])
def test_the_client_refuses_a_result_that_does_not_answer_and_keeps_its_state(bad):
    client, server = states()
    first = sign_forward(CLIENT, client, tensor(1))
    accept_result(client, first, serve(server, first), server_public_key=SERVER.public_key)
    request = sign_forward(CLIENT, client, tensor(1, fill=2))
    result = serve(server, request)
    if bad == "step echo":
        result = dataclasses.replace(result, step=0)
    elif bad == "shape":
        result = dataclasses.replace(result, hidden=tensor(2))
    elif bad == "signer":
        result = dataclasses.replace(result, signature=CLIENT.sign(b"anything"))
    else:  # signed over another history: the server is not answering this session's inputs
        fresh_client, fresh_server = states()
        alone = sign_forward(CLIENT, fresh_client, tensor(1, fill=2))
        result = dataclasses.replace(result, signature=serve(fresh_server, alone).signature)
    with pytest.raises(BadSignature if bad in ("signer", "history") else UnexpectedMessage):
        accept_result(client, request, result, server_public_key=SERVER.public_key)
    assert (client.next_step, client.length, len(client.transcript)) == (1, 1, 1)


def test_only_the_client_of_an_open_session_signs():
    client, _ = states()
    with pytest.raises(LocalProtocolError):
        sign_forward(SERVER, client, tensor(1))
    client.close()
    with pytest.raises(LocalProtocolError):
        sign_forward(CLIENT, client, tensor(1))


def test_forward_once_is_a_session_of_one_step():
    request, client = sign_forward_once(CLIENT, server=SERVER.peer_id, nonce=b"n" * 16, model="m@0", span=(0, 2),
                                        hidden=tensor(3, dtype="f16"))
    server = check_forward_once(request, client=CLIENT.peer_id, client_public_key=CLIENT.public_key,
                                server=SERVER.peer_id, hidden_size=H)
    result = sign_forward_once_result(SERVER, server, request, tensor(3, fill=5, dtype="f16"))
    step = accept_forward_once_result(client, request, result, server_public_key=SERVER.public_key)
    assert (step.step, step.position) == (0, 0)
    assert client.history == server.history
    with pytest.raises(BadSignature):  # the nonce is the session id: another nonce, another statement
        check_forward_once(dataclasses.replace(request, nonce=b"m" * 16), client=CLIENT.peer_id,
                           client_public_key=CLIENT.public_key, server=SERVER.peer_id, hidden_size=H)


def test_replaying_requests_finds_the_first_bad_signature():
    client, server = states()
    for n in (2, 1, 1):
        request = sign_forward(CLIENT, client, tensor(n, fill=n))
        accept_result(client, request, serve(server, request), server_public_key=SERVER.public_key)
    evidence = [s.evidence() for s in client.transcript]
    _, replayed = states()
    replay_requests(replayed, evidence, client_public_key=CLIENT.public_key)
    assert replayed.history == client.history
    evidence[1] = dataclasses.replace(evidence[1], hidden=tensor(1, fill=9))
    _, replayed = states()
    with pytest.raises(BadSignature):
        replay_requests(replayed, evidence, client_public_key=CLIENT.public_key)
    assert replayed.next_step == 1  # step 1 is the one that failed


# -- the session's wire format: dtype and, for q8/nf4, block size (issue 13, item 3) --------


def _q8(n: int, blocksize: int, fill: float = 0.5) -> WireTensor:
    import torch

    from protocol import encode_tensor

    return encode_tensor(torch.full((1, n, H), fill), "q8", blocksize=blocksize)


def _q8_states(blocksize: int) -> tuple[SessionState, SessionState]:
    pair = []
    for _ in range(2):
        state = SessionState(client=CLIENT.peer_id, server=SERVER.peer_id, session=b"q" * 16, model="m@0",
                             span=(0, 2), max_length=8, wire_dtype="q8", blocksize=blocksize)
        state.open()
        pair.append(state)
    return pair[0], pair[1]


def test_open_session_names_the_block_size_of_quantized_sessions():
    from protocol import DEFAULT_BLOCKSIZE, OpenSession, check_open_session

    def ask(**kw):
        return check_open_session(OpenSession(model="m@0", span=(0, 2), max_length=8, **kw))

    assert ask(wire_dtype="q8") == DEFAULT_BLOCKSIZE == 4096
    assert ask(wire_dtype="nf4", blocksize=64) == 64
    for bad in ({"wire_dtype": "q8", "blocksize": 100}, {"wire_dtype": "f32", "blocksize": 64},
                {"wire_dtype": "f64"}):
        with pytest.raises(InvalidRequest):
            ask(**bad)


def test_inputs_and_results_must_have_the_sessions_block_size():
    client, server = _q8_states(64)
    wrong = sign_forward(CLIENT, client, _q8(1, 128))
    with pytest.raises(InvalidRequest, match="blocksize 64"):
        check_forward(server, wrong, client_public_key=CLIENT.public_key, hidden_size=H)
    request = sign_forward(CLIENT, client, _q8(1, 64))
    check_forward(server, request, client_public_key=CLIENT.public_key, hidden_size=H)
    # a server answering in another block size signs another digest: the client refuses it
    bad = sign_result(SERVER, server, request, _q8(1, 4096, fill=0.25))
    with pytest.raises(UnexpectedMessage, match="wire format"):
        accept_result(client, request, bad, server_public_key=SERVER.public_key)


def test_two_honest_servers_sign_the_same_digest_for_the_same_activation():
    # Both encode the output in the session's block size, so their bytes (and H(output)) agree.
    outputs = []
    for _ in range(2):
        client, server = _q8_states(64)
        request = sign_forward(CLIENT, client, _q8(1, 64))
        check_forward(server, request, client_public_key=CLIENT.public_key, hidden_size=H)
        outputs.append(_q8(1, server.blocksize, fill=0.75))
    assert outputs[0].digest() == outputs[1].digest()
    assert outputs[0].blocksize == 64


def test_forward_once_answers_in_its_inputs_dtype_and_block_size():
    request, client_state = sign_forward_once(CLIENT, server=SERVER.peer_id, nonce=b"n" * 16, model="m@0",
                                              span=(0, 2), hidden=_q8(2, 128))
    state = check_forward_once(request, client=CLIENT.peer_id, client_public_key=CLIENT.public_key,
                               server=SERVER.peer_id, hidden_size=H)
    assert (state.wire_dtype, state.blocksize) == ("q8", 128)
    good = sign_forward_once_result(SERVER, state, request, _q8(2, 128, fill=0.25))
    accept_forward_once_result(client_state, request, good, server_public_key=SERVER.public_key)
    _, again = sign_forward_once(CLIENT, server=SERVER.peer_id, nonce=b"n" * 16, model="m@0", span=(0, 2),
                                 hidden=_q8(2, 128))
    state = check_forward_once(request, client=CLIENT.peer_id, client_public_key=CLIENT.public_key,
                               server=SERVER.peer_id, hidden_size=H)
    other = sign_forward_once_result(SERVER, state, request, _q8(2, 4096, fill=0.25))
    with pytest.raises(UnexpectedMessage):
        accept_forward_once_result(again, request, other, server_public_key=SERVER.public_key)


def test_a_rollback_is_a_signed_step_whose_history_records_the_cut():
    client, server = states()
    for n, fill in ((3, 1), (4, 2)):  # a prompt, then 4 drafted tokens
        request = sign_forward(CLIENT, client, tensor(n, fill=fill))
        accept_result(client, request, serve(server, request), server_public_key=SERVER.public_key)
    before = client.history
    rollback = sign_forward(CLIENT, client, tensor(2, fill=3), position=4)  # keep 1 drafted token
    assert rollback.position == 4
    accept_result(client, rollback, serve(server, rollback), server_public_key=SERVER.public_key)
    assert (client.next_step, client.length, client.history) == (server.next_step, server.length, server.history)
    assert client.length == 6
    assert client.history == extend_history(rollback_history(before, 4), tensor(2, fill=3).digest())
    assert [(s.step, k) for s, k in client.kept()] == [(0, 3), (1, 1), (2, 2)]
    # a result signed as if the session had not been cut does not verify
    c2, s2 = states()
    for n, fill in ((3, 1), (4, 2)):
        r = sign_forward(CLIENT, c2, tensor(n, fill=fill))
        accept_result(c2, r, serve(s2, r), server_public_key=SERVER.public_key)
    forged = sign_result(SERVER, dataclasses.replace(s2, history=before, length=4), rollback, tensor(2, fill=7))
    with pytest.raises(BadSignature):
        accept_result(c2, rollback, forged, server_public_key=SERVER.public_key)


def test_a_position_past_the_length_is_bad_state_and_changes_nothing():
    client, server = states()
    request = sign_forward(CLIENT, client, tensor(2))
    accept_result(client, request, serve(server, request), server_public_key=SERVER.public_key)
    with pytest.raises(LocalProtocolError):
        sign_forward(CLIENT, client, tensor(1), position=3)
    ahead = dataclasses.replace(request, step=1, position=3)
    with pytest.raises(UnexpectedMessage, match="past the session's length 2") as info:
        check_forward(server, ahead, client_public_key=CLIENT.public_key, hidden_size=H)
    assert info.value.code == ErrorCode.BAD_STATE
    assert (server.next_step, server.length, len(server.transcript)) == (1, 2, 1)
