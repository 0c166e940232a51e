"""Credit cannot be multiplied (issue 11, attack 4), on loopback with real servers.

A peer X really serves server S; X then signs receipts saying 50 fresh identities
served X just as much (they countersign), and S merges X's records over CREDIT_QUERY.
Transitive credit through X is conserved across requesters: the 50 together get at
most what X really did for S, not 50 times it."""

from __future__ import annotations

import functools

import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer.api import Swarm
from peer.node import ServeOptions, run_server
from protocol import Identity
from swarm.credit import countersign, make_receipt

LAYERS = 6
SYBILS = 50


async def test_a_sybil_receipt_fan_out_gets_at_most_the_real_contribution(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 eos_token_id=None)).save_pretrained(tmp_path)
    path = str(tmp_path)
    async with trio.open_nursery() as nursery:
        async def serve(bootstrap=(), identity=None):
            options = ServeOptions(model=path, blocks=(0, LAYERS), bootstrap=tuple(bootstrap))
            return await nursery.start(functools.partial(run_server, identity or Identity.generate(), options))

        s = await serve()
        x = await serve([s.address])
        # S's owner generates through X (S's identity, so X holds receipts S signed).
        owner = await Swarm.connect(nursery, bootstrap=[s.address], model=path, identity=s.identity, audit=None,
                                    local_recompute_bytes=0)
        owner.client.banned.add(s.identity.peer_id)
        for _ in range(2):
            await owner.generate([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=420)
        real = x.credit.ledger.latest(s.identity.public_key, x.identity.public_key)
        assert real is not None and real.work >= 5000  # X really did >= 5,000 units for S

        # X "was served" 5,000 units by each of 50 fresh identities, which countersign.
        sybils = [Identity.generate(bits=0) for _ in range(SYBILS)]  # receipt signers only: no DHT puzzle
        for y in sybils:
            x.credit.ledger.store(countersign(y, make_receipt(x.identity, y.public_key, bytes(32), 1, real.work)))

        # S merges X's records over the wire (CREDIT_QUERY / CREDIT_REPORT).
        conn = await s.host.connect(x.address, peer_id=x.identity.peer_id)
        await s.credit.exchange(conn)
        credits = [s.credit.credit_of(y.peer_id) for y in sybils]
        total = sum(c.total for c in credits)
        assert all(c.direct == 0 for c in credits)
        assert total <= real.work, (total, real.work)  # was 50 x 5,000 before conservation
        assert total > 0.9 * real.work  # the real contribution is passed on, not lost
        assert s.credit.credit_of(x.identity.peer_id).direct >= real.work - 1  # X's own credit stands
        nursery.cancel_scope.cancel()
