"""The attacks measured in issue 11, as regression tests on real loopback swarms.

1. A cheater with one honest co-holder (a small fixed offset on FORWARD, honest
   FORWARD_ONCE, the default audit rate): convicted or routed around; honest tokens.
2. Two colluders (the same deterministic offset on FORWARD and FORWARD_ONCE) and one
   honest holder, a paranoid client: the honest holder is banned by nobody, even when
   the colluders vouch for proofs against it; honest tokens.
3. A framing proof (random N(0, 1) inputs, the honest server's genuine signed
   outputs) on a model where such inputs put honest rounding past the calibrated
   thresholds: refused (INVALID_PROOF) by holders and non-holders; nobody bans.

The cheaters are test-only ``SpanServer`` subclasses installed with monkeypatch (as in
``test_verify_cheaters``); they announce a huge throughput, but routing goes by what
the client measured, so where a test needs the cheater routed first its honest
co-holder is a slower one.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import trio

from bench._audit_attacks import OffsetExecutor, TamperedJob
from peer._chain import Chain
from peer.api import Swarm
from peer.runtime import load_span
from peer.server import SpanServer
from protocol import FraudProofAck, FraudProofNotice, decode_tensor
from protocol.errors import ErrorCode, RemoteError
from verify import PARANOID, AuditPolicy, History, compare, proof_from_transcript, tolerance_for
from verify_helpers import eventually, reference, start

PROMPT = [1, 5, 9, 33, 7, 250]
NEW_TOKENS = 10


def offset_server(*, once_too: bool, delay: float = 0.0):
    class Offset(SpanServer):
        def __init__(self, host, executor, **kw):
            if delay:
                executor = SlowExecutor(executor, delay)
            super().__init__(host, OffsetExecutor(executor, once_too=once_too, offset=0.01), **kw)

        def make_announcement(self, expires, throughput):
            return dataclasses.replace(super().make_announcement(expires, throughput), throughput=throughput * 1000)

    return Offset


async def start_cheater(nursery, monkeypatch, path, *, once_too: bool, bootstrap=(), delay: float = 0.0):
    monkeypatch.setattr("peer.node.SpanServer", offset_server(once_too=once_too, delay=delay))
    try:
        return await start(nursery, path, (0, 3), bootstrap=bootstrap)
    finally:
        monkeypatch.undo()


class SlowExecutor:
    """A real, honest executor that takes ``delay`` seconds longer per request: routing
    goes by measured speed (issue 10 item 7), so a slower honest co-holder makes the
    client pick the cheater first, as a cheater that is simply faster would be."""

    def __init__(self, real, delay: float, *, once_only: bool = False) -> None:
        self._real = real
        self.delay = delay
        self.once_only = once_only  # only FORWARD_ONCE (probes, audits) is slow

    def __getattr__(self, name):
        return getattr(self._real, name)

    def forward(self, session_id, hidden, position):
        if not self.once_only:
            time.sleep(self.delay)  # runs in the compute thread, like the real work
        return self._real.forward(session_id, hidden, position)

    def forward_once(self, hidden, *, start=None, end=None):
        time.sleep(self.delay)
        return self._real.forward_once(hidden, start=start, end=end)

    def forward_job(self, session_id, hidden, position, **kw):
        job = self._real.forward_job(session_id, hidden, position, **kw)
        return job if self.once_only else TamperedJob(job, delay=self.delay)

    def forward_batch(self, steps):
        if not self.once_only:
            time.sleep(self.delay)
        return self._real.forward_batch(steps)

    def forward_once_job(self, hidden, **kw):
        return TamperedJob(self._real.forward_once_job(hidden, **kw), delay=self.delay)


async def start_slow(nursery, monkeypatch, path, span, *, delay: float, bootstrap=(), once_only: bool = False):
    class Slow(SpanServer):
        def __init__(self, host, executor, **kw):
            super().__init__(host, SlowExecutor(executor, delay, once_only=once_only), **kw)

    monkeypatch.setattr("peer.node.SpanServer", Slow)
    try:
        return await start(nursery, path, span, bootstrap=bootstrap)
    finally:
        monkeypatch.undo()


def honest_peers_ban_nobody_honest(peers, honest_ids):
    for peer in peers:
        for honest_id in honest_ids:
            assert not peer.reputation.is_banned(honest_id)


@pytest.mark.parametrize("local", [True, False], ids=["client-recomputes", "votes-only"])
async def test_a_cheater_with_one_honest_co_holder_is_convicted_or_routed_around(tiny_verify, monkeypatch, local):
    path, model = tiny_verify
    async with trio.open_nursery() as nursery:
        cheater = await start_cheater(nursery, monkeypatch, path, once_too=False)
        honest = await start_slow(nursery, monkeypatch, path, (0, 3), delay=0.25, bootstrap=[cheater.address])
        tail = await start(nursery, path, (3, 6), bootstrap=[cheater.address])
        swarm = await Swarm.connect(nursery, bootstrap=[tail.address], model=path, audit=AuditPolicy(),
                                    local_recompute_bytes=1 << 30 if local else 0)
        cheater_id, honest_id = cheater.identity.peer_id, honest.identity.peer_id

        result = await swarm.generate(PROMPT, max_new_tokens=NEW_TOKENS)

        assert result.token_ids == reference(model, PROMPT, NEW_TOKENS)
        assert cheater.server.executor.cheats > 0  # it was used, and cheated
        assert cheater_id.hex() not in [h.peer_id for h in result.route]  # routed around
        client = swarm.client
        outcomes = client.auditor.stats.outcomes
        if local:  # the client's own recomputation convicts it; the holder verifies the proof too
            assert outcomes.get("cheat", 0) >= 1
            assert client.reputation.is_banned(cheater_id)
            await eventually(lambda: honest.fraud.reputation.is_banned(cheater_id))
            assert result.fully_verified
            assert result.verified_fraction == 1.0
        else:  # one against one: nobody can be convicted, the step is redone on the other
            assert outcomes.get("inconclusive", 0) >= 1
            assert not client.reputation.is_banned(cheater_id)
            # the tail has no co-holder and the client cannot recompute: reported, not hidden
            assert [(h.peer_id, h.start, h.end) for h in result.unverifiable_hops] == \
                [(tail.identity.peer_id.hex(), 3, 6)]
            assert result.verified_fraction is not None
            assert result.verified_fraction < 1.0
            assert result.to_dict()["verification"]["unverifiable_hops"][0]["blocks"] == [3, 6]
        honest_peers_ban_nobody_honest([client, honest.fraud, tail.fraud], [honest_id, tail.identity.peer_id])
        nursery.cancel_scope.cancel()


async def test_a_convicted_hop_is_replaced_by_holders_whose_audits_timed_out(tiny_verify, monkeypatch):
    """bench/audit.py's "3 holders, 0 colluding, established cheater" crashed: both
    honest holders' audit recomputations ran past the step's deadline on a loaded
    machine, which struck them off the generation's holders; the client's own
    recomputation then convicted the cheater and no replacement was left
    (AllCandidatesFailed). An auditor that times out is only backed off, and a
    disputed hop's replacement may be a backed-off holder."""
    path, model = tiny_verify
    async with trio.open_nursery() as nursery:
        cheater = await start_cheater(nursery, monkeypatch, path, once_too=False)
        honest = [await start_slow(nursery, monkeypatch, path, (0, 3), delay=3.0, once_only=True,
                                   bootstrap=[cheater.address]) for _ in range(2)]
        tail = await start(nursery, path, (3, 6), bootstrap=[cheater.address])
        swarm = await Swarm.connect(nursery, bootstrap=[tail.address], model=path, audit=AuditPolicy(rate=1.0),
                                    local_recompute_bytes=1 << 30)
        client = swarm.client
        cheater_id = cheater.identity.peer_id
        now = time.time()  # established here: its audits ask voters before the client's own copy
        client.reputation.history[cheater_id] = History(first_seen=now - 2 * 86400, passes=50.0, updated=now)

        result = await swarm.generate(PROMPT, max_new_tokens=4)

        assert result.token_ids == reference(model, PROMPT, 4)
        assert client.auditor.stats.outcomes.get("cheat", 0) >= 1
        assert client.reputation.is_banned(cheater_id)
        assert result.route[0].peer_id in {h.identity.peer_id.hex() for h in honest}
        honest_peers_ban_nobody_honest([client, *(h.fraud for h in honest), tail.fraud],
                                       [h.identity.peer_id for h in honest])
        nursery.cancel_scope.cancel()


