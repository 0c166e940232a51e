"""The forward exchange, both sides of it (spec/SPEC.md section 9, "Signed statements",
and section 11, "Inference sessions").

Theory of operation. One FORWARD step is four moves, each made here and nowhere else:

1. the client builds and signs the request (``sign_forward``): step and position come
   from its ``SessionState``, the signature covers the forward request statement;
2. the server checks it (``check_forward``): the input tensor (the session's wire
   dtype, shape ``[1, n, H]``), the session state (step, position, ``max_length``) and
   the client's signature, in that order, before any compute;
3. the server signs its result (``sign_result``): its ``SessionState`` records the
   step (the history digest now covers this input) and the result statement is
   signed over that digest;
4. the client checks the result (``accept_result``): the session and step echo, the
   shape, and the server's signature over the history digest the client computed
   itself; then its ``SessionState`` records the step, output included.

Both parties advance the same ``SessionState`` with the same rule (a step below the
session's length rolls it back first, and the digest records that), so their history
digests agree step by step, and a signed output can only be paired with the inputs
that produced it. FORWARD_ONCE is the same exchange on a session of one step whose id
is the request's nonce (``forward_once_state``). A fraud proof is checked by replaying
the client-signed requests into a fresh state (``replay_requests``) and checking the
accused's signature over the digest that results (``check_result_signature``).

The session's wire format is its dtype and, for ``q8``/``nf4``, its block size
(OPEN_SESSION's ``blocksize``, 4096 unless asked; ``check_open_session``): inputs must
have it and outputs are encoded with it, so two honest servers return the same bytes
and sign the same digests. A FORWARD_ONCE's output has its input's dtype and block
size.

PUSH (spec section 11.4) is the same exchange with the client's request split in two:
the client signs one push request statement for the whole chain of a step
(``sign_push``), and each hop after the first takes its input from its upstream's
signed output, which it checks against the upstream's forward result signature
(``check_push``): a hop cannot make the next one compute on bytes it did not sign.
Each hop records the step in its ``SessionState`` by the same rule (the history
digest does not depend on how the input came) and signs its output over the forward
result statement (``sign_push_output``). The client checks every hop's output in
route order (``accept_push_result``) and records each step; before an audit it signs
a forward request statement of its own over each pushed input
(``sign_pushed_requests``), so its transcripts, audits and fraud proofs are those of
star steps. A hop that cannot go on signs a failure report
(``sign_push_failure``).

Failures are typed: ``InvalidRequest`` (dtype, block size, shape),
``UnexpectedMessage`` (session state, or an answer that does not answer),
``BadSignature``; ``LocalProtocolError`` for this side's own misuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ._identity import Identity, verify_signature
from ._messages import Forward, ForwardEvidence, ForwardOnce, ForwardOnceResult, ForwardResult, OpenSession
from ._push_messages import HopOutput, Push, PushFailure, PushHop, PushResult
from ._session import SessionPhase, SessionState, SignedStep
from ._statements import (
    extend_history,
    forward_request_statement,
    forward_result_statement,
    push_failure_statement,
    push_request_statement,
)
from .errors import InvalidRequest, LocalProtocolError, ProtocolError, UnexpectedMessage

__all__ = [
    "DEFAULT_BLOCKSIZE",
    "check_open_session",
    "sign_forward",
    "check_forward",
    "sign_result",
    "accept_result",
    "sign_forward_once",
    "forward_once_state",
    "check_forward_once",
    "sign_forward_once_result",
    "accept_forward_once_result",
    "check_input",
    "request_statement",
    "result_statement",
    "replay_requests",
    "check_result_signature",
    "sign_push",
    "push_input",
    "check_push",
    "sign_push_output",
    "push_onward",
    "sign_push_failure",
    "check_push_failure",
    "PushOutcome",
    "accept_push_result",
    "sign_pushed_requests",
]


#: The block size of a q8/nf4 session whose OPEN_SESSION names none.
DEFAULT_BLOCKSIZE = 4096


def check_open_session(request: OpenSession) -> int:
    """The server's check of an OPEN_SESSION's wire format; returns the session's block
    size (``DEFAULT_BLOCKSIZE`` unless the request names one).

    Raises:
        InvalidRequest: an unknown wire dtype, a block size that is not one of
            ``BLOCKSIZES``, or a block size with a lossless dtype.
    """
    from ._tensor import BLOCKSIZES, DTYPES, QUANTIZED  # the codec's constants (imports torch)

    if request.wire_dtype not in DTYPES:
        raise InvalidRequest(f"unknown wire dtype {request.wire_dtype!r}; use one of {', '.join(DTYPES)}")
    if request.blocksize is None:
        return DEFAULT_BLOCKSIZE
    if request.wire_dtype not in QUANTIZED:
        raise InvalidRequest(f"a blocksize is for q8 and nf4 sessions, not {request.wire_dtype}")
    if request.blocksize not in BLOCKSIZES:
        raise InvalidRequest(f"blocksize {request.blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}")
    return request.blocksize


# -- the statements of a session ----------------------------------------------------------


def request_statement(state: SessionState, *, step: int, position: int, input_digest: bytes) -> bytes:
    """The forward request statement of one step of ``state``'s session."""
    return forward_request_statement(client=state.client, server=state.server, session=state.session, step=step,
                                     model=state.model, span=state.span, position=position,
                                     input_digest=input_digest)


