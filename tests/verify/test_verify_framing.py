"""No input a client can sign convicts an honest server (issue 11, "Tolerances hold for
any input a client can sign"), and real cheats are still convicted.

Property: a client and an honest server run a real session through the forward
exchange (client-signed requests, server-signed results, in-process) on inputs of any
scale and shape, in every auditable wire dtype; the server's output is computed
honestly in one of five ways (its KV-cache session, the session fed one token at a
time, a one-shot pass over the prefix, float64 then rounded, float64 blocks with
float32 between them: five honest rounding orders, some of which the verifier never
runs itself); ``verify_proof`` of the proof
built from that genuine transcript never convicts. Spans of two tiny Llamas: the tests'
model and one with large weights, on which such inputs push honest disagreement past
the calibrated f32 thresholds (the framing attack)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.runtime import load_head, load_span
from protocol import Identity, SessionState, accept_result, check_forward, decode_tensor, encode_tensor, sign_forward, \
    sign_result
from verify import InconclusiveProof, InvalidProof, NormBounds, bounds_from_activations, judge, proof_from_transcript, \
    tolerance_for, verify_proof

WIRES = ("f32", "f16", "bf16", "q8")
KINDS = ("normal", "heavy", "huge-rows", "constant", "real")


class Model:
    """Spans of one model: [0, 3) and [3, 6), float32 and a float64 twin, and its head."""

    def __init__(self, path: str) -> None:
        self.head = load_head(path)
        self.spans = {(0, 3): load_span(path, 0, 3), (3, 6): load_span(path, 3, 6)}
        self.f64 = {}
        for key in self.spans:
            twin = load_span(path, *key)
            twin.layers.to(torch.float64)
            twin.dtype = torch.float64
            self.f64[key] = twin
        self.first = load_span(path, 0, 3)  # to make real activations entering block 3


@pytest.fixture(scope="module")
def models(tiny_verify, ill_conditioned):
    return {"tiny": Model(tiny_verify[0]), "ill": Model(ill_conditioned)}


def make_inputs(model: Model, span, kind: str, scale: float, lengths: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, hidden = sum(lengths), model.head.hidden_size
    if kind == "real":
        ids = torch.randint(0, model.head.vocab_size, (n,), generator=g).tolist()
        x = model.head.embed(ids).to(torch.float32)
        return model.first.forward_once(x) if span[0] == 3 else x
    x = torch.randn(1, n, hidden, generator=g) * scale
    if kind == "heavy":  # Student-t with 1.5 degrees of freedom: huge outliers
        chi = torch.distributions.Chi2(torch.tensor(1.5)).sample((1, n, 1))
        x = x / (chi / 1.5).sqrt()
    elif kind == "huge-rows":
        x[:, :: max(n // 3, 1)] *= 1e3
    elif kind == "constant":
        x = torch.full((1, n, hidden), scale) * torch.linspace(1.0, 2.0, n).view(1, n, 1)
    return x


def honest_proof(model: Model, span, x: torch.Tensor, lengths: list[int], wire: str, how: str,
                 tamper=None):
    """A genuine transcript of an honest (or ``tamper``ed) server, and the proof of its last step."""
    client, server = Identity.generate(bits=0), Identity.generate(bits=0)  # no DHT: no puzzle
    executor = model.spans[span]
    total = sum(lengths)
    stateful = how in ("session", "tokenwise")
    sid = executor.open_session(total) if stateful else b"\x00" * 16
    states = [SessionState(client=client.peer_id, server=server.peer_id, session=sid, model=executor.model_id,
                           span=span, max_length=total, wire_dtype=wire) for _ in range(2)]
    for state in states:
        state.open()
    client_state, server_state = states
    position, received = 0, []
    try:
        for n in lengths:
            request = sign_forward(client, client_state, encode_tensor(x[:, position:position + n], wire))
            check_forward(server_state, request, client_public_key=client.public_key,
                          hidden_size=executor.hidden_size)
            step_in = decode_tensor(request.hidden, out_dtype=torch.float32)  # what the server received
            received.append(step_in)
            prefix = torch.cat(received, dim=1)
            with torch.inference_mode():
                if how == "session":
                    out = executor.forward(sid, step_in, position)
                elif how == "once":
                    out = executor.forward_once(prefix)[:, -n:]
                elif how == "tokenwise":  # a multi-token step one token at a time (other kernels)
                    out = torch.cat([executor.forward(sid, step_in[:, t:t + 1], position + t)
                                     for t in range(n)], dim=1)
                elif how == "blockwise":  # float64 blocks, float32 between them (mixed precision)
                    out = prefix
                    for block in range(*span):
                        out = model.f64[span].forward_once(out.double(), start=block, end=block + 1).float()
                    out = out[:, -n:]
                else:  # float64, rounded to float32: the most exact honest answer
                    out = model.f64[span].forward_once(prefix.double())[:, -n:].float()
            if tamper is not None and position + n == total:
                out = tamper(out)
            result = sign_result(server, server_state, request, encode_tensor(out, wire))
            accept_result(client_state, request, result, server_public_key=server.public_key)
            position += n
    finally:
        if stateful:
            executor.close_session(sid)
    return proof_from_transcript(accused=server.public_key, client=client.public_key, model=executor.model_id,
                                 span=span, session=sid, transcript=client_state.transcript,
                                 index=len(lengths) - 1)


inputs = st.fixed_dictionaries({
    "model": st.sampled_from(("tiny", "ill")),
    "span": st.sampled_from(((0, 3), (3, 6))),
    "kind": st.sampled_from(KINDS),
    "scale": st.floats(-3.0, 3.0).map(lambda e: 10.0 ** e),
    "lengths": st.lists(st.integers(1, 4), min_size=1, max_size=5).map(lambda tail: [6] + tail),
    "seed": st.integers(0, 2**31 - 1),
    "wire": st.sampled_from(WIRES),
    "how": st.sampled_from(("session", "tokenwise", "once", "f64", "blockwise")),
})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=inputs)
def test_no_signable_input_convicts_an_honest_server(models, case):
    model = models[case["model"]]
    x = make_inputs(model, case["span"], case["kind"], case["scale"], case["lengths"], case["seed"])
    proof = honest_proof(model, case["span"], x, case["lengths"], case["wire"], case["how"])
    with pytest.raises(InvalidProof):
        verify_proof(proof, model.spans[case["span"]])


CHEATS = {  # a cheat per wire dtype, larger than that wire's own rounding (spec 13.3)
    "f32": lambda out: out * 1.01,
    "f16": lambda out: out + 0.01 * out.std() * torch.randn_like(out),
    "bf16": lambda out: out * 1.1,
    "q8": lambda out: torch.randn_like(out) * out.std(),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=inputs.filter(lambda c: c["kind"] == "real"))
def test_cheats_on_real_activations_are_still_convicted(models, case):
    model = models[case["model"]]
    x = make_inputs(model, case["span"], "real", 1.0, case["lengths"], case["seed"])
    proof = honest_proof(model, case["span"], x, case["lengths"], case["wire"], "session",
                         tamper=CHEATS[case["wire"]])
    assert verify_proof(proof, model.spans[case["span"]]).guilty


def test_inputs_outside_the_calibrated_range_are_inconclusive(models):
    model = models["tiny"]
    real = make_inputs(model, (0, 3), "real", 1.0, [6, 2], 0)
    bounds = bounds_from_activations(model.head.model_id, {0: [real]})
    lo, hi = bounds.allowed(0)
    assert bounds.check(real, 0) is None and lo < hi
    assert NormBounds.from_json(bounds.to_json()) == bounds
    huge = real * 1e4  # far outside: even a blatant cheat is only "inconclusive" there
    proof = honest_proof(model, (0, 3), huge, [6, 2], "f32", "session", tamper=lambda out: out * 2)
    with pytest.raises(InconclusiveProof, match="outside the activation range"):
        verify_proof(proof, model.spans[(0, 3)], bounds=bounds)
    assert verify_proof(proof, model.spans[(0, 3)], bounds=None).guilty  # without bounds: the spread rule


def test_the_verdict_scales_with_the_honest_spread():
    floor = tolerance_for("f32")
    ref = torch.randn(1, 3, 64)
    once = ref * (1 + 1e-4)  # an input on which two honest computations differ by 1e-4
    assert not judge(ref * (1 + 5e-4), ref, once, wire_dtype="f32", tolerance=floor, depth=3).guilty
    assert judge(ref * (1 + 5e-3), ref, once, wire_dtype="f32", tolerance=floor, depth=3).guilty
    assert judge(ref * (1 + 5e-4), ref, ref.clone(), wire_dtype="f32", tolerance=floor, depth=3).guilty
    assert judge(ref, ref * float("inf"), once, wire_dtype="f32", tolerance=floor, depth=3).inconclusive
    big = ref * 6e4  # f16 overflows on the way: nobody can tell
    assert judge(big, big, big, wire_dtype="f16", tolerance=tolerance_for("f16"), depth=3).inconclusive