def vouch_for_anything(node):
    """A colluder's proof service: accepts (bans, gossips) every proof it is sent."""
    service = node.fraud

    async def verify(proof, *, sender=None):
        from verify import proof_digest

        digest = proof_digest(proof)
        service.accepted[digest] = proof
        service._accept(digest, proof, sender)
        return digest

    service.verify = verify


async def framing_proof(swarm, target, *, span=(0, 3), steps=3, hidden_of=None):
    """Proofs (one per step) against ``target`` built from a real session on it: its
    outputs are genuine."""
    client = swarm.client
    route = await client.plan(*span, exclude=frozenset(p for p in (await client.swarm_view()).servers
                                                       if p != target.identity.peer_id))
    chain = Chain(client.host, model=client.model, max_length=64, replan=client._replan)
    await chain.open(route)
    position = 0
    for step in range(steps):
        x = client.head.embed([1, 5, 9] if step == 0 else [33 + step]) if hidden_of is None else hidden_of(step)
        await chain.step(x, position)
        position += x.shape[1]
    hop = chain.hops[0]
    assert hop.hop.peer_id == target.identity.peer_id
    proofs = [proof_from_transcript(accused=hop.conn.public_key, client=client.host.identity.public_key,
                                    model=client.model, span=hop.span, session=hop.session,
                                    transcript=hop.transcript, index=k) for k in range(steps)]
    await chain.aclose()
    return proofs