def result_statement(state: SessionState, *, step: int, input_digest: bytes, output_digest: bytes,
                     history: bytes) -> bytes:
    """The forward result statement of one step of ``state``'s session."""
    return forward_result_statement(server=state.server, session=state.session, step=step, model=state.model,
                                    span=state.span, input_digest=input_digest, output_digest=output_digest,
                                    history=history)


def check_input(hidden: Any, *, wire_dtype: str, hidden_size: int, blocksize: int | None = None) -> int:
    """The number of tokens in ``hidden``, a request's input; raises ``InvalidRequest``
    unless it is a ``[1, n, hidden_size]`` tensor (n >= 1) in ``wire_dtype`` (and, for
    q8/nf4, ``blocksize`` when given)."""
    if hidden.dtype != wire_dtype:
        raise InvalidRequest(f"hidden states must be sent as {wire_dtype}, got {hidden.dtype}")
    if blocksize is not None and hidden.blocksize is not None and hidden.blocksize != blocksize:
        raise InvalidRequest(f"{wire_dtype} hidden states must have the session's blocksize {blocksize}, "
                             f"got {hidden.blocksize}")
    shape = tuple(hidden.shape)
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != hidden_size:
        raise InvalidRequest(f"hidden states must have shape [1, n, {hidden_size}], got {list(shape)}")
    return shape[1]


def _check_request(state: SessionState, *, step: int, position: int, hidden: Any, signature: bytes,
                   client_public_key: bytes, hidden_size: int | None) -> int:
    n_tokens = (check_input(hidden, wire_dtype=state.wire_dtype, hidden_size=hidden_size,
                            blocksize=state.blocksize)
                if hidden_size is not None else int(hidden.shape[1]))
    state.check_forward(step=step, position=position, n_tokens=n_tokens)
    verify_signature(client_public_key, request_statement(state, step=step, position=position,
                                                          input_digest=hidden.digest()), signature)
    return n_tokens


def check_result_signature(state: SessionState, *, step: int, input_digest: bytes, output: Any, signature: bytes,
                           history: bytes, server_public_key: bytes) -> None:
    """Raises ``BadSignature`` unless the server signed ``output`` as step ``step``'s
    result, over ``history`` (the digest of the inputs up to and including this one)."""
    verify_signature(server_public_key, result_statement(state, step=step, input_digest=input_digest,
                                                         output_digest=output.digest(), history=history), signature)


def _check_answer_shape(state: SessionState, request_hidden: Any, output: Any) -> None:
    if tuple(output.shape) != tuple(request_hidden.shape):
        raise UnexpectedMessage(f"returned shape {list(output.shape)}, expected {list(request_hidden.shape)}")
    if output.dtype != state.wire_dtype or (output.blocksize is not None and output.blocksize != state.blocksize):
        got = output.dtype + (f"/{output.blocksize}" if output.blocksize is not None else "")
        want = state.wire_dtype + (f"/{state.blocksize}" if output.blocksize is not None else "")
        raise UnexpectedMessage(f"returned a {got} tensor, the session's wire format is {want}")


# -- FORWARD ------------------------------------------------------------------------------


