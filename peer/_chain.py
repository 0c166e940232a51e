"""An open relay chain for one generation: sessions on hops that cover [0, L).

Theory of operation. ``Chain.open(route)`` opens a session on every hop of the route
at once; ``Chain.step(hidden)`` sends the hidden states of the new tokens through
every hop in order. Each step is the protocol's forward exchange
(``protocol.sign_forward`` / ``accept_result``) on the hop's ``SessionState``, which
keeps the session's signed transcript and history digest exactly as the server keeps
them: the chain verifies every output's signature before using it (a bad one is a
failure of that hop).

Failover is the same at every stage. When a hop fails (connection lost, timeout,
ERROR of any code, bad signature, malformed answer), whether while opening, stepping
or replaying, the chain tells the client's ``PeerHealth`` (failure memory with
backoff, honouring the ``retry_after`` the server asked for), closes what it had
opened there, asks ``replan`` for a route of that hop's blocks around every failed
and backed-off peer, opens it, replays the hop's whole history to the replacement as
one prefill step, and carries on with the step that failed. Because the replacement
recomputes what the failed hop had computed, generation continues with the same
tokens (up to float rounding between a batched prefill and step-by-step decode). Only
``AllCandidatesFailed`` (or ``NoRoute`` from the first plan) names the blocks that
could not be served; raw transport errors never leave the chain.

Deadlines derive from measurements (``PeerHealth.step_timeout``: the hop's RTT and
measured compute, with a floor, at most ``step_timeout``). A slow open or step is
hedged (``peer._hedge``): after ``PeerHealth.hedge_delay`` another route for the same blocks is
tried at the same time and the first to answer wins. A hedge runs in the client's
background nursery (``spawn``), so whatever it opened after losing is closed there
rather than leaked; without ``spawn`` nothing is hedged.

Every path closes what it opened: a hop opened before another hop's open failed, a
replacement that failed during replay, the loser of a hedge, and every session when
the generation ends or is cancelled (``aclose``, bounded in time).

Audits (``_audit_step``, spec 13.2): a hop-step drawn for an audit is checked before
its output is used, under the step's deadline. An output the audit did not confirm (the hop convicted, outvoted,
or a dispute nobody could settle) is never used: the hop is replaced like a failed
one, without the peers the audit found on the losing side, the disputed step is
redone there, and the hop's earlier, unaudited outputs are compared with the
replacement's replay of the same inputs (a divergence rolls the generation back).
Every later step of that span is audited. Only when no other holder can take the
span is the disputed output kept, and then counted as unverifiable, as is a step no
independent peer could check (``Verification``: the client reports both). Nor is a hop
replaced whose side of a vote outweighs every disagreeing voter together (an
established peer disputed only by fresh identities, ``AuditResult.stands``): the redo
could only go to the lighter side, so the output is kept, counted as unverifiable,
and the lighter side is avoided.

With ``relay="push"`` a step goes around the chain once (``peer._push``): the hops
hand their outputs on to each other and the client verifies every hop's signed
output when the last hop returns them; whatever did not come back verified is
finished here in star mode, with the failover above. A pushed step's outputs were
used by the next hops before any audit, so they are audited before the client samples
from them, and a conviction rolls the generation back to the step (spec 13.2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import torch
import trio

from protocol import (
    CloseSession,
    ForwardResult,
    OpenSession,
    SessionOpened,
    SessionPhase,
    SessionState,
    SignedStep,
    accept_result,
    decode_tensor,
    encode_tensor,
    kept_rows,
    sign_forward,
    sign_pushed_requests,
)
from protocol.errors import LocalProtocolError, RemoteError, SwarmError, swarm_error_in
from swarm.errors import NoRoute, PeerUnreachable, RequestTimeout
from swarm.health import PeerHealth, TimeoutPolicy
from swarm.planning import Hop, Route
from swarm.transport import Host, PeerConnection

from ._hedge import HOP_FAILURES, hedged, patient_request
from ._push import PushInbox, push_step
from .credit import CreditService

if TYPE_CHECKING:
    from verify import Auditor, AuditResult

__all__ = ["Chain", "HopRecord", "AllCandidatesFailed", "CheatDetected", "RollbackRequired", "Verification",
           "HOP_FAILURES"]

log = logging.getLogger("swarm.client")

#: Seconds ``aclose`` may take in all (receipts and CLOSE_SESSION to every hop at once).
CLOSE_TIMEOUT = 2.0
#: Seconds a close of a failed hop may wait (the request is written at once; a hung
#: peer closes the session when it wakes, a dead one never had it).
FAILED_CLOSE_TIMEOUT = 0.2

Spawn = Callable[..., None]


class CheatDetected(SwarmError):
    """An audit did not confirm a hop's output (convicted, outvoted or disputed); the
    chain replaces the hop and redoes the step."""


class RollbackRequired(SwarmError):
    """A convicted hop's earlier, unaudited outputs were wrong from ``position`` on:
    every token sampled after that position must be recomputed (spec "Verification",
    "Rollback"). Raised by ``Chain.step``; the client rebuilds the chain."""

    def __init__(self, position: int) -> None:
        super().__init__(f"outputs were wrong from position {position}; rolling back")
        self.position = position


class AllCandidatesFailed(SwarmError):
    """Every server that could take a span failed; the message says which blocks."""

    def __init__(self, start: int, end: int, attempts: int, last: BaseException | None) -> None:
        super().__init__(f"all candidates for blocks {start}..{end - 1} failed after {attempts} attempts "
                         f"(last: {last}); try again later or add servers for these blocks")
        self.start = start
        self.end = end
        self.attempts = attempts


@dataclass(slots=True)
class Verification:
    """What the audits of one generation established (spec 13.2, "Reporting").

    ``audited`` counts audited hop-steps whose output was used; of those, ``verified``
    were confirmed by an independent check and the rest were not checkable (no other
    holder answered, or a dispute no other holder could settle): ``unverifiable``
    maps (peer id, start, end) of such hops to how many of their steps.
    """

    hop_steps: int = 0  # every hop-step whose output was used
    audited: int = 0
    verified: int = 0
    unverifiable: dict[tuple[bytes, int, int], int] = field(default_factory=dict)
    addresses: dict[bytes, str] = field(default_factory=dict)  # of the unverifiable hops

    @property
    def verified_fraction(self) -> float | None:
        """Share of audited hop-steps an independent check confirmed (None: no audits)."""
        return self.verified / self.audited if self.audited else None

    def used(self, record: HopRecord, result: AuditResult | None) -> None:
        """``record``'s last step output is used, after ``result`` (None: not audited)."""
        self.hop_steps += 1
        if result is None:
            return
        self.audited += 1
        if result.verified:
            self.verified += 1
        else:
            key = (record.hop.peer_id, *record.span)
            self.unverifiable[key] = self.unverifiable.get(key, 0) + 1
            self.addresses[record.hop.peer_id] = record.conn.address