async def send_proof(client, node, proof):
    """FRAUD_PROOF to ``node``: True (accepted), or the ERROR code. (The verdict is
    what is tested, not its time: a recomputation on a loaded machine may take more
    than the default 10 s.)"""
    conn = await client.host.connect(node.address, peer_id=node.identity.peer_id)
    try:
        ack = await conn.request(FraudProofNotice(proof=proof), timeout=120)
    except RemoteError as exc:
        return exc.code
    assert isinstance(ack, FraudProofAck)
    return ack.accepted


@pytest.mark.parametrize(("local", "honest_first"), [(True, False), (False, False), (False, True)],
                         ids=["client-recomputes", "votes-only", "votes-only-honest-routed-first"])
async def test_colluding_holders_never_get_the_honest_one_banned(tiny_verify, monkeypatch, local, honest_first):
    """Routing goes by measured speed: the slower side is routed second. With a
    colluder routed first, the dispute moves the hop to the honest holder; with the
    honest holder first, the colluders' lighter votes must not move it off."""
    path, model = tiny_verify
    async with trio.open_nursery() as nursery:
        slow_colluders, slow_honest = (0.25, 0.0) if honest_first else (0.0, 0.25)
        first = await start_cheater(nursery, monkeypatch, path, once_too=True, delay=slow_colluders)
        second = await start_cheater(nursery, monkeypatch, path, once_too=True, bootstrap=[first.address],
                                     delay=slow_colluders)
        honest = await start_slow(nursery, monkeypatch, path, (0, 3), delay=slow_honest, bootstrap=[first.address])
        tail = await start(nursery, path, (3, 6), bootstrap=[first.address])
        for colluder in (first, second):
            vouch_for_anything(colluder)
        swarm = await Swarm.connect(nursery, bootstrap=[tail.address], model=path, audit=PARANOID,
                                    local_recompute_bytes=1 << 30 if local else 0)
        client = swarm.client
        honest_id = honest.identity.peer_id
        colluders = {first.identity.peer_id, second.identity.peer_id}
        if not local:  # votes only: the honest holder has a history with this client, the colluders none
            now = time.time()
            client.reputation.history[honest_id] = History(first_seen=now - 2 * 86400, passes=50.0, updated=now)

        result = await swarm.generate(PROMPT, max_new_tokens=NEW_TOKENS)

        assert result.token_ids == reference(model, PROMPT, NEW_TOKENS)
        assert first.server.executor.cheats + second.server.executor.cheats > 0
        assert [h.peer_id for h in result.route][0] == honest_id.hex()
        if local:  # each colluder routed as a hop is convicted by the client's own recomputation
            # (routing goes by measured speed, so the second may never be routed at all)
            hops = [c.identity.peer_id for c in (first, second) if c.server.executor.forwards]
            assert hops
            assert all(client.reputation.is_banned(c) for c in hops)
            assert result.fully_verified
        else:  # the vote never let two fresh identities outweigh the established holder
            assert not any(client.reputation.is_banned(c) for c in colluders)
            assert not result.fully_verified  # and the generation says it could not verify
            assert client.reputation.standing(honest_id, time.time()).mismatches == 0

        # The colluders frame the honest holder with a proof of its genuine outputs and
        # vouch for it: the holder's own recomputation and the client's refuse it; the
        # tail (no copy of the span) only marks it, and bans nobody.
        proof = (await framing_proof(swarm, honest))[-1]
        assert await send_proof(client, first, proof) is True  # a colluder "accepts" (and gossips) it
        assert await send_proof(client, honest, proof) == ErrorCode.INVALID_PROOF
        assert await send_proof(client, tail, proof) is True  # endorsed by the other colluder: a mark only
        assert tail.fraud.endorsed
        assert not tail.fraud.accepted
        honest_peers_ban_nobody_honest([client, honest.fraud, tail.fraud], [honest_id, tail.identity.peer_id])
        nursery.cancel_scope.cancel()