def sign_forward(identity: Identity, state: SessionState, hidden: Any, *, position: int | None = None) -> Forward:
    """The client's signed FORWARD of ``hidden`` as the session's next step, at
    ``position`` (default the session's length; below it, the step rolls the session
    back there first: spec 11.1).

    The state does not move until ``accept_result``.

    Raises:
        LocalProtocolError: ``identity`` is not the session's client, the session is
            not open, or ``position`` is past its length.
    """
    if identity.peer_id != state.client:
        raise LocalProtocolError("only the session's client signs its requests")
    if state.phase is not SessionPhase.OPEN:
        raise LocalProtocolError(f"the session is {state.phase.value}, not OPEN")
    if position is None:
        position = state.length
    if not 0 <= position <= state.length:
        raise LocalProtocolError(f"a step at position {position} of a session at {state.length} tokens")
    step = state.next_step
    signature = identity.sign(request_statement(state, step=step, position=position, input_digest=hidden.digest()))
    return Forward(session=state.session, step=step, position=position, hidden=hidden, signature=signature)


def check_forward(state: SessionState, request: Forward, *, client_public_key: bytes, hidden_size: int) -> int:
    """The server's checks of a FORWARD before any compute; returns its token count.

    Raises:
        InvalidRequest: not the session's wire dtype, or not ``[1, n, hidden_size]``.
        UnexpectedMessage: the session state does not allow it (BAD_STATE, UNKNOWN_SESSION
            or MAX_LENGTH_EXCEEDED).
        BadSignature: the client did not sign exactly this request.
    """
    if request.session != state.session:
        raise LocalProtocolError("a request of another session")
    return _check_request(state, step=request.step, position=request.position, hidden=request.hidden,
                          signature=request.signature, client_public_key=client_public_key, hidden_size=hidden_size)


def sign_result(identity: Identity, state: SessionState, request: Forward, output: Any) -> ForwardResult:
    """The server's signed result of ``request`` (checked by ``check_forward``); records
    the step in ``state`` (the client's signed input, not the output).

    Raises:
        UnexpectedMessage: the state moved since the check (say, the session closed).
    """
    history = state.record(SignedStep(step=request.step, position=request.position, input=request.hidden,
                                      request_signature=request.signature))
    signature = identity.sign(result_statement(state, step=request.step, input_digest=request.hidden.digest(),
                                               output_digest=output.digest(), history=history))
    return ForwardResult(session=state.session, step=request.step, hidden=output, signature=signature)


def accept_result(state: SessionState, request: Forward, result: ForwardResult, *,
                  server_public_key: bytes) -> SignedStep:
    """The client's checks of a FORWARD_RESULT; records the step and returns it.

    Raises:
        UnexpectedMessage: it answers another session or step, or has another shape.
        BadSignature: the server did not sign this output over this session's history.
    """
    if result.session != request.session or result.step != request.step:
        raise UnexpectedMessage(f"answered session/step {result.session.hex()}/{result.step}, "
                                f"asked {request.session.hex()}/{request.step}")
    _check_answer_shape(state, request.hidden, result.hidden)
    input_digest = request.hidden.digest()
    check_result_signature(state, step=request.step, input_digest=input_digest, output=result.hidden,
                           signature=result.signature,
                           history=state.next_history(position=request.position, input_digest=input_digest),
                           server_public_key=server_public_key)
    step = SignedStep(step=request.step, position=request.position, input=request.hidden,
                      request_signature=request.signature, output=result.hidden, result_signature=result.signature)
    state.record(step)
    return step


# -- FORWARD_ONCE: a session of one step ----------------------------------------------------


def forward_once_state(*, client: bytes, server: bytes, nonce: bytes, model: str, span: tuple[int, int],
                       hidden: Any) -> SessionState:
    """The one-step session a FORWARD_ONCE of ``hidden`` is: its id is the nonce, its
    step and position are 0, its wire format (dtype, block size) is the input's, and so
    is its output's."""
    state = SessionState(client=client, server=server, session=nonce, model=model, span=span,
                         max_length=int(hidden.shape[1]),
                         wire_dtype=hidden.dtype, blocksize=hidden.blocksize or DEFAULT_BLOCKSIZE)
    state.open()
    return state


def sign_forward_once(identity: Identity, *, server: bytes, nonce: bytes, model: str, span: tuple[int, int],
                      hidden: Any) -> tuple[ForwardOnce, SessionState]:
    """The client's signed FORWARD_ONCE, and its one-step session (for the answer)."""
    state = forward_once_state(client=identity.peer_id, server=server, nonce=nonce, model=model, span=span,
                               hidden=hidden)
    signature = identity.sign(request_statement(state, step=0, position=0, input_digest=hidden.digest()))
    return ForwardOnce(nonce=nonce, model=model, span=span, hidden=hidden, signature=signature), state


