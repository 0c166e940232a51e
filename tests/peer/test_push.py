"""Server-to-server push (spec section 11.3) over real sockets on loopback: in-process
servers and clients, a tiny random Llama, compared with star relay and transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import trio

from transformers import LlamaConfig, LlamaForCausalLM

from peer.api import Swarm
from peer.server import SpanServer
from peer_helpers import start_server

NUM_LAYERS = 6
PROMPTS = [[1, 5, 9, 33, 7], [900, 2, 14]]
SPANS = [(0, 2), (2, 3), (3, 6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-push")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=2, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return str(path), model


def reference(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


async def swarm_of(nursery, model, spans):
    nodes = [await start_server(nursery, model, spans[0])]
    for span in spans[1:]:
        nodes.append(await start_server(nursery, model, span, bootstrap=[nodes[0].address]))
    return nodes


async def test_push_generation_equals_star_and_transformers(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        nodes = await swarm_of(nursery, path, SPANS)
        push = await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=path, relay="push", audit=0)
        star = await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=path, relay="star", audit=0)
        for prompt in PROMPTS:
            pushed = await push.generate(prompt, max_new_tokens=16)
            starred = await star.generate(prompt, max_new_tokens=16)
            assert pushed.token_ids == starred.token_ids == reference(model, prompt, 16)
            assert [(h.start, h.end) for h in pushed.route] == SPANS
            assert pushed.failovers == 0
            assert pushed.pushed_steps == 16 and starred.pushed_steps == 0
        nursery.cancel_scope.cancel()
