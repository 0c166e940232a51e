"""Fraud proofs: building one from a signed transcript, and verifying one
(spec "Verification", "Fraud proofs").

Theory of operation. A ``FraudProof`` holds everything a third party needs to check
that ``accused`` signed a wrong output: the client-signed requests of the session from
step 0 to the disputed step ``k`` (their hidden states are the span's whole input
prefix) and the accused's signed output for step ``k``. A FORWARD_ONCE answer is the
special case of one request (``session`` = the request's nonce, step and position 0).

``verify_proof`` applies the spec's checks in this order, each failure an
``InvalidProof`` (wire code INVALID_PROOF), cheapest first:

1. structure: distinct accused and client; steps ``0..k`` in order; positions
   from 0, each at most the session's length so far (below it: a rollback, spec 11.1); every tensor ``[1, n, H]`` of one wire dtype; the output shaped
   like request ``k``'s input;
2. the client's signature over every request statement, in step order;
3. the accused's signature over the result statement of step ``k``;
4. the verifier serves the model and a span covering the proof's blocks, and the
   inputs lie within the span's activation range recorded at calibration
   (``verify._bounds``; a model without a record has no bounds): outside it the
   proof is inconclusive (``InconclusiveProof``);
5. recomputation: the requests replayed step by step through a session (as the
   accused ran them), one pass over the concatenated prefix, and (unquantized
   spans) one pass in float64; ``judge`` convicts only if the output is far outside
   both the calibrated floor and the honest spread of these recomputations
   (``verify._judge``). Otherwise the
   accused computed honestly (the proof is invalid: it frames an honest peer) or
   the inputs are beyond judging (inconclusive).

Only step 5 costs compute, and it runs only for a proof whose every signature holds,
so a forger cannot make verifiers burn compute without signing the garbage himself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from protocol import (
    DEFAULT_LIMITS,
    ForwardEvidence,
    FraudProof,
    Limits,
    SessionState,
    SignedStep,
    WireTensor,
    cbor_decode,
    cbor_encode,
    check_result_signature,
    decode_tensor,
    peer_id_of,
    replay_requests,
)
from protocol.errors import BadSignature, ErrorCode, LocalProtocolError, SwarmError

from ._bounds import NormBounds, load_bounds
from ._compare import tolerance_for
from ._judge import Verdict, judge

__all__ = [
    "LocalRecompute",
    "InconclusiveProof",
    "InvalidProof",
    "SpanRecompute",
    "check_proof",
    "proof_digest",
    "proof_from_bytes",
    "proof_from_forward_once",
    "proof_from_transcript",
    "proof_to_bytes",
    "recompute_prefix",
    "verify_proof",
]


class InvalidProof(SwarmError):
    """A fraud proof that does not verify; the message says which check failed."""

    code = ErrorCode.INVALID_PROOF


class InconclusiveProof(InvalidProof):
    """A proof whose inputs are beyond judging (outside the calibrated activation
    range, or driving the span out of the wire dtype's range): never a conviction.
    Same wire code as ``InvalidProof``."""


class SpanRecompute(Protocol):
    """What a verifier needs of a loaded span (``peer.runtime.SpanExecutor``)."""

    model_id: str
    start: int
    end: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    def forward_once(self, hidden: torch.Tensor, *, start: int | None = None, end: int | None = None) -> Any: ...

    def open_session(self, max_length: int, *, start: int | None = None, end: int | None = None) -> bytes: ...

    def forward(self, session_id: bytes, hidden: torch.Tensor, position: int) -> Any: ...

    def close_session(self, session_id: bytes) -> None: ...


T = TypeVar("T")


class LocalRecompute(Protocol):
    """A peer's own copy of spans it does not serve, loaded on demand (a client's:
    ``peer._local_verify.LocalSpans``): what lets it check evidence itself."""

    async def run(self, model: str, span: tuple[int, int], fn: Callable[[SpanRecompute], T]) -> T | None:
        """``fn(executor)`` in a worker thread on blocks ``span`` of ``model``; None if the
        span cannot be loaded here (too large for the budget, another model)."""
        ...


# -- building ------------------------------------------------------------------------


def proof_from_transcript(*, accused: bytes, client: bytes, model: str, span: tuple[int, int], session: bytes,
                          transcript: Sequence[SignedStep], index: int) -> FraudProof:
    """The proof that the output of ``transcript[index]`` is wrong.

    Args:
        accused, client: Ed25519 public keys of the hop's server and of the client.
        transcript: the hop's signed steps from step 0 (a client's ``SessionState``'s).
    """
    if not 0 <= index < len(transcript):
        raise IndexError(f"step index {index} is outside the transcript of {len(transcript)} steps")
    requests = tuple(step.evidence() for step in transcript[:index + 1])
    disputed = transcript[index]
    if disputed.result_signature is None:  # a server's transcript: it holds no signed outputs
        raise LocalProtocolError(f"step {index} of the transcript has no server-signed output to dispute")
    return FraudProof(accused=accused, client=client, model=model, span=span, session=session, requests=requests,
                        output=disputed.output, output_signature=disputed.result_signature)


def proof_from_forward_once(*, accused: bytes, client: bytes, model: str, span: tuple[int, int], nonce: bytes,
                            hidden: WireTensor, request_signature: bytes, output: WireTensor,
                            output_signature: bytes) -> FraudProof:
    """The proof that a FORWARD_ONCE answer is wrong (one request: step 0, position 0)."""
    request = ForwardEvidence(step=0, position=0, hidden=hidden, signature=request_signature)
    return FraudProof(accused=accused, client=client, model=model, span=span, session=nonce, requests=(request,),
                        output=output, output_signature=output_signature)


def proof_to_bytes(proof: FraudProof) -> bytes:
    """The proof's deterministic CBOR (its body map), as stored in the DHT."""
    return cbor_encode(proof.to_cbor())