def check_forward_once(request: ForwardOnce, *, client: bytes, client_public_key: bytes, server: bytes,
                       hidden_size: int) -> SessionState:
    """The server's checks of a FORWARD_ONCE (shape and signature; the output's dtype and
    block size are the input's); returns its one-step session. Raises as ``check_forward``."""
    check_input(request.hidden, wire_dtype=request.hidden.dtype, hidden_size=hidden_size)
    state = forward_once_state(client=client, server=server, nonce=request.nonce, model=request.model,
                               span=request.span, hidden=request.hidden)
    _check_request(state, step=0, position=0, hidden=request.hidden, signature=request.signature,
                   client_public_key=client_public_key, hidden_size=hidden_size)
    return state


def sign_forward_once_result(identity: Identity, state: SessionState, request: ForwardOnce,
                             output: Any) -> ForwardOnceResult:
    """The server's signed FORWARD_ONCE result."""
    history = state.record(SignedStep(step=0, position=0, input=request.hidden,
                                      request_signature=request.signature))
    signature = identity.sign(result_statement(state, step=0, input_digest=request.hidden.digest(),
                                               output_digest=output.digest(), history=history))
    return ForwardOnceResult(hidden=output, signature=signature)


def accept_forward_once_result(state: SessionState, request: ForwardOnce, result: ForwardOnceResult, *,
                               server_public_key: bytes) -> SignedStep:
    """The client's checks of a FORWARD_ONCE result (shape, the server's signature).
    Raises as ``accept_result``."""
    _check_answer_shape(state, request.hidden, result.hidden)
    input_digest = request.hidden.digest()
    check_result_signature(state, step=0, input_digest=input_digest, output=result.hidden,
                           signature=result.signature, history=extend_history(state.history, input_digest),
                           server_public_key=server_public_key)
    step = SignedStep(step=0, position=0, input=request.hidden, request_signature=request.signature,
                      output=result.hidden, result_signature=result.signature)
    state.record(step)
    return step


# -- transcripts (fraud proofs) -------------------------------------------------------------


def replay_requests(state: SessionState, requests: list[ForwardEvidence] | tuple[ForwardEvidence, ...], *,
                    client_public_key: bytes) -> None:
    """Check the client-signed requests of a session in step order, recording each in
    ``state`` (so ``state.history`` ends as the digest the last result was signed over).

    Raises:
        UnexpectedMessage: the steps or positions do not follow the session's rule.
        BadSignature: the client did not sign one of them (``args`` name no step: the
            caller knows it is ``state.next_step``).
    """
    for request in requests:
        _check_request(state, step=request.step, position=request.position, hidden=request.hidden,
                       signature=request.signature, client_public_key=client_public_key, hidden_size=None)
        state.record(SignedStep(step=request.step, position=request.position, input=request.hidden,
                                request_signature=request.signature))


# -- PUSH: one step along the whole chain (spec section 11.4) ----------------------------------


def _push_statement(client: bytes, model: str, request: Push) -> bytes:
    return push_request_statement(client=client, model=model, position=request.position,
                                  input_digest=request.hidden.digest(), timeout=request.timeout,
                                  route=[hop.statement_entry() for hop in request.route])


def sign_push(identity: Identity, states: Sequence[SessionState], addrs: Sequence[Sequence[str]], hidden: Any, *,
              timeout: float, position: int | None = None) -> Push:
    """The client's signed PUSH of ``hidden`` as the next step of every session in
    ``states`` (the chain's hops, in order; ``addrs`` where each hop's server listens),
    at ``position`` (default their common length; below it, a rollback: spec 11.1).

    The states do not move until ``accept_push_result``.

    Raises:
        LocalProtocolError: a session is not this client's, not open, or not at the
            same position as the others, or the hops do not serve one model.
    """
    if not states or len(addrs) != len(states):
        raise LocalProtocolError("a PUSH needs one address list per hop, and at least one hop")
    for state in states:
        if state.client != identity.peer_id:
            raise LocalProtocolError("only the sessions' client signs a PUSH")
        if state.phase is not SessionPhase.OPEN:
            raise LocalProtocolError(f"a session is {state.phase.value}, not OPEN")
        if state.length != states[0].length or state.model != states[0].model:
            raise LocalProtocolError("every hop of a PUSH is at the same position of one model")
    if position is None:
        position = states[0].length
    if not 0 <= position <= states[0].length:
        raise LocalProtocolError(f"a PUSH at position {position} of sessions at {states[0].length} tokens")
    route = tuple(PushHop(peer_id=s.server, session=s.session, step=s.next_step, span=s.span, addrs=tuple(a))
                  for s, a in zip(states, addrs))
    unsigned = Push(route=route, position=position, hidden=hidden, timeout=timeout,
                    authorization=bytes(64))
    signature = identity.sign(_push_statement(identity.peer_id, states[0].model, unsigned))
    return dataclasses.replace(unsigned, authorization=signature)


