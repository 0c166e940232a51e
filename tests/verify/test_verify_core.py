"""Pure parts of verify/: comparison statistics, reputation, proofs checked against an
in-process span, and the DHT record kinds of stored proofs."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from peer.runtime import load_span
from protocol import (
    Identity,
    SessionState,
    accept_result,
    check_forward,
    encode_tensor,
    forward_request_statement,
    peer_id_of,
    sign_forward,
    sign_result,
)
from swarm.dht import RecordRejected, check_record
from verify import (
    InvalidProof,
    Reputation,
    ReputationFileError,
    check_proof,
    compare,
    first_mismatch,
    proof_digest,
    proof_from_bytes,
    proof_from_transcript,
    proof_records,
    proof_to_bytes,
    record_kinds,
    tolerance_for,
    verify_proof,
)
from verify._store import PART_SIZE

F32 = tolerance_for("f32")


# -- comparison ---------------------------------------------------------------------------


def test_identical_and_honestly_rounded_outputs_match():
    x = torch.randn(1, 5, 64)
    assert compare(x, x.clone(), tolerance=F32, depth=3).ok
    assert compare(x * (1 + 1e-7), x, tolerance=F32, depth=3).ok  # fp32 rounding scale


@pytest.mark.parametrize("cheat", ["noise", "scale", "permute", "zero-row", "nan"])
def test_cheats_fail_at_least_one_statistic(cheat):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 64)
    y = x.clone()
    if cheat == "noise":
        y += 1e-3 * torch.randn_like(y)
    elif cheat == "scale":
        y *= 1.001
    elif cheat == "permute":
        y = y[..., torch.randperm(64)]
    elif cheat == "zero-row":
        y[:, 2] = 0
    else:
        y[0, 1, 3] = float("nan")
    verdict = compare(y, x, tolerance=F32, depth=3)
    assert not verdict.ok
    assert verdict.reason


def test_topk_statistic_catches_a_same_norm_same_direction_swap():
    x = torch.zeros(1, 1, 64)
    x[..., :8] = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2])
    x[..., 8:] = 0.01
    y = x.clone()
    y[..., :4], y[..., 8:12] = x[..., 8:12], x[..., :4]  # the largest entries moved elsewhere
    verdict = compare(y, x, tolerance=dataclasses.replace(F32, rel_l2_base=10, cos_gap_base=2), depth=1)
    assert not verdict.ok
    assert "top-k" in verdict.reason


def test_first_mismatch_finds_the_first_bad_row():
    x = torch.randn(1, 9, 64)
    y = x.clone()
    assert first_mismatch(y, x, tolerance=F32, depth=2) is None
    y[:, 5:] += 0.1
    assert first_mismatch(y, x, tolerance=F32, depth=2) == 5


def test_tolerance_is_the_coarsest_dtype_and_grows_with_depth():
    assert tolerance_for("f32", "bf16") is tolerance_for("bf16")
    assert tolerance_for("q8", "f16") is tolerance_for("q8")
    with pytest.raises(ValueError, match="auditable"):
        tolerance_for("f32", "nf4")  # nf4 loses whole rows of real hidden states
    assert F32.max_rel_l2(30) > F32.max_rel_l2(1)
    with pytest.raises(ValueError, match="f8"):
        tolerance_for("f8")


# -- reputation ---------------------------------------------------------------------------

A, B, C = b"a" * 20, b"b" * 20, b"c" * 20


def test_reputation_decays_and_weighs_honesty_above_availability():
    rep = Reputation(half_life=100.0)
    rep.record_timeout(A, 0.0)
    rep.record_mismatch(B, 0.0)
    assert rep.score(C, 0.0) == 1.0
    assert rep.penalty(C, 0.0) == 0.0
    assert 1.0 > rep.score(A, 0.0) > rep.score(B, 0.0) > 0.0
    assert rep.standing(A, 100.0).timeouts == pytest.approx(0.5)
    assert rep.score(B, 1000.0) > rep.score(B, 0.0)  # a failure fades
    rep.record_success(A, 0.0, n=50)
    assert rep.score(A, 0.0) > 0.9
    rtts = rep.route_rtts([A, B, C], 0.0, base=0.05)
    assert rtts[C] == 0.05 < rtts[A] < rtts[B]


def test_bans_are_shared_and_persist_atomically(tmp_path):
    shared: set[bytes] = set()
    rep = Reputation(banned=shared)
    assert rep.ban(A, 5.0, reason="verified fraud proof", proof=b"d" * 32)
    assert not rep.ban(A, 6.0, reason="again")
    rep.record_invalid_proof(B, 1.0)
    assert A in shared
    assert rep.score(A, 0.0) == 0.0
    assert rep.route_rtts([A, B], 0.0, base=0.0).keys() == {B}
    path = tmp_path / "sub" / "reputation.cbor"
    rep.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = Reputation.load(path)
    assert again.bans == rep.bans
    assert again.is_banned(A)
    assert again.standing(B, 1.0).invalid_proofs == pytest.approx(1.0)
    assert Reputation.load(tmp_path / "absent").standings == {}
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ReputationFileError, match="corrupt"):
        Reputation.load(path)


# -- proofs against an in-process span ------------------------------------------------------


TINY: list[str] = []


@pytest.fixture(scope="module")
def span(tiny_verify):
    TINY[:] = [tiny_verify[0]]
    return load_span(tiny_verify[0], 0, 3)


def _session_proof(span, *, tamper: bool, steps: int = 4, client=None, rollback: bool = False):
    """A client and a server identity run a real session on ``span`` through the forward
    exchange, as the relay and the server do; the server's output of the last step is
    tampered with if asked. ``rollback``: step 1 drafts 3 tokens and step 2 rolls the
    session back to keep one of them (speculative decoding, spec 11.1)."""
    client, server = client or Identity.generate(), Identity.generate()
    sid = span.open_session(32)
    kept = [SessionState(client=client.peer_id, server=server.peer_id, session=sid, model=span.model_id,
                         span=(0, 3), max_length=32) for _ in range(2)]
    for state in kept:
        state.open()
    client_state, server_state = kept
    torch.manual_seed(1)
    for step in range(steps):
        x = torch.randn(1, 3 if step == 0 or (rollback and step == 1) else 1, span.hidden_size)
        position = 4 if rollback and step == 2 else None
        request = sign_forward(client, client_state, encode_tensor(x), position=position)
        check_forward(server_state, request, client_public_key=client.public_key, hidden_size=span.hidden_size)
        out = span.forward(sid, x, request.position)
        if tamper and step == steps - 1:
            out = out + 0.05 * torch.randn_like(out)
        result = sign_result(server, server_state, request, encode_tensor(out))
        accept_result(client_state, request, result, server_public_key=server.public_key)
    span.close_session(sid)
    return proof_from_transcript(accused=server.public_key, client=client.public_key, model=span.model_id,
                                 span=(0, 3), session=sid, transcript=client_state.transcript, index=steps - 1)


def test_a_true_proof_verifies_and_round_trips(span):
    proof = _session_proof(span, tamper=True)
    verdict = verify_proof(proof, span)
    assert not verdict.ok
    again = proof_from_bytes(proof_to_bytes(proof))
    assert again == proof
    assert proof_digest(again) == proof_digest(proof)


def test_an_honest_output_cannot_be_proven_wrong(span):
    with pytest.raises(InvalidProof, match="honest"):
        verify_proof(_session_proof(span, tamper=False), span)


def test_a_session_with_a_rollback_is_proven_and_not_framed(span):
    proof = _session_proof(span, tamper=True, rollback=True)
    assert [r.position for r in proof.requests] == [0, 3, 4, 5]
    assert not verify_proof(proof, span).ok
    with pytest.raises(InvalidProof, match="honest"):
        verify_proof(_session_proof(span, tamper=False, rollback=True), span)
    # the client claims it never rolled back (step 2 re-signed at the length, 6): the
    # accused signed another history, so the claim fails
    client = Identity.generate()
    proof = _session_proof(span, tamper=True, rollback=True, client=client)
    cut = proof.requests[2]
    resigned = dataclasses.replace(cut, position=6, signature=client.sign(forward_request_statement(
        client=peer_id_of(proof.client), server=peer_id_of(proof.accused), session=proof.session, step=2,
        model=proof.model, span=proof.span, position=6, input_digest=cut.hidden.digest())))
    last = proof.requests[3]
    moved = dataclasses.replace(last, position=7, signature=client.sign(forward_request_statement(
        client=peer_id_of(proof.client), server=peer_id_of(proof.accused), session=proof.session, step=3,
        model=proof.model, span=proof.span, position=7, input_digest=last.hidden.digest())))
    with pytest.raises(InvalidProof, match="accused's signature"):
        check_proof(dataclasses.replace(proof, requests=(*proof.requests[:2], resigned, moved)))


def test_forgeries_fail_the_signature_and_structure_checks(span):
    proof = _session_proof(span, tamper=False)
    forged_output = dataclasses.replace(proof, output=encode_tensor(torch.randn(1, 1, span.hidden_size)))
    with pytest.raises(InvalidProof, match="accused's signature"):
        check_proof(forged_output)
    reordered = dataclasses.replace(proof, requests=proof.requests[1:])
    with pytest.raises(InvalidProof, match="step"):
        check_proof(reordered)
    framer = Identity.generate()  # a third party re-signing the requests as "the client"
    with pytest.raises(InvalidProof, match="client's signature"):
        check_proof(dataclasses.replace(proof, client=framer.public_key))
    with pytest.raises(InvalidProof, match="same key"):
        check_proof(dataclasses.replace(proof, client=proof.accused))
    true_proof = _session_proof(span, tamper=True)
    with pytest.raises(InvalidProof, match="not inside the served span"):
        verify_proof(true_proof, load_span(TINY[0], 3, 6))


def test_a_client_cannot_frame_a_server_with_a_history_it_never_sent(span):
    client = Identity.generate()
    proof = _session_proof(span, tamper=False, client=client)
    accused_id, client_id = peer_id_of(proof.accused), peer_id_of(proof.client)
    fake = proof.requests[1]
    other_input = encode_tensor(torch.randn(*fake.hidden.shape))
    resigned = dataclasses.replace(fake, hidden=other_input, signature=client.sign(forward_request_statement(
        client=client_id, server=accused_id, session=proof.session, step=fake.step, model=proof.model,
        span=proof.span, position=fake.position, input_digest=other_input.digest())))
    framing = dataclasses.replace(proof, requests=(proof.requests[0], resigned, *proof.requests[2:]))
    with pytest.raises(InvalidProof, match="accused's signature"):  # the signed history differs
        check_proof(framing)


# -- stored proofs --------------------------------------------------------------------------


def test_stored_proof_records_pass_the_dht_checks_and_forgeries_do_not(span):
    proof = _session_proof(span, tamper=True, steps=12)
    publisher = Identity.generate()
    records = proof_records(publisher, proof, now=1000.0)
    assert len(records) == 1 + -(-len(proof_to_bytes(proof)) // PART_SIZE)
    assert len(records) > 2
    kinds = record_kinds()
    for record in records:
        check_record(record, now=1000.0, kinds=kinds)
    index, part = records[0], records[1]
    moved = type(part).create(publisher, key=index.key, seq=part.seq, expires=part.expires, value=part.value)
    with pytest.raises(RecordRejected, match="part_key"):
        check_record(moved, now=1000.0, kinds=kinds)
    other = type(index).create(publisher, key=part.key, seq=index.seq, expires=index.expires, value=index.value)
    with pytest.raises(RecordRejected, match="fraud_key"):
        check_record(other, now=1000.0, kinds=kinds)
    assert peer_id_of(proof.accused) != publisher.peer_id