def proof_from_bytes(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> FraudProof:
    """Raises DecodeError/LimitExceeded on malformed bytes."""
    return FraudProof.from_cbor(cbor_decode(data, max_size=limits.max_message_size), limits=limits)


def proof_digest(proof: FraudProof) -> bytes:
    """BLAKE2b-256 of ``proof_to_bytes``: the proof's identity for dedup and storage."""
    return hashlib.blake2b(proof_to_bytes(proof), digest_size=32).digest()


# -- verifying -------------------------------------------------------------------------


def check_proof(proof: FraudProof) -> None:
    """Checks 1-3 of the module docstring (no compute). Raises InvalidProof."""
    if proof.accused == proof.client:
        raise InvalidProof("the accused and the client are the same key")
    requests = proof.requests
    if not requests:
        raise InvalidProof("a proof holds at least one request")
    dtype = proof.output.dtype
    hidden_size = None
    position = longest = 0
    for i, request in enumerate(requests):
        shape = tuple(request.hidden.shape)
        if request.step != i:
            raise InvalidProof(f"request {i} has step {request.step}; steps must run 0, 1, ... in order")
        if request.position > position or (i == 0 and request.position != 0):
            raise InvalidProof(f"step {i} starts at position {request.position}, past the session's length "
                               f"{position}")
        if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or (hidden_size is not None and shape[2] != hidden_size):
            raise InvalidProof(f"step {i} has hidden states of shape {list(shape)}")
        if request.hidden.dtype != dtype:
            raise InvalidProof(f"step {i} is {request.hidden.dtype} but the output is {dtype}")
        hidden_size = shape[2]
        position = request.position + shape[1]
        longest = max(longest, position)
    if tuple(proof.output.shape) != tuple(requests[-1].hidden.shape):
        raise InvalidProof(f"output shape {list(proof.output.shape)} differs from the last input's "
                           f"{list(requests[-1].hidden.shape)}")
    # 2-3: the proof is a session replayed: the client's signatures in step order,
    # then the accused's over the history digest of exactly these inputs
    state = SessionState(client=peer_id_of(proof.client), server=peer_id_of(proof.accused), session=proof.session,
                         model=proof.model, span=proof.span, max_length=longest, wire_dtype=dtype)
    state.open()
    try:
        replay_requests(state, requests, client_public_key=proof.client)
    except BadSignature:
        raise InvalidProof(f"the client's signature on step {state.next_step} does not verify") from None
    last = requests[-1]
    try:
        check_result_signature(state, step=last.step, input_digest=last.hidden.digest(), output=proof.output,
                               signature=proof.output_signature, history=state.history,
                               server_public_key=proof.accused)
    except BadSignature:
        raise InvalidProof("the accused's signature on the output does not verify") from None


def recompute_prefix(executor: SpanRecompute, inputs: Sequence[WireTensor], span: tuple[int, int], *,
                     limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """FORWARD_ONCE of the concatenated ``inputs`` through blocks ``span`` (float32 out)."""
    x = torch.cat([decode_tensor(w, limits=limits, out_dtype=torch.float32) for w in inputs], dim=1)
    with torch.inference_mode():
        out = executor.forward_once(x.to(device=executor.device, dtype=executor.dtype), start=span[0], end=span[1])
    return out.to(device="cpu", dtype=torch.float32)


def replay_session(executor: SpanRecompute, inputs: Sequence[torch.Tensor], span: tuple[int, int],
                   positions: Sequence[int] | None = None) -> torch.Tensor:
    """The last step's output of a session through blocks ``span`` fed ``inputs`` one
    step each at ``positions`` (default: one after the other; a lower one rolls the
    session back), as the accused's session was (float32 out)."""
    if positions is None:
        positions = [sum(x.shape[1] for x in inputs[:i]) for i in range(len(inputs))]
    total = max(p + x.shape[1] for p, x in zip(positions, inputs, strict=True))
    sid = executor.open_session(total, start=span[0], end=span[1])
    try:
        out = None
        with torch.inference_mode():
            for x, position in zip(inputs, positions, strict=True):
                out = executor.forward(sid, x.to(device=executor.device, dtype=executor.dtype), position)
    finally:
        executor.close_session(sid)
    assert out is not None  # a proof holds at least one request
    return out.to(device="cpu", dtype=torch.float32)


def _bounds(positions: Sequence[int], length: int) -> list[int]:
    """Per step, the position from which a later step rolled its rows back (or
    ``length``): ``protocol.kept_rows`` over bare positions."""
    out, bound = [], length
    for p in reversed(positions):
        out.append(bound)
        bound = min(bound, p)
    return out[::-1]


def _exact(executor: SpanRecompute, inputs: list[torch.Tensor], span: tuple[int, int]) -> torch.Tensor | None:
    """The float64 recomputation (``SpanExecutor.forward_once_exact``), if the executor
    has one (not a quantized span): verify._judge's reference for honest rounding."""
    exact = getattr(executor, "forward_once_exact", None)
    if exact is None:
        return None
    try:
        with torch.inference_mode():
            out = exact(torch.cat(inputs, dim=1).to(device=executor.device, dtype=torch.float64),
                        start=span[0], end=span[1])
    except SwarmError:
        return None
    return out.to(device="cpu", dtype=torch.float64)


def verify_proof(proof: FraudProof, executor: SpanRecompute, *, compute_dtype: str = "f32",
                 bounds: NormBounds | None | bool = True, limits: Limits = DEFAULT_LIMITS) -> Verdict:
    """All five checks of the module docstring. Returns the verdict that convicts the
    accused.

    Args:
        bounds: the model's activation range; True (default) looks the record up
            (``load_bounds``), None or False checks no bounds.

    Raises:
        InvalidProof: a check failed; the accused is not guilty by this proof
            (``InconclusiveProof``: the inputs are beyond judging).
    """
    check_proof(proof)
    if proof.model != executor.model_id:
        raise InvalidProof(f"the proof is about {proof.model}; this peer serves {executor.model_id}")
    if not executor.start <= proof.span[0] < proof.span[1] <= executor.end:
        raise InvalidProof(f"blocks [{proof.span[0]}, {proof.span[1]}) are not inside the served span "
                           f"[{executor.start}, {executor.end})")
    if proof.output.shape[2] != executor.hidden_size:
        raise InvalidProof(f"hidden size {proof.output.shape[2]} is not the model's {executor.hidden_size}")
    try:
        tolerance = tolerance_for(compute_dtype, proof.output.dtype)
    except ValueError as exc:
        raise InvalidProof(str(exc)) from None
    try:
        steps = [decode_tensor(r.hidden, limits=limits, out_dtype=torch.float32) for r in proof.requests]
        claimed = decode_tensor(proof.output, limits=limits, out_dtype=torch.float32)
    except SwarmError as exc:
        raise InvalidProof(f"cannot decode the proof: {exc}") from None
    # the session's input prefix at the last step: rows later steps rolled back are left out
    positions = [r.position for r in proof.requests]
    inputs = [x[:, :max(0, min(x.shape[1], bound - p))] for x, p, bound in
              zip(steps, positions, _bounds(positions, positions[-1] + steps[-1].shape[1]), strict=True)]
    inputs = [x for x in inputs if x.shape[1]]
    record = load_bounds(proof.model) if bounds is True else (bounds or None)
    if record is not None:
        outside = record.check(torch.cat(inputs, dim=1), proof.span[0])
        if outside is not None:
            raise InconclusiveProof(f"the proof is inconclusive: {outside}")
    try:
        session = replay_session(executor, steps, proof.span, positions)
        once = executor.forward_once(torch.cat(inputs, dim=1).to(device=executor.device, dtype=executor.dtype),
                                     start=proof.span[0], end=proof.span[1])
    except SwarmError as exc:  # e.g. a prefix longer than the model's context
        raise InvalidProof(f"cannot recompute the proof: {exc}") from None
    rows = claimed.shape[1]
    once = once.to(device="cpu", dtype=torch.float32)[:, -rows:]
    exact = _exact(executor, inputs, proof.span)
    verdict = judge(claimed, session[:, -rows:], once, wire_dtype=proof.output.dtype, tolerance=tolerance,
                    depth=proof.span[1] - proof.span[0], exact=None if exact is None else exact[:, -rows:])
    if verdict.inconclusive:
        raise InconclusiveProof(f"the proof is inconclusive: {verdict}")
    if not verdict.guilty:
        raise InvalidProof(f"the accused's output is within the honest spread of a recomputation ({verdict}); "
                           "the proof frames an honest peer")
    return verdict
