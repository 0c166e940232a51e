"""Cheating servers on a real loopback swarm: each cheat is caught by a paranoid
client's audits, proven to a third peer, gossiped, stored in the DHT, banned, and the
client's greedy output equals the all-honest output.

The cheaters are test-only ``SpanServer`` subclasses installed with monkeypatch. Each
wraps its executor so that the outputs it signs are wrong in one way, and announces a
huge throughput (cheaters lure traffic); routing goes by what the client measured, so
each test makes the client have measured the cheater fastest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import trio

from bench._audit_attacks import TamperedJob
from peer.api import Swarm
from peer.runtime import load_span
from peer.server import SpanServer
from verify import PARANOID, AuditPolicy, fetch_proofs, verify_proof
from verify_helpers import eventually, measured_fastest, reference, start

PROMPT = [1, 5, 9, 33, 7, 250]
NEW_TOKENS = 14


class CheatingExecutor:
    """Delegates to a real executor and tampers with what it returns."""

    def __init__(self, real, mode: str, other: str | None) -> None:
        self._real = real
        self.mode = mode
        self.calls = 0
        self.cheats = 0
        self._history: dict[bytes, torch.Tensor] = {}
        self._last: torch.Tensor | None = None
        if mode == "other-weights":  # same shapes, another model's weights, same announced id
            wrong = load_span(other, real.start, real.end)
            real.layers.load_state_dict(wrong.layers.state_dict())

    def __getattr__(self, name):
        return getattr(self._real, name)

    def forward(self, session_id, hidden, position):
        return self._after_forward(session_id, hidden, self._real.forward(session_id, hidden, position))

    def forward_once(self, hidden, *, start=None, end=None):
        return self._tamper(self._real.forward_once(hidden, start=start, end=end), hidden)

    # The server computes in pieces (SpanExecutor.forward_job): tamper with the job's result.
    def forward_job(self, session_id, hidden, position, **kw):
        job = self._real.forward_job(session_id, hidden, position, **kw)
        return TamperedJob(job, lambda out: self._after_forward(session_id, hidden, out))

    # ... and decode steps of several sessions in one batch (SpanExecutor.forward_batch).
    def forward_batch(self, steps):
        outputs = self._real.forward_batch(steps)
        return [self._after_forward(s.session_id, s.hidden, out) for s, out in zip(steps, outputs, strict=True)]

    def forward_once_job(self, hidden, *, start=None, end=None, **kw):
        job = self._real.forward_once_job(hidden, start=start, end=end, **kw)
        return TamperedJob(job, lambda out: self._tamper(out, hidden))

    def _after_forward(self, session_id, hidden, out):
        history = self._history.get(session_id)
        history = hidden if history is None else torch.cat([history, hidden], dim=1)
        self._history[session_id] = history
        return self._tamper(out, history)

    def _tamper(self, out: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        previous, self._last = self._last, out.clone()
        mode = self.mode
        if mode in ("other-weights", "int8"):
            self.cheats += 1  # the weights do the cheating
            return out
        if mode == "sometimes":  # one step in ten, starting with the 4th
            if self.calls % 10 != 4:
                return out
            mode = "noise"
        self.cheats += 1
        if mode == "noise":
            return out + 0.01 * out.norm(dim=-1, keepdim=True) / out.shape[-1] ** 0.5 * torch.randn_like(out)
        if mode == "garbage":
            return torch.randn_like(out) * out.std()
        if mode == "stale":  # the previous answer of the same shape, replayed
            return previous if previous is not None and previous.shape == out.shape else out.flip(1)
        if mode == "skip-block":
            return self._real.forward_once(history, start=self._real.start, end=self._real.end - 1)[:, -out.shape[1]:]
        raise AssertionError(mode)


def cheater_class(mode: str, other: str | None):
    class Cheater(SpanServer):
        def __init__(self, host, executor, **kw):
            super().__init__(host, CheatingExecutor(executor, mode, other), **kw)

        def make_announcement(self, expires, throughput):
            return dataclasses.replace(super().make_announcement(expires, throughput), throughput=throughput * 1000)

    return Cheater


MODES = ["noise", "garbage", "stale", "other-weights", "skip-block", "int8", "sometimes"]


@pytest.mark.parametrize("mode", MODES)
async def test_cheater_is_caught_proven_banned_and_output_is_honest(tiny_verify, other_weights, monkeypatch, mode):
    path, model = tiny_verify
    async with trio.open_nursery() as nursery:
        monkeypatch.setattr("peer.node.SpanServer", cheater_class(mode, other_weights))
        cheater = await start(nursery, path, (0, 3), quant="int8" if mode == "int8" else None)
        monkeypatch.undo()
        honest = [await start(nursery, path, (0, 3), bootstrap=[cheater.address]) for _ in range(2)]
        tail = await start(nursery, path, (3, 6), bootstrap=[cheater.address])
        swarm = await Swarm.connect(nursery, bootstrap=[tail.address], model=path, audit=PARANOID)
        measured_fastest(swarm.client, cheater, honest)
        cheater_id = cheater.identity.peer_id

        result = await swarm.generate(PROMPT, max_new_tokens=NEW_TOKENS)

        assert result.token_ids == reference(model, PROMPT, NEW_TOKENS)
        assert cheater.executor is not None
        assert cheater.server.executor.cheats > 0  # it did cheat, and was used
        auditor = swarm.client.auditor
        assert auditor.stats.outcomes.get("cheat", 0) + auditor.stats.outcomes.get("auditor-cheat", 0) >= 1
        assert swarm.client.reputation.is_banned(cheater_id)
        assert cheater_id.hex() not in [h.peer_id for h in result.route]
        # the holders verified the proof by recomputing and ban; gossip took it to the tail,
        # which cannot recompute [0, 3): holders vouch for it there, a mark but no ban
        await eventually(lambda: all(p.fraud.reputation.is_banned(cheater_id) for p in honest))
        assert all(p.fraud.accepted for p in honest)
        await eventually(lambda: tail.fraud.endorsed)
        assert not tail.fraud.reputation.is_banned(cheater_id)
        assert tail.fraud.reputation.score(cheater_id, 0) < 1
        # the proof is in the DHT under the cheater's key, and verifies anywhere
        await eventually(lambda: any(p.fraud.stored for p in honest))
        stored = await fetch_proofs(tail.dht, cheater_id)
        assert stored
        assert verify_proof(stored[0], honest[0].executor).ok is False
        # banned everywhere it reaches: the cheater is refused as a requester too
        assert cheater_id in honest[0].server.banned
        # a client that joins later (and audits nothing) learns of the proof from the DHT
        late = await Swarm.connect(nursery, bootstrap=[honest[1].address], model=path, audit=None)
        late_result = await late.generate(PROMPT, max_new_tokens=3)
        assert late.client.reputation.is_banned(cheater_id)
        assert cheater_id.hex() not in [h.peer_id for h in late_result.route]
        # an honest peer was never blamed
        for peer in (*honest, tail):
            assert not swarm.client.reputation.is_banned(peer.identity.peer_id)
            assert swarm.client.reputation.standing(peer.identity.peer_id, 0).mismatches == 0
        nursery.cancel_scope.cancel()


async def test_rollback_after_a_late_detection_gives_the_honest_text(tiny_verify, other_weights, monkeypatch):
    """Audits at p < 1 only start after the cheater's wrong outputs were used: the client
    finds where they went wrong, rolls back, rewinds the stream, and ends honest."""
    path, model = tiny_verify
    async with trio.open_nursery() as nursery:
        monkeypatch.setattr("peer.node.SpanServer", cheater_class("noise", other_weights))
        cheater = await start(nursery, path, (0, 3))
        monkeypatch.undo()
        honest = [await start(nursery, path, (0, 3), bootstrap=[cheater.address]) for _ in range(2)]
        tail = await start(nursery, path, (3, 6), bootstrap=[cheater.address])
        swarm = await Swarm.connect(nursery, bootstrap=[tail.address], model=path, audit=AuditPolicy(rate=0.0))
        from verify import Auditor

        # The cheater's outputs must be used before audits start: make it the one this client
        # measured fastest, so that the route goes through it (routing uses measurements).
        measured_fastest(swarm.client, cheater, honest)

        class LateAuditor(Auditor):  # audits nothing for the first 6 steps, everything after
            def should_audit(self, peer=None):
                self.stats.sampled += 1
                return self.stats.sampled > 6

        client = swarm.client
        client.auditor = LateAuditor(client.host, client.audit_candidates, client.reputation,
                                     local=client.fraud.local, policy=AuditPolicy(rate=1.0))
        events = [e async for e in swarm.stream(PROMPT, max_new_tokens=NEW_TOKENS)]
        kept: list[int] = []
        for e in events:  # what a consumer that honours ``rewind`` ends up with
            del kept[len(kept) - e.rewind:]
            kept.append(e.token_id)
        honest = [t for t in reference(model, PROMPT, NEW_TOKENS) if t != 2]
        assert kept == honest
        assert any(e.rewind for e in events)
        assert client.reputation.is_banned(cheater.identity.peer_id)
        nursery.cancel_scope.cancel()