async def test_a_framing_proof_with_random_inputs_is_refused_and_bans_nobody(ill_conditioned):
    """N(0, 1) hidden states: no model produces them, and on this model they make the
    honest session output and a one-shot recomputation differ by more than the f32
    threshold, so the old comparison convicted. The spread rule does not."""
    path = ill_conditioned
    async with trio.open_nursery() as nursery:
        accused = await start(nursery, path, (0, 6))
        verifier = await start(nursery, path, (0, 6), bootstrap=[accused.address])
        tail = await start(nursery, path, (3, 6), bootstrap=[accused.address])  # not a holder of [0, 6)
        framer = await Swarm.connect(nursery, bootstrap=[accused.address], model=path, audit=None,
                                     local_recompute_bytes=0)
        bystander = await Swarm.connect(nursery, bootstrap=[accused.address], model=path, audit=None)
        torch.manual_seed(3)
        inputs = [torch.randn(1, 8 if k == 0 else 1, 64) for k in range(24)]
        proofs = await framing_proof(framer, accused, span=(0, 6), steps=len(inputs), hidden_of=lambda k: inputs[k])
        # the step where the honest output is farthest from a one-shot recomputation
        span = load_span(path, 0, 6)
        tolerance = tolerance_for("f32")
        worst, proof = 0.0, None
        for p in proofs:
            prefix = torch.cat([decode_tensor(r.hidden) for r in p.requests], dim=1)
            once = span.forward_once(prefix)[:, -p.output.shape[1]:]
            verdict = compare(decode_tensor(p.output), once, tolerance=tolerance, depth=6)
            if verdict.rel_l2 > worst:
                worst, proof = verdict.rel_l2, p
        assert worst > tolerance.max_rel_l2(6), "the old rule would not have convicted: not a framing case"

        assert await send_proof(framer.client, verifier, proof) == ErrorCode.INVALID_PROOF  # holder recomputes
        assert await send_proof(framer.client, tail, proof) == ErrorCode.INVALID_PROOF  # asks the holders
        bystander_service = bystander.client.fraud
        with pytest.raises(Exception, match="honest"):  # a client with its own copy recomputes it
            await bystander_service.verify(proof)
        accused_id = accused.identity.peer_id
        for reputation in (verifier.fraud.reputation, tail.fraud.reputation, bystander.client.reputation):
            assert not reputation.is_banned(accused_id)
        assert verifier.fraud.reputation.standing(framer.client.host.peer_id, time.time()).invalid_proofs > 0.9
        assert not verifier.fraud.accepted
        assert not verifier.fraud.stored
        nursery.cancel_scope.cancel()