def push_input(request: Push, index: int | None = None) -> Any:
    """The input of hop ``index`` (default: the receiver): the client's tensor for the
    first hop, the previous hop's output for the others."""
    index = request.index if index is None else index
    return request.outputs[index - 1].hidden if index > 0 else request.hidden


def check_push(state: SessionState, request: Push, *, client_public_key: bytes, sender: bytes,
               sender_public_key: bytes, hidden_size: int) -> int:
    """The receiving hop's checks of a PUSH before any compute; returns its token count.

    ``state`` is the session the route names for this hop (``request.route[index]``),
    ``sender`` the peer the PUSH came from: the client for the first hop, the previous
    hop of the route for the others.

    Raises:
        InvalidRequest: an input is not the session's wire dtype or not ``[1, n, hidden_size]``.
        UnexpectedMessage: the route does not name this hop's session and span, the PUSH
            comes from another peer than the route says, or the session state does not
            allow the step.
        BadSignature: the client did not sign this route, position and input, or the
            previous hop did not sign the output it handed on (as this step's result).
    """
    index = request.index
    hop = request.route[index]
    if hop.session != state.session:
        raise LocalProtocolError("a PUSH for another session")
    if hop.peer_id != state.server or hop.span != state.span:
        raise UnexpectedMessage(f"the route's hop {index} is not this server's session for blocks "
                                f"[{state.span[0]}, {state.span[1]})")
    expected = state.client if index == 0 else request.route[index - 1].peer_id
    if sender != expected:
        raise UnexpectedMessage(f"a PUSH to hop {index} comes from {expected.hex()[:12]}, not {sender.hex()[:12]}")
    hidden = push_input(request)
    n_tokens = check_input(hidden, wire_dtype=state.wire_dtype, hidden_size=hidden_size,
                           blocksize=state.blocksize)
    if index > 0 and tuple(request.hidden.shape) != tuple(hidden.shape):
        raise InvalidRequest(f"the chain's input has shape {list(request.hidden.shape)}, this hop's "
                             f"{list(hidden.shape)}")
    state.check_forward(step=hop.step, position=request.position, n_tokens=n_tokens)
    verify_signature(client_public_key, _push_statement(state.client, state.model, request), request.authorization)
    if index > 0:
        upstream, output = request.route[index - 1], request.outputs[index - 1]
        verify_signature(sender_public_key, forward_result_statement(
            server=upstream.peer_id, session=upstream.session, step=upstream.step, model=state.model,
            span=upstream.span, input_digest=push_input(request, index - 1).digest(),
            output_digest=output.hidden.digest(), history=output.history), output.signature)
    return n_tokens


def sign_push_output(identity: Identity, state: SessionState, request: Push, output: Any) -> HopOutput:
    """The receiving hop's signed output (a forward result statement, as for FORWARD);
    records the step in ``state`` with the client's push authorization as its request
    signature.

    Raises:
        UnexpectedMessage: the state moved since the check.
    """
    hop = request.route[request.index]
    x = push_input(request)
    history = state.record(SignedStep(step=hop.step, position=request.position, input=x,
                                      request_signature=request.authorization))
    signature = identity.sign(result_statement(state, step=hop.step, input_digest=x.digest(),
                                               output_digest=output.digest(), history=history))
    return HopOutput(hidden=output, history=history, signature=signature)


def push_onward(request: Push, output: HopOutput) -> Push | PushResult:
    """What the hop sends next: the PUSH for the next hop, or (from the last hop) the
    PUSH_RESULT for the client."""
    outputs = request.outputs + (output,)
    if len(outputs) < len(request.route):
        return dataclasses.replace(request, outputs=outputs)
    return PushResult(session=request.route[0].session, step=request.route[0].step, outputs=outputs)


