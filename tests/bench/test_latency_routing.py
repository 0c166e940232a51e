"""Latency-aware routing on the WAN emulator (issue 14 section 2): a client in "tokyo"
with replicas in tokyo (0:2 and 2:4) and one server holding the whole model in
"virginia" (150 ms away). Blind to latency (every RTT the planner's default), one hop
beats two and the route goes to virginia; measuring RTTs (PING on first contact),
the client routes through the tokyo replicas, and its tokens equal local generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import trio

from bench.wanem import EmulatedSwarm, ServerSpec, Topology
from protocol import Identity
from swarm.planning import plan_candidates

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
PROMPT = [5, 17, 99, 3, 150, 42]
NEW_TOKENS = 8


def test_a_client_in_tokyo_picks_the_near_replicas(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "tiny")
    with torch.inference_mode():
        ref = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()

    topo = Topology.make([("client", "tokyo"), ("tokyo-0", "tokyo"), ("tokyo-1", "tokyo"),
                          ("virginia-0", "virginia")], bandwidth_mbit=100)
    servers = [ServerSpec(node="virginia-0", blocks=(0, 4)), ServerSpec(node="tokyo-0", blocks=(0, 2)),
               ServerSpec(node="tokyo-1", blocks=(2, 4))]
    workdir = tmp_path / "emu"
    with EmulatedSwarm(topo, str(tmp_path / "tiny"), servers, workdir=workdir,
                       env={"SWARM_PEER_CACHE": str(tmp_path / "cache")}) as emu:
        peer = {s.node: Identity.load(workdir / f"{s.node}.key").peer_id for s in servers}

        async def run():
            async with trio.open_nursery() as nursery:
                swarm = await emu.connect(nursery, "client", audit=None, step_timeout=30.0)
                client = swarm.client
                result = await swarm.generate(PROMPT, max_new_tokens=NEW_TOKENS, chat=False)
                view = await client.swarm_view()
                measured = client.candidates(view)
                blind = [dataclasses.replace(c, rtt=client.costs.default_rtt) for c in measured]
                routes = {name: [h.peer_id for h in plan_candidates(cands, num_blocks=4).hops]
                          for name, cands in (("aware", measured), ("blind", blind))}
                rtts = {node: client.health.rtt(pid) for node, pid in peer.items()}
                await swarm.aclose()
            return result, routes, rtts

        result, routes, rtts = trio.run(run)
    assert result.token_ids == ref
    tokyo = [peer["tokyo-0"], peer["tokyo-1"]]
    assert [bytes.fromhex(h.peer_id) for h in result.route] == tokyo, rtts
    assert routes["aware"] == tokyo
    assert routes["blind"] == [peer["virginia-0"]]
    assert rtts["virginia-0"] > 0.1 > rtts["tokyo-0"], rtts  # what made the difference was measured