@dataclass(slots=True)
class HopRecord:
    """A hop's open session: the connection, and the session as the protocol keeps it
    (its signed transcript and history digest; the server keeps the same)."""

    hop: Hop
    conn: PeerConnection
    state: SessionState
    latency: float = 0.0  # seconds spent waiting on this hop in total

    @property
    def session(self) -> bytes:
        return self.state.session

    @property
    def span(self) -> tuple[int, int]:
        return self.hop.span

    @property
    def transcript(self) -> list[SignedStep]:
        return self.state.transcript

    @property
    def length(self) -> int:
        return self.state.length


class Replan(Protocol):
    """``Chain``'s ``replan``: a route for blocks ``[start, end)`` avoiding ``exclude``;
    with ``ignore_backoff``, one that may use backed-off peers."""

    def __call__(self, start: int, end: int, exclude: frozenset[bytes], /, *,
                 ignore_backoff: bool = False) -> Awaitable[Route]: ...


class Chain:
    """Sessions on a route; see the module docstring.

    Args:
        host: the client's transport.
        model: model id every hop must serve.
        max_length: tokens each session must hold (prompt + new tokens).
        replan: ``await replan(start, end, exclude)`` returns a route for blocks
            [start, end) avoiding the peer ids in ``exclude`` and every backed-off peer
            (raises NoRoute if none); ``replan(..., ignore_backoff=True)``: backed-off
            peers may be on it (a disputed hop's last resort).
        wire_dtype: dtype of hidden states on the wire.
        step_timeout: the longest any one request may take (derived deadlines are shorter).
        max_failovers: hop replacements allowed per generation before giving up.
        health: the client's failure memory and measurements (shared by its chains).
        alternative: ``await alternative(start, end, exclude)`` -> a route (one hop or
            several) covering [start, end) to hedge with, or None.
        spawn: starts a task in the client's background nursery (hedges run there).
        relay: ``"star"`` (the client sends each hop its input) or ``"push"`` (each hop
            hands its output to the next, spec 11.4; star for what push could not do).
    """

    def __init__(self, host: Host, *, model: str, max_length: int,
                 replan: Replan,
                 wire_dtype: str = "f32", step_timeout: float = 60.0, max_failovers: int = 8,
                 on_failover: Callable[[Hop, BaseException], None] | None = None,
                 credit: CreditService | None = None, auditor: Auditor | None = None,
                 health: PeerHealth | None = None,
                 alternative: Callable[[int, int, frozenset[bytes]], Awaitable[Route | None]] | None = None,
                 spawn: Spawn | None = None, relay: str = "star") -> None:
        if relay not in ("star", "push"):
            raise ValueError(f"relay is 'star' or 'push', not {relay!r}")
        self.host = host
        self.model = model
        self.max_length = max_length
        self.replan = replan
        self.wire_dtype = wire_dtype
        self.step_timeout = step_timeout
        self.max_failovers = max_failovers
        self.on_failover = on_failover
        self.credit = credit
        self.auditor = auditor
        self.health = health if health is not None else PeerHealth(timeouts=TimeoutPolicy(cap=step_timeout))
        self.alternative = alternative
        self.spawn = spawn
        self.hops: list[HopRecord] = []
        self.failed: set[bytes] = set()  # peers that failed in this generation (never retried in it)
        self.failovers = 0
        self.verification = Verification()
        self.disputed: set[tuple[int, int]] = set()  # spans audited at every step from now on
        self.unredoable: set[tuple[int, int]] = set()  # disputed spans no other holder could take
        self.hedges = 0  # hedged requests started
        self.hedges_won = 0
        self._replayed: torch.Tensor | None = None  # the last failover's replay output
        self.relay = relay
        self.push_broken: set[frozenset[bytes]] = set()  # hop pairs that could not push to each other
        self.pushed_steps = 0  # steps that went around the chain by push, every hop verified
        if relay == "push":
            PushInbox.of(host)  # the PUSH_RESULT handler, before any server may send one

    # -- the public surface -----------------------------------------------------------------

    async def open(self, route: Route) -> None:
        """Open sessions on every hop of ``route`` at once, failing over per hop.

        Raises:
            AllCandidatesFailed: some blocks could not be opened anywhere; every session
                opened meanwhile is closed.
        """
        self.hops = await self._open_route(route)

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run ``hidden`` ([1, n, hidden]) for positions ``position..`` through every hop.
        A ``position`` below the sessions' length rolls them back there first (the
        rejected draft tokens of speculative decoding: spec 11.1)."""
        x = hidden
        i = 0
        if self._can_push() and len({r.length for r in self.hops}) == 1:
            for record in self.hops:
                if record.length < position:
                    raise LocalProtocolError(f"hop session at {record.length} tokens, asked to step at {position}")
            i, x = await push_step(self, hidden, position)
            self.pushed_steps += i == len(self.hops)
            for j in range(i):
                if not await self._audit_step(j, self.hops[j], position):  # the next hops used the dispute
                    raise RollbackRequired(position)
        while i < len(self.hops):
            record = self.hops[i]
            if record.length < position:
                raise LocalProtocolError(f"hop session at {record.length} tokens, asked to step at {position}")
            try:
                out = await self._forward_hedged(i, x, position)
            except HOP_FAILURES as exc:
                await self._fail_over(i, exc)
                continue
            if out is None:
                continue  # a hedge replaced the slow hop: the step goes to the replacement
            if not await self._audit_step(i, record, position):
                continue  # the hop was replaced: the disputed step is redone there
            x = out
            i += 1
        return x

    async def aclose(self) -> None:
        """Close every session: receipts and CLOSE_SESSION to all hops at once, within
        ``CLOSE_TIMEOUT`` (the servers also drop sessions when the connection ends)."""
        hops, self.hops = self.hops, []
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for record in hops:
                    nursery.start_soon(self._close_one, record)

    def _can_push(self) -> bool:
        if self.relay != "push" or len(self.hops) < 2:
            return False
        peers = [r.hop.peer_id for r in self.hops]
        return not any(a == b or frozenset((a, b)) in self.push_broken for a, b in zip(peers, peers[1:]))

    # -- the audit path (spec 13.2) -----------------------------------------------------------

    async def _audit_step(self, index: int, record: HopRecord, position: int) -> bool:
        """Audit ``record``'s last step if it is drawn (or its span is disputed), within
        the step's deadline. Returns whether its output may be used; False: the hop was
        replaced, redo the step."""
        auditor = self.auditor
        if auditor is None or not (record.span in self.disputed or auditor.should_audit(record.hop.peer_id)):
            self.verification.used(record, None)
            return True
        if self.relay == "push":  # a proof takes client-signed requests, pushed steps included
            sign_pushed_requests(self.host.identity, record.state)
        # A recomputation replays the whole prefix: its deadline is the step's for that
        # many tokens; the audit as a whole (a quorum of voters, then perhaps the rest)
        # gets that once per voter it may ask, and one more.
        per_request = self._step_timeout(record, tokens=record.length)
        reputation = auditor.reputation
        now = time.time()
        timeouts_before = {p: s.timeouts for p, s in reputation.standings.items()}
        result = None
        with trio.move_on_after((auditor.policy.max_voters + 1) * per_request):
            result = await auditor.audit(
                model=self.model, span=record.span, hop_peer=record.hop.peer_id,
                hop_public_key=record.conn.public_key, hop_addrs=record.hop.addrs, session=record.session,
                transcript=record.transcript, index=len(record.transcript) - 1, timeout=per_request)
        # An auditor that did not answer is backed off client-wide, but not struck off
        # this generation's holders: a whole-prefix recomputation under a deadline taken
        # from another peer's speed says little about how it serves a step, and a
        # disputed hop may need it as its replacement (``_replan``).
        for peer in list(reputation.standings):
            if reputation.standing(peer, now).timeouts > timeouts_before.get(peer, 0.0) + 0.5:
                backoff = self.health.failed(peer, trio.current_time(), reason="audit recomputation timed out")
                log.info("auditor %s backed off for %.1f s: no answer within %.1f s", peer.hex()[:12], backoff,
                         per_request)
        if result is None:
            log.info("audit of %s ran past its deadline; its output is used unaudited", record.hop.peer_id.hex()[:12])
            self.verification.used(record, None)
            return True
        if result.stands:  # disputed only by lighter voters: kept, unverified, and watched
            self.disputed.add(record.span)
            self.failed.update(result.avoid)
        if not result.redo:
            self.verification.used(record, result)
            return True
        self.disputed.add(record.span)
        self.failed.update(result.avoid)
        if record.span not in self.unredoable or result.hop_cheated:
            try:
                await self._replace_disputed(index, record, position, result)
                return False
            except AllCandidatesFailed:
                if result.hop_cheated:
                    raise
                self.unredoable.add(record.span)
                log.warning("no other holder can redo the disputed steps of blocks %d:%d; keeping %s's outputs, "
                            "reported as unverified", *record.span, record.hop.peer_id.hex()[:12])
        # Nobody else can take the span: the output stands, reported as unverified.
        self.verification.used(record, result)
        return True

    async def _replace_disputed(self, index: int, suspect: HopRecord, position: int, result: AuditResult) -> None:
        """Fail over a hop whose output an audit did not confirm, then check its earlier
        (unaudited) outputs against the replacement's replay of the same inputs: if they
        diverge before ``position``, tokens already sampled from them are wrong and the
        generation must roll back."""
        earlier = suspect.transcript[:-1]  # the last step is the disputed one: redone, not replayed
        cut = suspect.transcript[-1].position  # where the disputed step starts (it may have rolled back)
        why = {"cheat": "was convicted by an audit", "outvoted": "was outvoted in an audit"}.get(
            result.outcome.value, "gave an output an audit could not confirm")
        await self._fail_over(index, CheatDetected(f"{suspect.hop.peer_id.hex()[:12]} {why}"), replay=earlier,
                              replay_length=cut, dispute=True)
        replay = self._replayed
        claimed = kept_prefix(earlier, cut, outputs=True)
        if replay is None or claimed is None:
            return
        from verify import first_mismatch, tolerance_for

        tolerance = tolerance_for(self.auditor.policy.compute_dtype if self.auditor else "f32", self.wire_dtype)
        row = first_mismatch(claimed, replay.to(torch.float32), tolerance=tolerance,
                             depth=suspect.span[1] - suspect.span[0])
        if row is not None:
            raise RollbackRequired(row)

    # -- opening --------------------------------------------------------------------------------

    async def _open_route(self, route: Route, *, fail_over: bool = True) -> list[HopRecord]:
        """Sessions on every hop of ``route``, opened concurrently, each failing over on
        its own (without ``fail_over``: a hedge's route, where any failure ends the
        attempt); on any failure (or cancellation) every session opened here is closed."""
        slots: list[list[HopRecord]] = [[] for _ in route.hops]
        opener = self._open_slot if fail_over else self._open_blamed
        try:
            async with trio.open_nursery() as nursery:
                for hop, slot in zip(route.hops, slots):
                    nursery.start_soon(opener, hop, slot)
        except BaseException as exc:
            await self._close_records([r for slot in slots for r in slot])
            error = swarm_error_in(exc)
            if error is not None and error is not exc:
                raise error from None  # one typed error, not trio's group
            raise
        return [r for slot in slots for r in slot]

    async def _open_slot(self, hop: Hop, out: list[HopRecord]) -> None:
        """Open ``hop``'s blocks: on the hop, or, failing over like a step does, on a
        route of its blocks around every failed and backed-off peer."""
        last: BaseException | None = None
        while True:
            try:
                out.extend(await self._open_hedged(hop))
                return
            except HOP_FAILURES as exc:
                last = exc
                self._hop_failed(hop.peer_id, exc)
            self._count_failover(hop.span, last)
            route = await self._replan(hop.span, last)
            if len(route.hops) > 1:  # the blocks now take several hops: each fails over alone
                out.extend(await self._open_route(route))
                return
            hop = route.hops[0]

    async def _open_hop(self, hop: Hop) -> HopRecord:
        timeout = self.health.open_timeout(hop.peer_id, cap=self.step_timeout)
        conn = await self._connect(hop, timeout)
        try:
            opened = cast(SessionOpened, await conn.request(OpenSession(model=self.model, span=hop.span, max_length=self.max_length,
                                                    wire_dtype=self.wire_dtype), timeout=timeout))
        except RequestTimeout:
            # A hung (say SIGSTOPped) server opens the session when it wakes and would hold
            # it as long as this connection lives; dropping the connection frees it then.
            with trio.CancelScope(shield=True):
                await conn.aclose()
            raise
        state = SessionState(client=self.host.peer_id, server=conn.peer_id, session=opened.session, model=self.model,
                             span=hop.span, max_length=self.max_length, wire_dtype=self.wire_dtype)
        state.open()
        self.health.alive(hop.peer_id, trio.current_time())
        return HopRecord(hop=hop, conn=conn, state=state)

    async def _open_into(self, hop: Hop, records: list[HopRecord]) -> None:
        records.append(await self._open_hop(hop))

    async def _open_blamed(self, hop: Hop, records: list[HopRecord]) -> None:
        """``_open_into`` that remembers the hop's failure (a hedge's hop)."""
        try:
            records.append(await self._open_hop(hop))
        except HOP_FAILURES as exc:
            self._hop_failed(hop.peer_id, exc)
            raise

    async def _open_alternative(self, route: Route, records: list[HopRecord]) -> None:
        records.extend(await self._open_route(route, fail_over=False))

    async def _open_hedged(self, hop: Hop) -> list[HopRecord]:
        """``_open_hop``, raced against another route for its blocks if it is slow. When
        hedging, the open itself runs in the background nursery: if it loses, or answers
        after the chain gave up, it closes the session it got."""
        winner = await hedged(self, hop, self.health.open_hedge_delay(hop.peer_id), primary=self._open_into,
                                    hedge=self._open_alternative, detach_primary=True)
        return winner.records

    async def _connect(self, hop: Hop, timeout: float) -> PeerConnection:
        last: BaseException | None = None
        for addr in hop.addrs:
            try:
                return await self.host.connect(addr, peer_id=hop.peer_id, timeout=timeout)
            except PeerUnreachable as exc:
                last = exc
        raise PeerUnreachable(",".join(hop.addrs) or "?", f"no address answered ({last})", peer_id=hop.peer_id)

    # -- stepping ---------------------------------------------------------------------------------

    async def _forward(self, record: HopRecord, x: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """One step of ``x`` on the hop at ``position`` (default: where its session is;
        below that, a rollback)."""
        wire = encode_tensor(x, self.wire_dtype)
        request = sign_forward(self.host.identity, record.state, wire, position=position)
        t0 = time.perf_counter()
        result = cast(ForwardResult, await patient_request(self, record, request,
                                                           deadline=self._step_timeout(record, tokens=x.shape[1])))
        seconds = time.perf_counter() - t0
        record.latency += seconds
        accept_result(record.state, request, result, server_public_key=record.conn.public_key)
        self.health.observe_step(record.hop.peer_id, trio.current_time(), seconds=seconds,
                                 blocks=record.state.blocks, tokens=x.shape[1])
        if self.credit is not None:
            self.credit.received(record.conn, wire.shape[1] * record.state.blocks)
        return decode_tensor(result.hidden, out_dtype=x.dtype)

    async def _forward_hedged(self, index: int, x: torch.Tensor, position: int) -> torch.Tensor | None:
        """``_forward`` on hop ``index``; if it is slow, a replacement route for its blocks
        (one hop or several) is opened and the hop's kept history replayed to it, as a
        failover does. If that is ready before the hop answers, it takes the hop's place
        and None is returned: the step is to be sent there (the normal path, audits
        included)."""
        record = self.hops[index]
        delay = self.health.hedge_delay(record.hop.peer_id, blocks=record.state.blocks, tokens=x.shape[1])
        if delay is None or self.spawn is None or self.alternative is None:
            return await self._forward(record, x, position)
        # The history is decoded only if the hedge starts (it is every step's input so
        # far: decoding it on every step made a generation quadratic in its length).
        kept = len(record.transcript)

        async def primary(hop: Hop, records: list[HopRecord]) -> torch.Tensor:
            return await self._forward(record, x, position)

        async def hedge(route: Route, records: list[HopRecord]) -> None:
            prefix = kept_prefix(record.transcript[:kept], position)
            records.extend(await self._open_route(route, fail_over=False))
            await self._replay(records, prefix)

        winner = await hedged(self, record.hop, delay, primary=primary, hedge=hedge, detach_primary=False)
        if not winner.records:
            return cast(torch.Tensor, winner.result)
        # The replacement was ready first: it takes the hop's place.
        self.hops[index:index + 1] = winner.records
        self._hop_failed(record.hop.peer_id, RequestTimeout("FORWARD", record.conn.address, delay,
                                                            peer_id=record.hop.peer_id))
        await self._close_records([record])
        return None

    # -- failover ----------------------------------------------------------------------------------

    async def _fail_over(self, index: int, exc: BaseException, *, replay: Sequence[SignedStep] | None = None,
                         replay_length: int | None = None, dispute: bool = False) -> None:
        """Replace hop ``index`` by a new route of its blocks, replaying to it the kept
        inputs of ``replay`` up to ``replay_length`` tokens (default: the old hop's
        session as it stands; rolled-back rows are not replayed). ``dispute``: the hop
        is replaced because an audit did not confirm it (see ``_replan``)."""
        old = self.hops[index]
        self._hop_failed(old.hop.peer_id, exc)
        log.warning("hop %s [%d, %d) failed: %s; re-routing", old.hop.peer_id.hex()[:12], *old.span, exc)
        if self.on_failover is not None:
            self.on_failover(old.hop, exc)
        prefix = (kept_prefix(old.transcript, old.length) if replay is None
                  else kept_prefix(replay, replay_length))
        last: BaseException = exc
        while True:
            self._count_failover(old.span, last)
            replacement = await self._open_route(await self._replan(old.span, last, dispute=dispute))
            try:
                self._replayed = await self._replay(replacement, prefix)
            except HOP_FAILURES as again:
                last = again
                log.warning("replacement failed too: %s", again)
                await self._close_records(replacement)
                continue
            except BaseException:
                await self._close_records(replacement)
                raise
            self.hops[index:index + 1] = replacement
            # Closed only now: a disputed hop whose span nobody else can take stays in
            # use (reported as unverified); a failed one is closed by ``aclose`` if no
            # replacement is found.
            await self._close_records([old])
            return

    async def _replay(self, records: Sequence[HopRecord], prefix: torch.Tensor | None) -> torch.Tensor | None:
        """Run a replaced hop's kept inputs (``kept_prefix``) through ``records``, the
        sessions taking its blocks, as one prefill step each; returns the last output
        (None: no history). The hop that fails is remembered, and its failure raised (a
        failover's and a hedge's replacement both come here)."""
        if prefix is None:
            return None
        x = prefix
        for record in records:
            try:
                x = await self._forward(record, x)
            except HOP_FAILURES as exc:
                self._hop_failed(record.hop.peer_id, exc)
                raise
        return x

    def _count_failover(self, span: tuple[int, int], last: BaseException | None) -> None:
        self.failovers += 1
        if self.failovers > self.max_failovers:
            raise AllCandidatesFailed(span[0], span[1], self.failovers, last)

    async def _replan(self, span: tuple[int, int], last: BaseException | None, *, dispute: bool = False) -> Route:
        """A route for ``span`` around the peers to avoid. For a disputed hop, holders
        the client merely backs off (slow, or a timed-out probe or audit on a loaded
        machine) are taken when nobody else is left: a slow correct answer beats
        keeping a disputed output, or failing the generation after a conviction."""
        try:
            return await self.replan(span[0], span[1], frozenset(self._avoid()))
        except NoRoute as no_route:
            if dispute:
                try:
                    return await self.replan(span[0], span[1], frozenset(self._avoid()), ignore_backoff=True)
                except NoRoute:
                    pass
            raise AllCandidatesFailed(span[0], span[1], self.failovers, last) from no_route

    def _avoid(self) -> set[bytes]:
        return self.failed

    def _hop_failed(self, peer: bytes, exc: BaseException) -> None:
        """Remember a failure client-wide (backoff) and, unless the peer asked to be
        retried later, for the rest of this generation."""
        if isinstance(exc, CheatDetected):
            # A disputed output is a matter for reputation (bans come from checked
            # evidence), not for availability: the peer answers, so it stays an auditor
            # and is only avoided as a hop for the rest of this generation.
            self.failed.add(peer)
            log.info("peer %s avoided for this generation: %s", peer.hex()[:12], exc)
            return
        retry_after = exc.retry_after if isinstance(exc, RemoteError) else None
        backoff = self.health.failed(peer, trio.current_time(), retry_after=retry_after, reason=str(exc))
        if retry_after is None:
            self.failed.add(peer)
        log.info("peer %s backed off for %.1f s: %s", peer.hex()[:12], backoff, exc)

    def _step_timeout(self, record: HopRecord, *, tokens: int) -> float:
        return self.health.step_timeout(record.hop.peer_id, blocks=record.state.blocks, tokens=tokens,
                                        cap=self.step_timeout)

    # -- closing ----------------------------------------------------------------------------------

    async def _close_one(self, record: HopRecord) -> None:
        """A receipt for the work received, then CLOSE_SESSION (best effort)."""
        if not record.conn.is_open:
            return
        if self.credit is not None and record.hop.peer_id not in self.failed:
            await self.credit.send_receipt(record.conn)
        await _close_session(record, CLOSE_TIMEOUT)

    async def _close_records(self, records: Sequence[HopRecord]) -> None:
        """Close sessions at once, shielded from cancellation and briefly: a failed or
        hung peer gets the request written and is not waited for."""
        if not records:
            return
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for record in records:
                    timeout = FAILED_CLOSE_TIMEOUT if record.hop.peer_id in self.failed else CLOSE_TIMEOUT
                    nursery.start_soon(_close_session, record, timeout)


async def _close_session(record: HopRecord, timeout: float) -> None:
    """CLOSE_SESSION once per session (a second close would only get UNKNOWN_SESSION)."""
    if record.state.phase is not SessionPhase.OPEN:
        return
    record.state.close()
    if record.conn.is_open:
        try:
            await record.conn.request(CloseSession(session=record.session), timeout=timeout)
        except SwarmError:
            pass


def kept_prefix(steps: Sequence[SignedStep], length: int | None = None, *,
                outputs: bool = False) -> torch.Tensor | None:
    """The rows of ``steps``' inputs (or outputs) a session holds at ``length`` tokens
    (``protocol.kept_rows``: rolled-back rows left out), as one float32 tensor; None if
    there are none."""
    rows = [decode_tensor(step.output if outputs else step.input, out_dtype=torch.float32)[:, :k]
            for step, k in kept_rows(steps, length) if k]
    return torch.cat(rows, dim=1) if rows else None