def sign_push_failure(identity: Identity, request: Push, *, outputs: Sequence[HopOutput], failed: bytes, code: int,
                      message: str) -> PushResult:
    """A hop's signed report to the client that ``request`` stopped at ``failed``,
    with the outputs it holds (its own included if it computed)."""
    first = request.route[0]
    message = message[:1024]
    signature = identity.sign(push_failure_statement(reporter=identity.peer_id, session=first.session,
                                                     step=first.step, failed=failed, code=code, message=message))
    failure = PushFailure(reporter=identity.peer_id, failed=failed, code=code, message=message, signature=signature)
    return PushResult(session=first.session, step=first.step, outputs=tuple(outputs), failure=failure)


def check_push_failure(result: PushResult, *, reporter_public_key: bytes) -> PushFailure:
    """The failure report of ``result``, once its reporter's signature checks.

    Raises:
        LocalProtocolError: ``result`` reports no failure.
        BadSignature: the reporter did not sign it.
    """
    failure = result.failure
    if failure is None:
        raise LocalProtocolError("the PUSH_RESULT reports no failure")
    verify_signature(reporter_public_key, push_failure_statement(
        reporter=failure.reporter, session=result.session, step=result.step, failed=failure.failed,
        code=failure.code, message=failure.message), failure.signature)
    return failure


@dataclasses.dataclass(frozen=True, slots=True)
class PushOutcome:
    """What a PUSH_RESULT gave the client: the verified steps of the first hops (in
    route order) and, unless every hop's is there, why the next one's is not."""

    steps: tuple[SignedStep, ...]
    error: ProtocolError | None = None

    @property
    def complete(self) -> bool:
        return self.error is None


def accept_push_result(identity: Identity, states: Sequence[SessionState], request: Push, result: PushResult, *,
                       public_keys: Sequence[bytes]) -> PushOutcome:
    """The client's checks of a PUSH_RESULT: every hop's output in route order (its
    shape, the history digest the client holds, the hop's signature). Each verified
    step is recorded in its hop's state; its forward request signature is left for
    ``sign_pushed_requests`` to make when a fraud proof needs it (signing costs, and
    only audited steps need it). Checking stops at the first output that fails or is
    missing.

    Raises:
        UnexpectedMessage: it answers another PUSH.
    """
    first = request.route[0]
    if result.session != first.session or result.step != first.step:
        raise UnexpectedMessage(f"answered PUSH {result.session.hex()}/{result.step}, "
                                f"asked {first.session.hex()}/{first.step}")
    steps: list[SignedStep] = []
    x = request.hidden
    for i, (state, hop) in enumerate(zip(states, request.route)):
        if i >= len(result.outputs):
            reason = result.failure.message if result.failure is not None else "no output"
            return PushOutcome(tuple(steps), UnexpectedMessage(f"the PUSH stopped before hop {i}: {reason}"))
        output = result.outputs[i]
        input_digest = x.digest()
        try:
            _check_answer_shape(state, x, output.hidden)
            history = state.next_history(position=request.position, input_digest=input_digest)
            if output.history != history:
                raise UnexpectedMessage(f"hop {i} signed another history than its session's")
            check_result_signature(state, step=hop.step, input_digest=input_digest, output=output.hidden,
                                   signature=output.signature, history=history, server_public_key=public_keys[i])
        except ProtocolError as exc:
            return PushOutcome(tuple(steps), exc)
        step = SignedStep(step=hop.step, position=request.position, input=x, request_signature=None,
                          output=output.hidden, result_signature=output.signature)
        state.record(step)
        steps.append(step)
        x = output.hidden
    return PushOutcome(tuple(steps))


def sign_pushed_requests(identity: Identity, state: SessionState) -> None:
    """Sign, as the session's client, the forward request statement of every pushed
    step of ``state``'s transcript that has none yet (its input came from the previous
    hop, which signed it as its output): afterwards the transcript is that of FORWARD
    steps, as audits and fraud proofs (spec section 13) take it.

    Raises:
        LocalProtocolError: ``identity`` is not the session's client.
    """
    if identity.peer_id != state.client:
        raise LocalProtocolError("only the session's client signs its requests")
    for k, step in enumerate(state.transcript):
        if step.request_signature is None:
            signature = identity.sign(request_statement(state, step=step.step, position=step.position,
                                                        input_digest=step.input.digest()))
            state.transcript[k] = dataclasses.replace(step, request_signature=signature)
