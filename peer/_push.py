"""The client's side of server-to-server push (spec/SPEC.md section 11.4).

Theory of operation. In push mode a step costs one trip around the chain: the client
signs one PUSH for every hop of its chain (``protocol.sign_push``) and sends it to the
first hop; each hop computes and hands its signed output straight to the next hop;
the last hop sends every hop's signed output to the client in a PUSH_RESULT, a request
the server makes on the connection the client opened to it. ``PushInbox`` is the one
handler of PUSH_RESULT on the client's host: it matches a result to the step waiting
for it (by the first hop's session and step) and takes it only from a peer of that
step's route (the last hop, or for a failure report the hop that signed it).

``push_step`` then checks every output in route order (``protocol.accept_push_result``),
which records each verified step in its hop's session state exactly as a star step
would be recorded. Whatever did not arrive verified (a hop failed, refused its input,
could not reach the next hop, or nothing came back within the deadline) the chain
finishes in star mode from the first unverified hop, where the usual failure handling
applies: a hop that advanced without its output reaching the client answers
BAD_STATE and is replaced with its history replayed, so tokens stay identical. A pair
of hops that could not push to each other is remembered and the chain relays in star
mode from then on (the fallback, and the mode for hops that cannot reach each other).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import trio

from protocol import (
    Push,
    Pushed,
    PushResult,
    PushResultAck,
    accept_push_result,
    check_push_failure,
    decode_tensor,
    encode_tensor,
    sign_push,
)
from protocol.errors import ErrorCode, RemoteError, SwarmError, UnexpectedMessage
from swarm.errors import RequestTimeout
from swarm.transport import Host, PeerConnection

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["PushInbox", "push_step"]

log = logging.getLogger("swarm.client")

_INBOXES: weakref.WeakKeyDictionary[Host, PushInbox] = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class _Waiting:
    """A push step waiting for its PUSH_RESULT."""

    request: Push
    peers: frozenset[bytes]
    last: bytes
    done: trio.Event = field(default_factory=trio.Event)
    result: tuple[PeerConnection, PushResult] | None = None
    error: SwarmError | None = None

    def finish(self, *, result: tuple[PeerConnection, PushResult] | None = None,
               error: SwarmError | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class PushInbox:
    """Receives the PUSH_RESULTs sent to this client's host (one inbox per host)."""

    def __init__(self, host: Host) -> None:
        self._waiting: dict[tuple[bytes, int], _Waiting] = {}
        host.add_handler(PushResult, self._receive)

    @classmethod
    def of(cls, host: Host) -> PushInbox:
        """The host's inbox (registered as its PUSH_RESULT handler on first use)."""
        inbox = _INBOXES.get(host)
        if inbox is None:
            inbox = _INBOXES[host] = cls(host)
        return inbox

    def expect(self, request: Push) -> _Waiting:
        first = request.route[0]
        waiting = _Waiting(request=request, peers=frozenset(h.peer_id for h in request.route),
                           last=request.route[-1].peer_id)
        self._waiting[(first.session, first.step)] = waiting
        return waiting

    def forget(self, waiting: _Waiting) -> None:
        first = waiting.request.route[0]
        if self._waiting.get((first.session, first.step)) is waiting:
            del self._waiting[(first.session, first.step)]

    async def _receive(self, conn: PeerConnection, msg: PushResult) -> PushResultAck:
        waiting = self._waiting.get((msg.session, msg.step))
        if waiting is None or conn.peer_id not in waiting.peers:
            raise RemoteError("no push step of this client waits for that result", code=ErrorCode.UNKNOWN_SESSION)
        if msg.failure is None and conn.peer_id != waiting.last:
            raise UnexpectedMessage("only the route's last hop sends a complete PUSH_RESULT")
        if msg.failure is not None:
            if msg.failure.reporter != conn.peer_id:
                raise UnexpectedMessage("a push failure is reported by the hop that signed it")
            check_push_failure(msg, reporter_public_key=conn.public_key)  # BadSignature: answered, not taken
        waiting.finish(result=(conn, msg))
        return PushResultAck()


async def _send_first(conn: PeerConnection, request: Push, timeout: float, waiting: _Waiting) -> None:
    try:
        answer = await conn.request(request, timeout=timeout)
    except SwarmError as exc:
        waiting.finish(error=exc)
        return
    if isinstance(answer, Pushed):  # the last hop delivers before the acknowledgements come back
        waiting.finish(error=UnexpectedMessage("the chain acknowledged the PUSH without a result"))


async def push_step(chain: Chain, hidden: torch.Tensor, position: int) -> tuple[int, torch.Tensor]:
    """One step of ``hidden`` through ``chain``'s hops by push; returns how many hops
    (from the first) have this step verified and recorded, and the last verified
    output (``hidden`` if none): the chain relays the rest in star mode."""
    records = list(chain.hops)
    tokens = hidden.shape[1]
    wire = encode_tensor(hidden, chain.wire_dtype)
    per_hop = max(chain._step_timeout(r, tokens=tokens) for r in records)
    deadline = per_hop * (len(records) + 1)
    request = sign_push(chain.host.identity, [r.state for r in records], [r.hop.addrs for r in records], wire,
                        timeout=per_hop, position=position)
    inbox = PushInbox.of(chain.host)
    waiting = inbox.expect(request)
    t0 = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_first, records[0].conn, request, deadline, waiting)
            with trio.move_on_after(deadline):
                await waiting.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        inbox.forget(waiting)
    seconds = time.perf_counter() - t0
    if waiting.result is None:
        error = waiting.error or RequestTimeout("PUSH", records[0].conn.address, deadline,
                                                peer_id=records[0].hop.peer_id)
        log.info("push step at %d got no result (%s); relaying it in star mode", position, error)
        return 0, hidden
    _, result = waiting.result
    outcome = accept_push_result(chain.host.identity, [r.state for r in records], request, result,
                                 public_keys=[r.conn.public_key for r in records])
    now = trio.current_time()
    share = seconds / len(records)
    for record, step in zip(records, outcome.steps):
        record.latency += share
        chain.health.observe_step(record.hop.peer_id, now, seconds=share, blocks=record.state.blocks, tokens=tokens)
        if chain.credit is not None:
            chain.credit.received(record.conn, tokens * record.state.blocks)
    done = len(outcome.steps)
    if not outcome.complete:
        failure = result.failure
        if failure is not None:
            log.info("push step at %d stopped after %d of %d hops: %s reports %s: %s", position, done,
                     len(records), failure.reporter.hex()[:12], failure.failed.hex()[:12], failure.message)
            chain.push_broken.add(frozenset((failure.reporter, failure.failed)))
        else:
            log.info("push step at %d: %s", position, outcome.error)
    if done == 0:
        return 0, hidden
    return done, decode_tensor(outcome.steps[-1].output, out_dtype=hidden.dtype)
