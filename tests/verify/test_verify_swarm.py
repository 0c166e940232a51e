"""Honest swarms on loopback: forged fraud proofs are rejected and count against their
submitter, and paranoid audits of thousands of honest hop-steps flag nobody."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import trio

from peer._chain import Chain
from peer.api import Swarm
from protocol import FraudProofNotice, encode_tensor
from protocol.errors import ErrorCode, RemoteError
from verify import PARANOID, proof_from_transcript
from verify_helpers import reference, start


async def test_forged_fraud_proofs_against_an_honest_peer_are_rejected(tiny_verify):
    path, _ = tiny_verify
    async with trio.open_nursery() as nursery:
        accused = await start(nursery, path, (0, 3))
        verifier = await start(nursery, path, (0, 3), bootstrap=[accused.address])
        tail = await start(nursery, path, (3, 6), bootstrap=[accused.address])
        swarm = await Swarm.connect(nursery, bootstrap=[accused.address], model=path, audit=None)
        client = swarm.client
        # a real, honestly answered session on the accused, signed both ways
        route = await client.plan(0, 3, exclude=frozenset({verifier.identity.peer_id}))
        chain = Chain(client.host, model=client.model, max_length=16, replan=client._replan)
        await chain.open(route)
        await chain.step(client.head.embed([1, 5, 9]), 0)
        await chain.step(client.head.embed([33]), 3)
        hop = chain.hops[0]
        assert hop.hop.peer_id == accused.identity.peer_id
        proof = proof_from_transcript(accused=hop.conn.public_key, client=client.host.identity.public_key,
                                      model=client.model, span=hop.span, session=hop.session,
                                      transcript=hop.transcript, index=1)
        garbage = dataclasses.replace(proof, output=encode_tensor(torch.randn(1, 1, 64)))
        me = client.host.identity.peer_id

        async def submit(node, forged):
            conn = await client.host.connect(node.address, peer_id=node.identity.peer_id)
            with pytest.raises(RemoteError) as info:
                await conn.request(FraudProofNotice(proof=forged))
            return info.value.code

        # a holder recomputes and finds the accused honest; a bad signature fails before compute
        assert await submit(verifier, proof) == ErrorCode.INVALID_PROOF
        assert await submit(verifier, garbage) == ErrorCode.INVALID_PROOF
        # a non-holder asks an independent holder (the verifier), which says no
        assert await submit(tail, proof) == ErrorCode.INVALID_PROOF
        for node in (verifier, tail):
            assert not node.fraud.reputation.is_banned(accused.identity.peer_id)
            assert node.fraud.reputation.standing(me, 0).invalid_proofs >= 1  # counts against the framer
            assert node.fraud.reputation.score(me, 0) < 1.0
        assert not verifier.fraud.accepted
        assert not verifier.fraud.stored
        await chain.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_paranoid_audits_of_an_honest_swarm_flag_nobody(tiny_verify):
    """At least 2,000 audited hop-steps (p = 1) over several prompts; every audit passes."""
    path, model = tiny_verify
    prompts = [[1, 5, 9, 33, 7], [900, 3, 14], [42] * 9, [7, 8, 9, 10, 11, 12, 13]]
    new_tokens = 200
    async with trio.open_nursery() as nursery:
        first = await start(nursery, path, (0, 3))
        nodes = [first] + [await start(nursery, path, span, bootstrap=[first.address])
                           for span in [(0, 3), (3, 6), (3, 6)]]
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=path, audit=PARANOID)
        auditor = swarm.client.auditor
        i = 0
        while auditor.stats.audits < 2000:  # prompts in turn until 2,000 hop-steps were audited
            prompt = prompts[i % len(prompts)] + [i]
            result = await swarm.generate(prompt, max_new_tokens=new_tokens)
            assert result.token_ids == reference(model, prompt, new_tokens)
            i += 1
        assert auditor.stats.outcomes == {"passed": auditor.stats.audits}
        assert not swarm.client.reputation.banned
        for node in nodes:
            assert swarm.client.reputation.standing(node.identity.peer_id, 0).mismatches == 0
            assert not node.fraud.reputation.banned
        nursery.cancel_scope.cancel()
