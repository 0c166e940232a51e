"""A tiny swarm behind the delay proxy: real ``swarm-peer serve`` processes, each on its
own loopback address and dialling from it, a client on its own address, emulated
tokyo/seoul links; greedy tokens equal local ``transformers`` generate, and the proxy
saw the traffic of every pair (so nothing went around it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from bench.wanem import EmulatedSwarm, ServerSpec, Topology

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
PROMPT = [5, 17, 99, 3, 150, 42]
NEW_TOKENS = 12


def test_tiny_swarm_through_the_proxy_generates_identical_tokens(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "tiny")
    with torch.inference_mode():
        ref = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()

    topo = Topology.make([("client", "tokyo"), ("t0", "tokyo"), ("s0", "seoul")], bandwidth_mbit=50)
    servers = [ServerSpec(node="t0", blocks=(0, 2)), ServerSpec(node="s0", blocks=(2, 4))]
    with EmulatedSwarm(topo, str(tmp_path / "tiny"), servers, workdir=tmp_path / "emu",
                       env={"SWARM_PEER_CACHE": str(tmp_path / "cache")}) as emu:
        assert emu.overhead_line.startswith("wanem-proxy: overhead at zero delay")
        assert all(addr.startswith(topo.node(node).ip + ":") for node, addr in emu.addresses.items())

        async def generate() -> list[int]:
            async with trio.open_nursery() as nursery:
                swarm = await emu.connect(nursery, "client", audit=None, step_timeout=30.0)
                result = await swarm.generate(PROMPT, max_new_tokens=NEW_TOKENS, chat=False)
                await swarm.aclose()
            return result.token_ids

        tokens = trio.run(generate)
    assert tokens == ref
    report = emu.proxy_report
    for pair in ("client -> t0", "client -> s0", "t0 -> s0", "s0 -> t0"):  # relay hops and the servers' DHT
        assert pair in report, report
    assert "0 refused" in report
