"""Batching across sessions on loopback: many clients generating at once through one
server whose scheduler computes their decode steps as one forward get the greedy tokens
each gets alone, and that transformers' ``generate`` gives. Real server, real sockets,
signed steps, a random-weight Llama."""

from __future__ import annotations

import functools

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer.api import Swarm
from peer.node import ServeOptions, run_server
from peer_helpers import wait_for_servers
from protocol import Identity

LAYERS = 4
CLIENTS = 8
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-batching")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 eos_token_id=None, bos_token_id=None, pad_token_id=None)).save_pretrained(path)
    return str(path)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)  # different lengths: the sessions sit at different positions
    return [torch.randint(3, 1000, (3 + 2 * i,), generator=g).tolist() for i in range(CLIENTS)]


def reference(path: str, prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


async def test_concurrent_clients_get_their_lone_greedy_tokens(model_dir):
    expected = [reference(model_dir, p) for p in prompts()]
    async with trio.open_nursery() as nursery:
        options = ServeOptions(model=model_dir, blocks=(0, LAYERS), compute_slots=1, max_sessions=CLIENTS)
        server = await nursery.start(functools.partial(run_server, Identity.generate(), options))
        swarms = [await Swarm.connect(nursery, bootstrap=[server.address], model=model_dir)
                  for _ in range(CLIENTS)]
        alone = (await swarms[0].generate(prompts()[0], max_new_tokens=NEW_TOKENS)).token_ids
        assert alone == expected[0]
        assert server.server.stats.batched_steps == 0
        results: dict[int, list[int]] = {}

        async def generate(i: int) -> None:
            results[i] = (await swarms[i].generate(prompts()[i], max_new_tokens=NEW_TOKENS)).token_ids

        async with trio.open_nursery() as clients:
            for i in range(CLIENTS):
                clients.start_soon(generate, i)
        stats = server.server.stats
        print(f"{stats.batched_steps} of {stats.steps} steps batched, largest batch {stats.largest_batch}")
        assert [results[i] for i in range(CLIENTS)] == expected
        assert stats.batched_steps >= 2
        assert stats.largest_batch >= 2  # (how many depends on timing)
        nursery.cancel_scope.cancel()


async def test_pushed_steps_are_batched_too(model_dir):
    # Server-to-server push reaches the same batching as star: each hop of two computes
    # the concurrent sessions' pushed steps together, and every token is the lone one.
    expected = [reference(model_dir, p) for p in prompts()]
    half = LAYERS // 2
    async with trio.open_nursery() as nursery:
        nodes = []
        for blocks in ((0, half), (half, LAYERS)):
            options = ServeOptions(model=model_dir, blocks=blocks, compute_slots=1, max_sessions=CLIENTS,
                                   bootstrap=tuple(n.address for n in nodes[:1]))
            nodes.append(await nursery.start(functools.partial(run_server, Identity.generate(), options)))
        swarms = [await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=model_dir, relay="push")
                  for _ in range(CLIENTS)]
        for swarm in swarms:
            await wait_for_servers(swarm, [n.identity.peer_id for n in nodes])
        results: dict[int, object] = {}

        async def generate(i: int) -> None:
            results[i] = await swarms[i].generate(prompts()[i], max_new_tokens=NEW_TOKENS)

        async with trio.open_nursery() as clients:
            for i in range(CLIENTS):
                clients.start_soon(generate, i)
        assert [results[i].token_ids for i in range(CLIENTS)] == expected  # type: ignore[attr-defined]
        assert all(results[i].pushed_steps == NEW_TOKENS for i in range(CLIENTS))  # type: ignore[attr-defined]
        for node in nodes:
            stats = node.server.stats
            print(f"{stats.batched_steps} of {stats.steps} pushed steps batched, largest batch {stats.largest_batch}")
            assert stats.batched_steps >= 2
            assert stats.largest_batch >= 2
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_audits_of_batched_steps_pass(model_dir):
    # Two servers of the span, every step audited: each step a server computes (in a
    # batch or alone, as it comes) is recomputed by the other (FORWARD_ONCE, alone) and
    # compared with the audit's f32 tolerance. (That a batched step passes that
    # comparison whatever the timing is tests/peer/runtime/test_runtime_batch.py's.)
    clients, tokens = CLIENTS, 5
    expected = [reference(model_dir, p)[:tokens] for p in prompts()[:clients]]
    async with trio.open_nursery() as nursery:
        nodes = []
        for _ in range(2):
            options = ServeOptions(model=model_dir, blocks=(0, LAYERS), max_sessions=CLIENTS,
                                   bootstrap=tuple(n.address for n in nodes[:1]))
            nodes.append(await nursery.start(functools.partial(run_server, Identity.generate(), options)))
        swarms = [await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=model_dir, audit=1.0)
                  for _ in range(clients)]
        for swarm in swarms:  # both replicas, or a step may find no independent auditor
            await wait_for_servers(swarm, [n.identity.peer_id for n in nodes])
        results: dict[int, list[int]] = {}

        async def generate(i: int) -> None:
            results[i] = (await swarms[i].generate(prompts()[i], max_new_tokens=tokens)).token_ids

        async with trio.open_nursery() as group:
            for i in range(clients):
                group.start_soon(generate, i)
        assert [results[i] for i in range(clients)] == expected
        outcomes: dict[str, int] = {}
        for swarm in swarms:
            assert not swarm.client.reputation.banned
            for outcome, count in swarm.client.auditor.stats.outcomes.items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
        batched = sum(n.server.stats.batched_steps for n in nodes)
        print(f"audit outcomes {outcomes}; {batched} steps batched")
        assert set(outcomes) == {"passed"}
        assert outcomes["passed"] >= clients * tokens
        nursery.cancel_scope.cancel()
