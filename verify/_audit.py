"""The client's spot-check auditor (spec "Verification", "Audits").

Theory of operation. After a hop answers a step, the relay chain asks
``Auditor.should_audit()`` (true with probability ``policy.rate``, drawn from an
unpredictable RNG unless seeded) and, if so, awaits ``audit`` before the step's output
is used. An audit:

1. replays the hop's whole input prefix (its transcript's inputs up to and including
   the step, concatenated, sent as exact f32) as FORWARD_ONCE on an independent peer
   serving the hop's blocks: never the hop, never a banned peer, peers on another
   host first, then by reputation; a timeout or refusal counts against that peer's
   availability and the next candidate is tried;
2. compares the step's rows of the answer with the hop's signed output
   (``verify._compare``); a match passes the step;
3. on a mismatch asks a third peer and takes the 2-vs-1 vote: the minority is the
   suspect. If the hop lost, the result carries a fraud proof built from the hop's
   transcript; if the first auditor lost, one built from its signed FORWARD_ONCE
   answer (and the hop passes). Without a third answer, or when all three disagree,
   the audit is inconclusive and nobody is blamed.

A suspect is banned at once on the client's own evidence (two independent peers
against one) and its proof is submitted in the background to the other holders of
the span, which verify it by recomputation and spread it (``FraudProofService``).
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from protocol import (
    FraudProof,
    SignedStep,
    WireTensor,
    accept_forward_once_result,
    decode_tensor,
    encode_tensor,
    sign_forward_once,
)
from protocol.errors import SwarmError
from swarm.transport import Host

from ._compare import Comparison, compare, tolerance_for
from ._proofs import proof_digest, proof_from_forward_once, proof_from_transcript
from ._reputation import Reputation
from ._service import FraudProofService

__all__ = ["AuditOutcome", "AuditPolicy", "AuditResult", "AuditStats", "Auditor", "DEFAULT_AUDIT_RATE", "PARANOID"]

log = logging.getLogger("swarm.verify")

#: Default share of hop-steps audited: a cheater on a fraction q of steps survives N
#: steps with probability (1 - 0.05 q)^N (bench/audit.py measures it), for about 5 %
#: more span compute per step at short prefixes (the replay grows with the prefix).
DEFAULT_AUDIT_RATE = 0.05

Candidates = Callable[[tuple[int, int]], Awaitable[Sequence[tuple[bytes, tuple[str, ...]]]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditPolicy:
    """How much and how to audit.

    Args:
        rate: probability that a hop-step is audited (0: never, 1: paranoid, every step
            before its output is used).
        timeout: seconds one FORWARD_ONCE of an audit may take.
        max_attempts: candidates tried for each of the two recomputations.
        compute_dtype: the precision the swarm's peers compute in (picks the tolerance
            with the session's wire dtype).
        seed: makes the sampling reproducible (tests, benchmarks); None: unpredictable.
    """

    rate: float = DEFAULT_AUDIT_RATE
    timeout: float = 30.0
    max_attempts: int = 3
    compute_dtype: str = "f32"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"audit rate must be in [0, 1], got {self.rate}")
        if self.timeout <= 0 or self.max_attempts < 1:
            raise ValueError("timeout must be positive and max_attempts at least 1")
        tolerance_for(self.compute_dtype)  # raises for an unknown dtype


#: Audit every hop-step before its output is used.
PARANOID = AuditPolicy(rate=1.0)


class AuditOutcome(Enum):
    PASSED = "passed"  # an independent peer agreed with the hop
    CHEAT = "cheat"  # the hop lost a 2-vs-1 vote; ``proof`` convicts it
    AUDITOR_CHEAT = "auditor-cheat"  # the first auditor lost the vote; the hop passed
    INCONCLUSIVE = "inconclusive"  # no majority (or no third peer); nobody blamed
    SKIPPED = "skipped"  # no independent peer answered


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditResult:
    outcome: AuditOutcome
    suspect: bytes | None = None
    proof: FraudProof | None = None
    comparisons: tuple[Comparison, ...] = ()

    @property
    def hop_cheated(self) -> bool:
        return self.outcome is AuditOutcome.CHEAT


@dataclass(slots=True)
class AuditStats:
    """Counters for reports and the benchmark."""

    sampled: int = 0  # should_audit() calls
    audits: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    recomputed_tokens: int = 0  # prefix tokens x blocks recomputed by auditors
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


class Auditor:
    """Audits hop-steps of a client's relay chains; see the module docstring.

    Args:
        host: the client's transport (signs the FORWARD_ONCE requests).
        candidates: ``await candidates(span)`` -> (peer id, addrs) of peers announcing a
            span that covers ``span``.
        reputation: standings and bans (shared with routing).
        service: where proofs are submitted; None keeps them local.
        policy: rates and limits.
        clock: unix time for reputation events.
    """

    def __init__(self, host: Host, candidates: Candidates, reputation: Reputation, *,
                 service: FraudProofService | None = None, policy: AuditPolicy = AuditPolicy(),
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.candidates = candidates
        self.reputation = reputation
        self.service = service
        self.policy = policy
        self.clock = clock
        self.stats = AuditStats()
        self.proofs: list[FraudProof] = []
        self._addrs: dict[bytes, tuple[str, ...]] = {}
        self._rng: random.Random = random.Random(policy.seed) if policy.seed is not None else random.SystemRandom()

    def should_audit(self) -> bool:
        """Draw whether the next hop-step is audited (probability ``policy.rate``)."""
        self.stats.sampled += 1
        rate = self.policy.rate
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

    async def _audit(self, model: str, span: tuple[int, int], hop_peer: bytes, hop_public_key: bytes,
                     hop_addrs: Sequence[str], session: bytes, transcript: Sequence[SignedStep],
                     index: int, timeout: float) -> AuditResult:
        disputed = transcript[index]
        try:
            tolerance = tolerance_for(self.policy.compute_dtype, disputed.output.dtype)
        except ValueError:  # an nf4 wire: not auditable (see verify._compare)
            return AuditResult(outcome=AuditOutcome.SKIPPED)
        claimed = decode_tensor(disputed.output, out_dtype=torch.float32)
        prefix = torch.cat([decode_tensor(r.input, out_dtype=torch.float32) for r in transcript[:index + 1]], dim=1)
        wire = encode_tensor(prefix, "f32")  # exact: every wire dtype decodes to float32 values
        depth = span[1] - span[0]
        rows = claimed.shape[1]
        now = self.clock()
        candidates = self._ranked(await self.candidates(span), hop_peer, hop_addrs, now)
        first = await self._recompute(candidates, model, span, wire, rows, timeout)
        if first is None:
            return AuditResult(outcome=AuditOutcome.SKIPPED)
        c_first = compare(claimed, first.rows, tolerance=tolerance, depth=depth)
        if c_first.ok:
            self.reputation.record_success(hop_peer, self.clock())
            return AuditResult(outcome=AuditOutcome.PASSED, comparisons=(c_first,))
        log.warning("audit of %s [%d, %d) step %d: %s against %s", hop_peer.hex()[:12], *span, disputed.step,
                    c_first, first.peer_id.hex()[:12])
        second = await self._recompute([c for c in candidates if c[0] != first.peer_id], model, span, wire, rows,
                                       timeout)
        if second is None:
            return AuditResult(outcome=AuditOutcome.INCONCLUSIVE, comparisons=(c_first,))
        c_hop = compare(claimed, second.rows, tolerance=tolerance, depth=depth)
        c_auditors = compare(first.rows, second.rows, tolerance=tolerance, depth=depth)
        comparisons = (c_first, c_hop, c_auditors)
        me = self.host.identity.public_key
        if not c_hop.ok and c_auditors.ok:
            proof = proof_from_transcript(accused=hop_public_key, client=me, model=model, span=span, session=session,
                                          transcript=transcript, index=index)
            self._convict(hop_peer, proof, [second, first])
            return AuditResult(outcome=AuditOutcome.CHEAT, suspect=hop_peer, proof=proof, comparisons=comparisons)
        if c_hop.ok and not c_auditors.ok:
            proof = proof_from_forward_once(accused=first.public_key, client=me, model=model, span=span,
                                            nonce=first.nonce, hidden=wire, request_signature=first.request_signature,
                                            output=first.output, output_signature=first.output_signature)
            self.reputation.record_success(hop_peer, self.clock())
            self._convict(first.peer_id, proof, [second])
            return AuditResult(outcome=AuditOutcome.AUDITOR_CHEAT, suspect=first.peer_id, proof=proof,
                               comparisons=comparisons)
        return AuditResult(outcome=AuditOutcome.INCONCLUSIVE, comparisons=comparisons)

    def _convict(self, suspect: bytes, proof: FraudProof, witnesses: list[_Answer]) -> None:
        now = self.clock()
        self.reputation.record_mismatch(suspect, now)
        self.reputation.ban(suspect, now, reason="lost a 2-vs-1 audit vote", proof=proof_digest(proof))
        self.proofs.append(proof)
        if self.service is not None:
            self.service.submit_soon(proof, [(w.peer_id, self._addrs.get(w.peer_id, ())) for w in witnesses])

    def _ranked(self, found: Sequence[tuple[bytes, tuple[str, ...]]], hop_peer: bytes, hop_addrs: Sequence[str],
                now: float) -> list[tuple[bytes, tuple[str, ...]]]:
        """Independent candidates: not the hop, not us, not banned; other hosts first,
        then by reputation, ties in random order."""
        hop_hosts = {_host_of(a) for a in hop_addrs}
        self._addrs = {p: tuple(a) for p, a in found}
        usable = [(p, tuple(a)) for p, a in found
                  if p not in (hop_peer, self.host.peer_id) and not self.reputation.is_banned(p) and a]
        self._rng.shuffle(usable)
        usable.sort(key=lambda c: (bool(hop_hosts & {_host_of(a) for a in c[1]}),
                                   -self.reputation.score(c[0], now)))
        return usable

    async def _recompute(self, candidates: Sequence[tuple[bytes, tuple[str, ...]]], model: str,
                         span: tuple[int, int], wire: WireTensor, rows: int, timeout: float) -> _Answer | None:
        """The first valid FORWARD_ONCE answer among ``candidates`` (up to max_attempts)."""
        for peer_id, addrs in list(candidates)[: self.policy.max_attempts]:
            try:
                answer = await self._forward_once(peer_id, addrs, model, span, wire, rows, timeout)
            except SwarmError as exc:
                log.info("audit recompute on %s failed: %s", peer_id.hex()[:12], exc)
                self.reputation.record_timeout(peer_id, self.clock())
                continue
            self.stats.recomputed_tokens += wire.shape[1] * (span[1] - span[0])
            return answer
        return None

    async def _forward_once(self, peer_id: bytes, addrs: tuple[str, ...], model: str, span: tuple[int, int],
                            wire: WireTensor, rows: int, timeout: float) -> _Answer:
        conn = None
        last: SwarmError | None = None
        for addr in addrs:
            try:
                conn = await self.host.connect(addr, peer_id=peer_id, timeout=min(timeout, 10.0))
                break
            except SwarmError as exc:
                last = exc
        if conn is None:
            raise last or SwarmError("no address to reach the auditor")
        request, state = sign_forward_once(self.host.identity, server=peer_id, nonce=secrets.token_bytes(16),
                                           model=model, span=span, hidden=wire)
        result = await conn.request(request, timeout=timeout)
        accept_forward_once_result(state, request, result, server_public_key=conn.public_key)
        out = decode_tensor(result.hidden, out_dtype=torch.float32)
        return _Answer(peer_id=peer_id, public_key=conn.public_key, nonce=request.nonce,
                       request_signature=request.signature, output=result.hidden, output_signature=result.signature,
                       rows=out[:, -rows:])


def _host_of(addr: str) -> str:
    return addr.rsplit(":", 1)[0]
