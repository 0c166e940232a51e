"""Hedging for ``peer._chain.Chain``: a slow open or step raced against a route around it.

Theory of operation. ``hedged(chain, hop, delay, primary=..., hedge=...)`` runs
``primary(hop, records)``; if it has not answered after ``delay`` seconds (the
client's ``PeerHealth`` derives it from what it measured of the hop), it asks the
chain's ``alternative`` for a route of the hop's blocks around the hop and every peer
the generation avoids, and runs ``hedge(route, records)`` on it at the same time, in
the client's background nursery (``chain.spawn``). The first side to answer wins.

Each side is an ``Attempt``: what it opened is handed over while it is ``wanted``,
and closed by the attempt itself once it is not, so the loser of a race never leaves
a session behind, even if it answers after the race was decided. The primary's
failure is recorded against its peer once it was let go; a hedge records its hops'
failures itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ProtocolError, RemoteError
from swarm.errors import PeerUnreachable, RequestTimeout
from swarm.planning import Hop, Route

if TYPE_CHECKING:
    from ._chain import Chain, HopRecord

__all__ = ["Attempt", "HOP_FAILURES", "hedged", "patient_request"]

log = logging.getLogger("swarm.client")

#: Failures that make the client route around a hop (anything else is a bug or a cancel).
HOP_FAILURES = (PeerUnreachable, RequestTimeout, RemoteError, ProtocolError)


@dataclass(slots=True)
class Attempt:
    """A hedge that may outlive the wait for it: what it opened is handed over while it
    is ``wanted``, and closed by the attempt itself once it is not."""

    records: list[HopRecord] = field(default_factory=list)
    result: Any = None
    error: BaseException | None = None
    wanted: bool = True
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def ok(self) -> bool:
        return self.done.is_set() and self.error is None



async def hedged(chain: Chain, hop: Hop, delay: float, *, primary: Callable[[Hop, list[HopRecord]], Awaitable[Any]],
                  hedge: Callable[[Route, list[HopRecord]], Awaitable[Any]], detach_primary: bool) -> Attempt:
    """Run ``primary(hop, records)``; if it has not answered after ``delay`` seconds,
    run ``hedge(alternative, records)`` on another route for ``hop``'s blocks (one
    hop or several) at the same time, in the background nursery; ``hedge`` remembers
    the failures of its hops itself. Returns the attempt that answered
    first; the other is let go (it closes what it opens). ``detach_primary`` runs the
    primary in the background too (an open: cancelling it could leave a session
    the server opened and we never heard of). Raises the primary's failure when
    neither answered."""
    first = Attempt()
    if chain.spawn is None or chain.alternative is None:
        first.result = await primary(hop, first.records)
        return first
    second: Attempt | None = None
    winner: Attempt | None = None
    try:
        async with trio.open_nursery() as local:
            start = chain.spawn if detach_primary else local.start_soon
            start(_run_attempt, chain, first, hop, primary, hop.peer_id)
            with trio.move_on_after(delay):
                await first.done.wait()
            if not first.done.is_set():
                alt = await chain.alternative(hop.start, hop.end, frozenset(chain._avoid() | {hop.peer_id}))
                if alt is not None and not first.done.is_set():
                    chain.hedges += 1
                    log.info("hop %s [%d, %d) slow after %.2f s: hedging with %s", hop.peer_id.hex()[:12],
                             *hop.span, delay, " + ".join(h.peer_id.hex()[:12] for h in alt.hops))
                    second = Attempt()
                    chain.spawn(_run_attempt, chain, second, alt, hedge, None)
                    hedge_attempt = second
                    await _wait_until(lambda: first.ok or hedge_attempt.ok or (
                        first.done.is_set() and hedge_attempt.done.is_set()), first.done, second.done)
            if second is not None and second.ok and not first.ok:
                local.cancel_scope.cancel()  # the hedge won: stop waiting on the slow hop
            else:
                await first.done.wait()
        winner = first if first.ok else second if second is not None and second.ok else None
    finally:
        for attempt in (first, second):
            if attempt is not None and attempt is not winner:
                await _let_go(chain, attempt)
    if winner is None:
        assert first.error is not None
        raise first.error
    if winner is second:
        chain.hedges_won += 1
    return winner

async def patient_request(chain: Chain, record: HopRecord, request: Any, *, deadline: float) -> Any:
    """``record.conn.request(request)`` under the derived ``deadline``, which is only a
    guess from what was measured of the hop: once it passes, the step is given up (a
    ``RequestTimeout``, failed over by the caller) only if another route of the hop's
    blocks exists (``chain.alternative``); otherwise failing over could only end the
    generation, and the step waits on, up to ``chain.step_timeout``: a loaded lone
    holder's slow answer beats none."""
    cap = chain.step_timeout
    if deadline >= cap or chain.alternative is None:
        return await record.conn.request(request, timeout=deadline)
    alternative = chain.alternative
    patient = trio.CancelScope()

    async def give_up_if_replaceable() -> None:
        await trio.sleep(deadline)
        if await alternative(*record.span, frozenset(chain._avoid() | {record.hop.peer_id})) is not None:
            patient.cancel()
        else:
            log.info("hop %s [%d, %d) slower than %.2f s and nobody else serves it: waiting up to %.0f s",
                     record.hop.peer_id.hex()[:12], *record.span, deadline, cap)

    result: Any = None
    error: Exception | None = None  # raised as it is, not in the nursery's exception group
    async with trio.open_nursery() as nursery:
        nursery.start_soon(give_up_if_replaceable)
        with patient:
            try:
                result = await record.conn.request(request, timeout=cap)
            except Exception as exc:
                error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if patient.cancelled_caught:
        raise RequestTimeout(type(request).__name__, record.conn.address, deadline, peer_id=record.hop.peer_id)
    return result


async def _run_attempt(chain: Chain, attempt: Attempt, target: Any,
                       fn: Callable[[Any, list[HopRecord]], Awaitable[Any]], primary: bytes | None) -> None:
    """One side of a race: ``fn(target, records)``. It never leaves a session behind:
    on failure it closes what it opened, and once let go (``wanted`` false) so does
    whichever side sees it last. ``primary``: the peer of the primary side, whose
    failure is recorded here once it was let go (nobody else will); a hedge records
    its hops' failures itself."""
    try:
        attempt.result = await fn(target, attempt.records)
    except HOP_FAILURES as exc:
        attempt.error = exc
        attempt.done.set()
        if primary is not None and not attempt.wanted:
            chain._hop_failed(primary, exc)
        await chain._close_records(attempt.records)
        return
    except BaseException as exc:  # cancelled
        attempt.error = exc
        attempt.done.set()
        await chain._close_records(attempt.records)
        raise
    attempt.done.set()  # no checkpoint between this and the check: _let_go sees one or the other
    if not attempt.wanted:  # the race was decided (or abandoned) before this answered
        await chain._close_records(attempt.records)

async def _let_go(chain: Chain, attempt: Attempt) -> None:
    attempt.wanted = False
    if attempt.ok:  # it answered, but lost: its sessions are ours to close
        await chain._close_records(attempt.records)

async def _wait_until(done: Callable[[], bool], *events: trio.Event) -> None:
    """Return once ``done()`` holds, re-checking whenever one of ``events`` fires."""
    while not done():
        pending = [e for e in events if not e.is_set()]
        if not pending:
            return
        async with trio.open_nursery() as nursery:
            for event in pending:
                nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

