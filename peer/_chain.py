"""An open relay chain for one generation: sessions on hops that cover [0, L).

Theory of operation. ``Chain.step(hidden)`` sends the hidden states of the new tokens
through every hop in order. Each step is the protocol's forward exchange
(``protocol.sign_forward`` / ``accept_result``) on the hop's ``SessionState``, which
keeps the session's signed transcript and history digest exactly as the server
keeps them: the chain verifies every output's signature before using it (a bad one
is a failure of that hop). When a hop fails (connection lost,
timeout, ERROR, bad signature, malformed answer) the chain marks the peer as failed,
asks ``replan`` for a new route of that hop's blocks that avoids every failed peer,
opens sessions there, replays the hop's whole history to the replacement as one
prefill step, and carries on with the step that failed. Because the replacement
recomputes exactly what the failed hop had computed, generation continues with the
same tokens (up to float rounding between a batched prefill and step-by-step decode).

Audits (``_audit_step``, spec 13.2): a hop-step drawn for an audit is checked before
its output is used. An output the audit did not confirm (the hop convicted, outvoted,
or a dispute nobody could settle) is never used: the hop is replaced like a failed
one, without the peers the audit found on the losing side, the disputed step is
redone there, and the hop's earlier, unaudited outputs are compared with the
replacement's replay of the same inputs (a divergence rolls the generation back).
Every later step of that span is audited. Only when no other holder can take the
span is the disputed output kept, and then counted as unverifiable, as is a step no
independent peer could check (``Verification``: the client reports both).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from protocol import (
    CloseSession,
    ForwardResult,
    OpenSession,
    SessionOpened,
    SessionState,
    SignedStep,
    accept_result,
    decode_tensor,
    encode_tensor,
    sign_forward,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteError, SwarmError
from swarm.errors import PeerUnreachable, RequestTimeout
from swarm.planning import Hop, Route
from swarm.transport import Host, PeerConnection

from .credit import CreditService

if TYPE_CHECKING:
    from verify import Auditor, AuditResult

__all__ = ["Chain", "HopRecord", "AllCandidatesFailed", "CheatDetected", "RollbackRequired", "Verification"]

log = logging.getLogger("swarm.client")

#: Failures that make the client route around a hop (anything else is a bug or a cancel).
HOP_FAILURES = (PeerUnreachable, RequestTimeout, RemoteError, ProtocolError)


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


class Chain:
    """Sessions on a route; see the module docstring.

    Args:
        host: the client's transport.
        model: model id every hop must serve.
        max_length: tokens each session must hold (prompt + new tokens).
        replan: ``await replan(start, end, exclude)`` returns a route for blocks
            [start, end) avoiding the peer ids in ``exclude`` (raises NoRoute if none).
        wire_dtype: dtype of hidden states on the wire.
        step_timeout: seconds one hop may take for one step.
        max_failovers: re-routes allowed per generation before giving up.
    """

    def __init__(self, host: Host, *, model: str, max_length: int,
                 replan: Callable[[int, int, frozenset[bytes]], Awaitable[Route]],
                 wire_dtype: str = "f32", step_timeout: float = 60.0, max_failovers: int = 8,
                 on_failover: Callable[[Hop, BaseException], None] | None = None,
                 credit: CreditService | None = None, auditor: Auditor | None = None) -> None:
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
        self.hops: list[HopRecord] = []
        self.failed: set[bytes] = set()
        self.failovers = 0
        self.verification = Verification()
        self.disputed: set[tuple[int, int]] = set()  # spans audited at every step from now on
        self.unredoable: set[tuple[int, int]] = set()  # disputed spans no other holder could take
        self._replayed: torch.Tensor | None = None  # the last failover's replay output

    async def open(self, route: Route) -> None:
        self.hops = [await self._open_hop(hop) for hop in route.hops]

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run ``hidden`` ([1, n, hidden]) for positions ``position..`` through every hop."""
        x = hidden
        i = 0
        while i < len(self.hops):
            record = self.hops[i]
            if record.length != position:
                raise LocalProtocolError(f"hop session at {record.length} tokens, asked to step at {position}")
            try:
                out = await self._forward(record, x)
            except HOP_FAILURES as exc:
                await self._fail_over(i, exc)
                continue
            if not await self._audit_step(i, record, position):
                continue  # the hop was replaced: the disputed step is redone there
            x = out
            i += 1
        return x

    async def aclose(self) -> None:
        """Close every session (best effort: the servers also drop them with the connection)."""
        hops, self.hops = self.hops, []
        if self.credit is not None:
            for record in hops:
                if record.conn.is_open:
                    await self.credit.send_receipt(record.conn)
        await _close_quietly(hops)

    # -- internals ------------------------------------------------------------------------

    async def _open_hop(self, hop: Hop) -> HopRecord:
        conn = await self._connect(hop)
        # The channel answers each request with its response type or raises (RESPONSES in protocol/).
        opened = cast(SessionOpened, await conn.request(OpenSession(model=self.model, span=hop.span,
                                                                    max_length=self.max_length,
                                                                    wire_dtype=self.wire_dtype),
                                                        timeout=self.step_timeout))
        state = SessionState(client=self.host.peer_id, server=conn.peer_id, session=opened.session, model=self.model,
                             span=hop.span, max_length=self.max_length, wire_dtype=self.wire_dtype)
        state.open()
        return HopRecord(hop=hop, conn=conn, state=state)

    async def _connect(self, hop: Hop) -> PeerConnection:
        last: BaseException | None = None
        for addr in hop.addrs:
            try:
                return await self.host.connect(addr, peer_id=hop.peer_id, timeout=min(self.step_timeout, 10.0))
            except PeerUnreachable as exc:
                last = exc
        raise PeerUnreachable(",".join(hop.addrs) or "?", f"no address answered ({last})", peer_id=hop.peer_id)

    async def _forward(self, record: HopRecord, x: torch.Tensor) -> torch.Tensor:
        """One step of ``x`` on the hop (at the position its session has reached)."""
        wire = encode_tensor(x, self.wire_dtype)
        request = sign_forward(self.host.identity, record.state, wire)
        t0 = time.perf_counter()
        result = cast(ForwardResult, await record.conn.request(request, timeout=self.step_timeout))
        record.latency += time.perf_counter() - t0
        accept_result(record.state, request, result, server_public_key=record.conn.public_key)
        if self.credit is not None:
            self.credit.received(record.conn, wire.shape[1] * record.state.blocks)
        return decode_tensor(result.hidden, out_dtype=x.dtype)

    # -- the audit path (spec 13.2) -----------------------------------------------------------

    async def _audit_step(self, index: int, record: HopRecord, position: int) -> bool:
        """Audit ``record``'s last step if it is drawn (or its span is disputed). Returns
        whether its output may be used; False: the hop was replaced, redo the step."""
        auditor = self.auditor
        if auditor is None or not (record.span in self.disputed or auditor.should_audit(record.hop.peer_id)):
            self.verification.used(record, None)
            return True
        result = await auditor.audit(
            model=self.model, span=record.span, hop_peer=record.hop.peer_id, hop_public_key=record.conn.public_key,
            hop_addrs=record.hop.addrs, session=record.session, transcript=record.transcript,
            index=len(record.transcript) - 1)
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
        why = {"cheat": "was convicted by an audit", "outvoted": "was outvoted in an audit"}.get(
            result.outcome.value, "gave an output an audit could not confirm")
        await self._fail_over(index, CheatDetected(f"{suspect.hop.peer_id.hex()[:12]} {why}"), replay=earlier)
        replay = self._replayed
        if replay is None or not earlier:
            return
        from verify import first_mismatch, tolerance_for

        claimed = torch.cat([decode_tensor(r.output, out_dtype=torch.float32) for r in earlier], dim=1)
        tolerance = tolerance_for(self.auditor.policy.compute_dtype if self.auditor else "f32", self.wire_dtype)
        row = first_mismatch(claimed, replay.to(torch.float32), tolerance=tolerance,
                             depth=suspect.span[1] - suspect.span[0])
        if row is not None:
            raise RollbackRequired(row)

    async def _fail_over(self, index: int, exc: BaseException, *, replay: Sequence[SignedStep] | None = None) -> None:
        """Replace hop ``index`` by a new route of its blocks, replaying to it the inputs of
        ``replay`` (default: every step of the old hop's transcript)."""
        old = self.hops[index]
        self.failed.add(old.hop.peer_id)
        self.failovers += 1
        log.warning("hop %s [%d, %d) failed: %s; re-routing", old.hop.peer_id.hex()[:12], *old.span, exc)
        if self.on_failover is not None:
            self.on_failover(old.hop, exc)
        history = [r.input for r in (old.transcript if replay is None else replay)]
        last: BaseException = exc
        while self.failovers <= self.max_failovers:
            try:
                route = await self.replan(old.span[0], old.span[1], frozenset(self.failed))
            except SwarmError as no_route:
                raise AllCandidatesFailed(old.span[0], old.span[1], self.failovers, last) from no_route
            replacement: list[HopRecord] = []
            current = route.hops[0]
            try:
                for hop in route.hops:
                    current = hop
                    replacement.append(await self._open_hop(hop))
                x = None
                if history:
                    x = torch.cat([decode_tensor(w, out_dtype=torch.float32) for w in history], dim=1)
                    for record in replacement:
                        current = record.hop
                        x = await self._forward(record, x)
                self._replayed = x
            except HOP_FAILURES as again:
                last = again
                self.failed.add(current.peer_id)
                self.failovers += 1
                log.warning("replacement %s failed too: %s", current.peer_id.hex()[:12], again)
                await _close_quietly(replacement)
                continue
            self.hops[index:index + 1] = replacement
            return
        raise AllCandidatesFailed(old.span[0], old.span[1], self.failovers, last) from last


async def _close_quietly(records: Sequence[HopRecord]) -> None:
    for record in records:
        if record.conn.is_open:
            try:
                await record.conn.request(CloseSession(session=record.session), timeout=5.0)
            except SwarmError:
                pass
