"""The client's spot-check auditor (spec 13.2, "Audits").

Theory of operation. After a hop answers a step, the relay chain asks
``Auditor.should_audit(peer)`` (true with the peer's audit rate: ``policy.rate`` for a
peer that passed many audits here, more for a new or unknown one: ``rate_for``; drawn
from an unpredictable RNG unless seeded) and, if so, awaits ``audit`` before the
step's output is used. An audit:

1. replays the hop's whole input prefix (its transcript's inputs up to and including
   the step, concatenated, sent as exact f32) as FORWARD_ONCE on holders of the hop's
   blocks drawn one at a time at random, weighted by long-lived reputation, among
   operators other than the hop's and each other's (``verify._voting``); never the
   hop, never a banned peer. A timeout or refusal counts against that peer's
   availability and another is drawn;
2. compares the step's rows of each answer with the hop's signed output
   (``verify._compare``) until ``policy.quorum`` answers agree: the step passes;
3. otherwise (a mismatch, or nobody answered), and at once for a *new* hop (fewer than
   ``policy.probation_passes`` passed audits, whose friends could vouch for it),
   *escalates*:
   - if the client can load the span itself (``LocalRecompute``: a client can always
     load blocks of the model it runs the head of, memory allowing), it recomputes.
     Its own result decides: the hop passes, or the client checks the fraud proof
     against the hop on its own span (``verify_proof``: the spread rule of
     ``verify._judge``) and, if it convicts, bans the hop on that evidence (``CHEAT``)
     and submits the proof to holders; an auditor whose signed answer its own
     recomputation convicts is banned the same way (``AUDITOR_CHEAT``);
   - otherwise it draws more voters (up to ``policy.max_voters``, distinct operators)
     and takes the weighted vote (``verify._voting.tally``). The hop confirmed by a
     majority passes; a hop outvoted (``OUTVOTED``) or a vote without a majority
     (``INCONCLUSIVE``) is routed around, and nobody is banned: a vote is not
     evidence the client checked. (A vote without a majority in which the hop's side
     outweighs all the others together, one established peer against fresh
     identities, leaves the hop's output standing, unverified: ``AuditResult.stands``.) An outvoted hop's fraud proof goes to the
     majority's holders, which verify it by recomputation (their bans are theirs);
   - with no answer at all and no local span, the step is ``SKIPPED``: no independent
     check was possible (the generation reports it).

A pass adds to the hop's long-lived history what its confirming auditors weigh, so
fresh identities confirming each other build history slowly. The chain redoes every
step whose audit did not pass on another holder (spec 13.2 rule 6), so no disputed
output is used silently.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import cast

import torch

from protocol import (
    ForwardOnceResult,
    FraudProof,
    SignedStep,
    WireTensor,
    accept_forward_once_result,
    decode_tensor,
    encode_tensor,
    kept_rows,
    sign_forward_once,
)
from protocol.errors import SwarmError
from swarm.transport import Host

from ._compare import Comparison, Tolerance, compare, tolerance_for
from ._proofs import (
    InvalidProof,
    LocalRecompute,
    SpanRecompute,
    proof_digest,
    proof_from_forward_once,
    proof_from_transcript,
    verify_proof,
)
from ._reputation import Reputation
from ._service import FraudProofService
from ._voting import Ballot, VoteResult, draw_voter, operator_of, tally

__all__ = ["AuditOutcome", "AuditPolicy", "AuditResult", "AuditStats", "Auditor", "DEFAULT_AUDIT_RATE",
           "DEFAULT_LOCAL_RECOMPUTE_BYTES", "LocalRecompute", "PARANOID"]

log = logging.getLogger("swarm.verify")

#: Default share of an established peer's hop-steps audited: a cheater on a fraction
#: q of steps survives N steps with probability (1 - 0.05 q)^N (bench/audit.py
#: measures it), for about 5 % more span compute per step at short prefixes.
DEFAULT_AUDIT_RATE = 0.05
#: A client loads a span whose weights fit this many bytes to check disputes itself
#: (``Swarm.connect(local_recompute_bytes=...)``; 0 turns it off).
DEFAULT_LOCAL_RECOMPUTE_BYTES = 1 << 30

Candidates = Callable[[tuple[int, int]], Awaitable[Sequence[tuple[bytes, tuple[str, ...]]]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditPolicy:
    """How much and how to audit.

    Args:
        rate: probability that a hop-step of an established peer is audited (0: never,
            1: paranoid, every step before its output is used).
        probation: a peer with ``n`` passed audits (long-lived, this client's history)
            is audited with probability ``max(rate, probation / (n + 1))``: new and
            unknown peers always, then less as they prove themselves. 0: ``rate`` for all.
        probation_passes: below this many passed audits a peer is *new*: when the client
            can load the span, it checks the peer's audited steps itself instead of
            asking other holders (whose vouching a new peer's friends could provide).
        quorum: independent holders (distinct operators) that must agree with the hop for
            an audit to pass without escalating; fewer if the span has fewer. A cheater
            goes unnoticed only if every one drawn colludes with it.
        max_voters: independent holders asked in all when an audit escalates.
        timeout: seconds one FORWARD_ONCE of an audit may take.
        max_attempts: unanswered draws tolerated per audit before giving up on voters.
        compute_dtype: the precision the swarm's peers compute in (picks the tolerance
            with the session's wire dtype).
        seed: makes the sampling reproducible (tests, benchmarks); None: unpredictable.
    """

    rate: float = DEFAULT_AUDIT_RATE
    probation: float = 2.0
    probation_passes: float = 20.0
    quorum: int = 1
    max_voters: int = 4
    timeout: float = 30.0
    max_attempts: int = 3
    compute_dtype: str = "f32"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"audit rate must be in [0, 1], got {self.rate}")
        if self.timeout <= 0 or self.max_attempts < 1 or not 1 <= self.quorum <= self.max_voters:
            raise ValueError("timeout must be positive, max_attempts at least 1 and 1 <= quorum <= max_voters")
        if self.probation < 0 or self.probation_passes < 0:
            raise ValueError("probation and probation_passes must be non-negative")
        tolerance_for(self.compute_dtype)  # raises for an unknown dtype


#: Audit every hop-step before its output is used, by two independent holders.
PARANOID = AuditPolicy(rate=1.0, quorum=2)


class AuditOutcome(Enum):
    PASSED = "passed"  # an independent check agreed with the hop
    CHEAT = "cheat"  # the client's own recomputation convicts the hop; ``proof`` holds it
    AUDITOR_CHEAT = "auditor-cheat"  # the client's own recomputation convicts an auditor; the hop passed
    OUTVOTED = "outvoted"  # a weighted majority of independent holders disagrees with the hop
    INCONCLUSIVE = "inconclusive"  # a disagreement nobody could settle
    SKIPPED = "skipped"  # no independent check was possible


#: Outcomes whose disputed output the chain must not use (it redoes the step elsewhere).
REDO = frozenset({AuditOutcome.CHEAT, AuditOutcome.OUTVOTED, AuditOutcome.INCONCLUSIVE})


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditResult:
    outcome: AuditOutcome
    suspect: bytes | None = None
    proof: FraudProof | None = None
    comparisons: tuple[Comparison, ...] = ()
    avoid: tuple[bytes, ...] = ()  # peers not to redo the step on (the hop, the losing side)
    checked_locally: bool = False
    #: A vote without a majority in which the hop's side outweighs every disagreeing
    #: answer together (one established peer against fresh identities): no holder is
    #: more trustworthy than the hop, so its output stands, reported as unverified, and
    #: ``avoid`` names the outweighed side.
    stands: bool = False

    @property
    def hop_cheated(self) -> bool:
        return self.outcome is AuditOutcome.CHEAT

    @property
    def redo(self) -> bool:
        """The hop's output is disputed: redo the step on another holder."""
        return self.outcome in REDO and not self.stands

    @property
    def verified(self) -> bool:
        """The hop's output was confirmed by an independent check."""
        return self.outcome in (AuditOutcome.PASSED, AuditOutcome.AUDITOR_CHEAT)


@dataclass(slots=True)
class AuditStats:
    """Counters for reports and the benchmark."""

    sampled: int = 0  # should_audit() calls
    audits: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    recomputed_tokens: int = 0  # prefix tokens x blocks recomputed by auditors
    local_checks: int = 0  # escalations the client settled by its own recomputation
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _Answer:
    peer_id: bytes
    public_key: bytes
    nonce: bytes
    request_signature: bytes
    output: WireTensor
    output_signature: bytes
    rows: torch.Tensor
    address: str


@dataclass(slots=True)
class _Case:
    """One audit's data, passed between the steps of ``_audit``."""

    model: str
    span: tuple[int, int]
    hop_peer: bytes
    hop_public_key: bytes
    session: bytes
    transcript: Sequence[SignedStep]
    index: int
    claimed: torch.Tensor
    wire: WireTensor
    tolerance: Tolerance
    pool: list[tuple[bytes, str, tuple[str, ...]]]  # (peer, operator, addrs) not yet asked
    used: set[str]  # operators already represented (the hop's, the voters')
    timeout: float  # each recomputation's deadline (the relay's step deadline, at most the policy's)
    answers: list[_Answer] = field(default_factory=list)
    failures: int = 0

    @property
    def depth(self) -> int:
        return self.span[1] - self.span[0]

    @property
    def rows(self) -> int:
        return self.claimed.shape[1]


class Auditor:
    """Audits hop-steps of a client's relay chains; see the module docstring.

    Args:
        host: the client's transport (signs the FORWARD_ONCE requests).
        candidates: ``await candidates(span)`` -> (peer id, addrs) of peers announcing a
            span that covers ``span``.
        reputation: standings, history and bans (shared with routing).
        service: where proofs are submitted; None keeps them local.
        local: the client's own spans for settling disputes (None: votes only).
        policy: rates and limits.
        clock: unix time for reputation events.
    """

    def __init__(self, host: Host, candidates: Candidates, reputation: Reputation, *,
                 service: FraudProofService | None = None, local: LocalRecompute | None = None,
                 policy: AuditPolicy = AuditPolicy(), clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.candidates = candidates
        self.reputation = reputation
        self.service = service
        self.local = local
        self.policy = policy
        self.clock = clock
        self.stats = AuditStats()
        self.proofs: list[FraudProof] = []
        self._rng: random.Random = random.Random(policy.seed) if policy.seed is not None else random.SystemRandom()

    def rate_for(self, peer: bytes | None) -> float:
        """The audit probability of ``peer``'s next hop-step (``AuditPolicy.probation``)."""
        rate = self.policy.rate
        if peer is None or self.policy.probation <= 0:
            return rate
        now = self.clock()
        # passes count as far as the peer is otherwise in good standing (score in (0, 1])
        passed = self.reputation.audits_passed(peer, now) * self.reputation.score(peer, now)
        return max(rate, min(1.0, self.policy.probation / (passed + 1.0)))

    def on_probation(self, peer: bytes) -> bool:
        """Whether ``peer`` has passed fewer than ``policy.probation_passes`` audits here
        (its audits are then settled on the client's own span when it has one)."""
        now = self.clock()
        return self.reputation.audits_passed(peer, now) * self.reputation.score(peer, now) < self.policy.probation_passes

    def should_audit(self, peer: bytes | None = None) -> bool:
        """Draw whether ``peer``'s next hop-step is audited (``rate_for``)."""
        self.stats.sampled += 1
        rate = self.rate_for(peer)
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)

    async def audit(self, *, model: str, span: tuple[int, int], hop_peer: bytes, hop_public_key: bytes,
                    hop_addrs: Sequence[str], session: bytes, transcript: Sequence[SignedStep],
                    index: int, timeout: float | None = None) -> AuditResult:
        """Audit step ``transcript[index]`` of a hop; see the module docstring.

        ``timeout`` bounds each recomputation (default ``policy.timeout``): the relay
        passes its step's deadline, so that an audit never waits longer on a hung
        auditor than the step would have waited on the hop.
        """
        t0 = time.perf_counter()
        self.stats.audits += 1
        timeout = self.policy.timeout if timeout is None else min(timeout, self.policy.timeout)
        try:
            result = await self._audit(model, span, hop_peer, hop_public_key, hop_addrs, session, transcript, index,
                                       timeout)
        finally:
            self.stats.seconds += time.perf_counter() - t0
        self.stats.outcomes[result.outcome.value] = self.stats.outcomes.get(result.outcome.value, 0) + 1
        return result

    # -- the procedure ----------------------------------------------------------------------

    async def _audit(self, model: str, span: tuple[int, int], hop_peer: bytes, hop_public_key: bytes,
                     hop_addrs: Sequence[str], session: bytes, transcript: Sequence[SignedStep],
                     index: int, timeout: float) -> AuditResult:
        disputed = transcript[index]
        try:
            tolerance = tolerance_for(self.policy.compute_dtype, disputed.output.dtype)
        except ValueError:  # an nf4 wire: not auditable (see verify._compare)
            return AuditResult(outcome=AuditOutcome.SKIPPED)
        claimed = decode_tensor(disputed.output, out_dtype=torch.float32)
        # the session's input prefix as the disputed step saw it: rolled-back rows left out
        prefix = torch.cat([decode_tensor(r.input, out_dtype=torch.float32)[:, :k]
                            for r, k in kept_rows(transcript[:index + 1]) if k], dim=1)
        case = _Case(model=model, span=span, hop_peer=hop_peer, hop_public_key=hop_public_key, session=session,
                     transcript=transcript, index=index, claimed=claimed,
                     wire=encode_tensor(prefix, "f32"),  # exact: every wire dtype decodes to float32 values
                     tolerance=tolerance, pool=self._pool(await self.candidates(span), hop_peer),
                     used={operator_of(hop_peer, hop_addrs[0] if hop_addrs else None)}, timeout=timeout)
        if self.local is not None and self.on_probation(hop_peer):
            # A peer this client has not seen prove itself is checked on the client's own
            # copy of the span when it has one: its friends cannot vouch for it.
            settled = await self._settle_locally(case)
            if settled is not None:
                return settled
        comparisons = []
        while len(case.answers) < self.policy.quorum and (answer := await self._next_answer(case)) is not None:
            verdict = compare(claimed, answer.rows, tolerance=tolerance, depth=case.depth)
            comparisons.append(verdict)
            if not verdict.ok:
                log.warning("audit of %s [%d, %d) step %d: %s against %s", hop_peer.hex()[:12], *span,
                            disputed.step, verdict, answer.peer_id.hex()[:12])
                break
        if case.answers and all(c.ok for c in comparisons):
            now = self.clock()
            # History grows by what the confirming auditors weigh: fresh identities
            # vouching for each other build it ten times slower than established ones.
            vouched = max(self.reputation.weight(a.peer_id, now) for a in case.answers)
            self.reputation.record_audit_pass(hop_peer, now, n=vouched)
            for answer in case.answers:
                self.reputation.record_audit_pass(answer.peer_id, now, n=self.reputation.weight(hop_peer, now))
            return AuditResult(outcome=AuditOutcome.PASSED, comparisons=tuple(comparisons))
        settled = await self._settle_locally(case)
        if settled is not None:
            return settled
        while len(case.answers) < self.policy.max_voters and await self._next_answer(case) is not None:
            pass
        if not case.answers:
            return AuditResult(outcome=AuditOutcome.SKIPPED)
        return self._vote(case)

    async def _settle_locally(self, case: _Case) -> AuditResult | None:
        """The client's own verdict (module docstring, step 3), or None without a local span."""
        if self.local is None:
            return None
        wire, rows = case.wire, case.rows

        def recompute(ex: SpanRecompute) -> torch.Tensor:
            x = decode_tensor(wire, out_dtype=torch.float32).to(device=ex.device, dtype=ex.dtype)
            with torch.inference_mode():
                out = ex.forward_once(x, start=case.span[0], end=case.span[1])
            return out.to(device="cpu", dtype=torch.float32)[:, -rows:]

        try:
            mine = await self.local.run(case.model, case.span, recompute)
        except SwarmError as exc:
            log.info("local recomputation of [%d, %d) failed: %s", *case.span, exc)
            return None
        if mine is None:
            return None
        self.stats.local_checks += 1
        now = self.clock()
        me = self.host.identity.public_key
        agrees = [compare(a.rows, mine, tolerance=case.tolerance, depth=case.depth).ok for a in case.answers]
        c_hop = compare(case.claimed, mine, tolerance=case.tolerance, depth=case.depth)
        if c_hop.ok:
            self.reputation.record_audit_pass(case.hop_peer, now)
            result = AuditResult(outcome=AuditOutcome.PASSED, comparisons=(c_hop,), checked_locally=True)
        else:
            proof = proof_from_transcript(accused=case.hop_public_key, client=me, model=case.model, span=case.span,
                                          session=case.session, transcript=case.transcript, index=case.index)
            if await self._convicts(proof):
                witnesses = [a for a, ok in zip(case.answers, agrees) if ok]
                self._convict(case.hop_peer, proof, witnesses, case)
                result = AuditResult(outcome=AuditOutcome.CHEAT, suspect=case.hop_peer, proof=proof,
                                     comparisons=(c_hop,), avoid=(case.hop_peer,), checked_locally=True)
            else:  # farther than the floor, not far enough to convict: nobody is blamed
                result = AuditResult(outcome=AuditOutcome.INCONCLUSIVE, comparisons=(c_hop,),
                                     avoid=(case.hop_peer,), checked_locally=True)
        # Judge the auditors by the client's own recomputation too.
        for answer, ok in zip(case.answers, agrees):
            if ok:
                self.reputation.record_audit_pass(answer.peer_id, now)
                continue
            proof = proof_from_forward_once(accused=answer.public_key, client=me, model=case.model, span=case.span,
                                            nonce=answer.nonce, hidden=case.wire,
                                            request_signature=answer.request_signature, output=answer.output,
                                            output_signature=answer.output_signature)
            if await self._convicts(proof):
                self._convict(answer.peer_id, proof, [a for a, good in zip(case.answers, agrees) if good], case)
                if result.outcome is AuditOutcome.PASSED:
                    result = AuditResult(outcome=AuditOutcome.AUDITOR_CHEAT, suspect=answer.peer_id, proof=proof,
                                         comparisons=result.comparisons, checked_locally=True)
        return result

    async def _convicts(self, proof: FraudProof) -> bool:
        """Whether the client's own span convicts the accused of ``proof``."""
        assert self.local is not None
        compute_dtype = self.policy.compute_dtype

        def check(ex: SpanRecompute) -> bool:
            try:
                verify_proof(proof, ex, compute_dtype=compute_dtype)
            except InvalidProof as exc:
                log.info("own recomputation does not convict %s: %s", proof.accused.hex()[:12], exc)
                return False
            return True

        return bool(await self.local.run(proof.model, proof.span, check))

    def _vote(self, case: _Case) -> AuditResult:
        """The weighted vote among the hop and the voters (module docstring, step 3)."""
        now = self.clock()
        outputs = [case.claimed] + [a.rows for a in case.answers]
        ballots = [Ballot(case.hop_peer, self.reputation.weight(case.hop_peer, now), is_hop=True)]
        ballots += [Ballot(a.peer_id, self.reputation.weight(a.peer_id, now)) for a in case.answers]
        verdicts: dict[tuple[int, int], bool] = {}

        def agree(i: int, j: int) -> bool:
            key = (min(i, j), max(i, j))
            if key not in verdicts:
                verdicts[key] = compare(outputs[i], outputs[j], tolerance=case.tolerance, depth=case.depth).ok
            return verdicts[key]

        vote = tally(ballots, agree)
        for peer in vote.winners:
            self.reputation.record_audit_pass(peer, now)
        if vote.result is VoteResult.HOP_WINS:
            for peer in vote.losers:
                self.reputation.record_mismatch(peer, now)
            return AuditResult(outcome=AuditOutcome.PASSED)
        if vote.result is VoteResult.HOP_LOSES:
            self.reputation.record_mismatch(case.hop_peer, now)
            proof = proof_from_transcript(accused=case.hop_public_key, client=self.host.identity.public_key,
                                          model=case.model, span=case.span, session=case.session,
                                          transcript=case.transcript, index=case.index)
            self.proofs.append(proof)
            if self.service is not None:  # the majority's holders verify it themselves
                self.service.submit_soon(proof, [self._holder(a) for a in case.answers if a.peer_id in vote.winners])
            log.warning("hop %s [%d, %d) outvoted (%s); routing around it", case.hop_peer.hex()[:12], *case.span,
                        ", ".join(f"{w:.2f}" for w in vote.weights))
            return AuditResult(outcome=AuditOutcome.OUTVOTED, suspect=case.hop_peer, proof=proof,
                               avoid=vote.losers)
        # No majority: those outweighed by the heaviest answer get a mark (never a ban),
        # so that a cheater disputed by an established peer does not leave probation.
        def weight(members: Sequence[int]) -> float:
            return sum(ballots[i].weight for i in members)

        heaviest = max(vote.clusters, key=weight)
        top = weight(heaviest)
        for members in vote.clusters:
            if weight(members) < top / 2:
                for i in members:
                    self.reputation.record_mismatch(ballots[i].peer_id, now)
        # The step is redone away from the hop and from every side lighter than the
        # heaviest; but when the hop's own side outweighs all the others together (it
        # lacks only a second member), the redo could only go to the lighter side: a
        # vote of fresh identities must not move the client off an established peer.
        hop_side = next(members for members in vote.clusters if 0 in members)
        lighter = tuple(ballots[i].peer_id for members in vote.clusters if weight(members) < top
                        for i in members)
        if weight(hop_side) > sum(weight(m) for m in vote.clusters if m is not hop_side):
            log.warning("hop %s [%d, %d) disputed by lighter voters (%s); its output stands, unverified",
                        case.hop_peer.hex()[:12], *case.span, ", ".join(f"{w:.2f}" for w in vote.weights))
            return AuditResult(outcome=AuditOutcome.INCONCLUSIVE, avoid=lighter, stands=True)
        return AuditResult(outcome=AuditOutcome.INCONCLUSIVE, avoid=tuple(dict.fromkeys((case.hop_peer, *lighter))))

    def _convict(self, suspect: bytes, proof: FraudProof, witnesses: Sequence[_Answer], case: _Case) -> None:
        """Ban on the client's own evidence, and submit the proof to holders."""
        now = self.clock()
        self.reputation.record_mismatch(suspect, now)
        self.proofs.append(proof)
        if self.service is None:
            self.reputation.ban(suspect, now, reason="convicted by own recomputation", proof=proof_digest(proof))
            return
        holders = [self._holder(w) for w in witnesses if w.peer_id != suspect]
        holders += [(p, addrs) for p, _, addrs in case.pool if p != suspect][:3]
        self.service.convicted(proof, holders)

    @staticmethod
    def _holder(answer: _Answer) -> tuple[bytes, tuple[str, ...]]:
        return answer.peer_id, (answer.address,)

    # -- voters -----------------------------------------------------------------------------

    def _pool(self, found: Sequence[tuple[bytes, tuple[str, ...]]],
              hop_peer: bytes) -> list[tuple[bytes, str, tuple[str, ...]]]:
        """Holders that may vote: not the hop, not us, not banned, reachable."""
        me = self.host.peer_id
        seen: set[bytes] = set()
        pool = []
        for peer, addrs in found:
            if peer in seen or peer in (hop_peer, me) or self.reputation.is_banned(peer) or not addrs:
                continue
            seen.add(peer)
            pool.append((peer, operator_of(peer, addrs[0]), tuple(addrs)))
        return pool

    async def _next_answer(self, case: _Case) -> _Answer | None:
        """Draw voters until one of a new operator answers (module docstring, step 1)."""
        now = self.clock()
        while case.failures < self.policy.max_attempts:
            pick = draw_voter([(p, op) for p, op, _ in case.pool], lambda p: self.reputation.weight(p, now),
                              case.used, self._rng)
            if pick is None:
                return None
            peer_id, claimed_op, addrs = case.pool.pop(pick)
            try:
                answer = await self._forward_once(peer_id, addrs, case)
            except SwarmError as exc:
                log.info("audit recompute on %s failed: %s", peer_id.hex()[:12], exc)
                self.reputation.record_timeout(peer_id, self.clock())
                case.failures += 1
                continue
            reached = operator_of(peer_id, answer.address)
            if reached in case.used:  # it answered from an operator that already voted
                case.failures += 1
                continue
            case.used.update({reached, claimed_op})
            case.answers.append(answer)
            self.stats.recomputed_tokens += case.wire.shape[1] * case.depth
            return answer
        return None

    async def _forward_once(self, peer_id: bytes, addrs: tuple[str, ...], case: _Case) -> _Answer:
        conn = None
        last: SwarmError | None = None
        for addr in addrs:
            try:
                conn = await self.host.connect(addr, peer_id=peer_id, timeout=min(case.timeout, 10.0))
                break
            except SwarmError as exc:
                last = exc
        if conn is None:
            raise last or SwarmError("no address to reach the auditor")
        request, state = sign_forward_once(self.host.identity, server=peer_id, nonce=secrets.token_bytes(16),
                                           model=case.model, span=case.span, hidden=case.wire)
        # The channel answers a FORWARD_ONCE with its result or raises (RESPONSES in protocol/).
        result = cast(ForwardOnceResult, await conn.request(request, timeout=case.timeout))
        accept_forward_once_result(state, request, result, server_public_key=conn.public_key)
        out = decode_tensor(result.hidden, out_dtype=torch.float32)
        return _Answer(peer_id=peer_id, public_key=conn.public_key, nonce=request.nonce,
                       request_signature=request.signature, output=result.hidden, output_signature=result.signature,
                       rows=out[:, -case.rows:], address=conn.address)
