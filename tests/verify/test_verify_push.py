"""Audits and fraud proofs of push steps (spec 11.4, 13.2): real servers on loopback,
a cheater that signs wrong outputs while its next hop computes on them."""

from __future__ import annotations

import trio

from peer.api import Swarm
from test_verify_cheaters import NEW_TOKENS, PROMPT, cheater_class
from verify import PARANOID
from verify_helpers import eventually, measured_fastest, reference, start


async def test_push_steps_are_audited_and_a_cheater_is_proven_and_rolled_back(tiny_verify, other_weights,
                                                                             monkeypatch):
    path, model = tiny_verify
    async with trio.open_nursery() as nursery:
        monkeypatch.setattr("peer.node.SpanServer", cheater_class("noise", other_weights))
        cheater = await start(nursery, path, (0, 3))
        monkeypatch.undo()
        honest = [await start(nursery, path, (0, 3), bootstrap=[cheater.address]) for _ in range(2)]
        tail = [await start(nursery, path, (3, 6), bootstrap=[cheater.address]) for _ in range(2)]
        swarm = await Swarm.connect(nursery, bootstrap=[tail[0].address], model=path, audit=PARANOID, relay="push")
        measured_fastest(swarm.client, cheater, honest)  # routing goes by measurements: route the cheater first
        cheater_id = cheater.identity.peer_id

        result = await swarm.generate(PROMPT, max_new_tokens=NEW_TOKENS)

        assert result.token_ids == reference(model, PROMPT, NEW_TOKENS)
        assert cheater.server.executor.cheats > 0
        assert swarm.client.reputation.is_banned(cheater_id)
        assert cheater_id.hex() not in [h.peer_id for h in result.route]
        assert result.pushed_steps >= NEW_TOKENS - 2  # pushed (and audited) before and after the conviction
        auditor = swarm.client.auditor
        assert auditor.stats.outcomes.get("passed", 0) >= NEW_TOKENS  # the honest hops' push steps passed
        # the proof built from a push step verifies on an independent holder
        await eventually(lambda: any(p.fraud.accepted for p in honest))
        for peer in (*honest, *tail):
            assert not swarm.client.reputation.is_banned(peer.identity.peer_id)
        nursery.cancel_scope.cancel()
