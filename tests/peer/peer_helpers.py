"""Helpers shared by the peer tests: in-process servers on loopback."""

from __future__ import annotations

import functools
import itertools

import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer.node import ServeOptions, run_server
from protocol import Identity


async def start_server(nursery, model, blocks, bootstrap=(), **kw):
    """One in-process serving peer (``peer.node.run_server``) on loopback."""
    options = ServeOptions(model=model, blocks=blocks, bootstrap=tuple(bootstrap), **kw)
    return await nursery.start(functools.partial(run_server, Identity.generate(), options))


async def wait_for_servers(swarm, peer_ids):
    """Until ``swarm``'s client sees every one of ``peer_ids`` announced (a fresh view
    each try; an announcement takes a DHT store to land, and a loaded machine delays
    it), for at most a minute."""
    wanted = set(peer_ids)
    with trio.fail_after(60):
        for attempt in itertools.count():
            view = await swarm.client.swarm_view(fresh=True)
            if wanted <= set(view.servers):
                return view
            await trio.sleep(min(1.0, 0.05 * 2**attempt))


def save_tiny_llama(path, *, layers: int = 6, max_positions: int = 128, special_tokens: bool = True):
    """A random 64-wide Llama of ``layers`` blocks (seed 0), saved at ``path``; returns it.
    ``special_tokens=False``: no BOS/EOS, so a greedy reference never stops early."""
    torch.manual_seed(0)
    ids = dict(eos_token_id=2, bos_token_id=1) if special_tokens else dict(eos_token_id=None, bos_token_id=None,
                                                                            pad_token_id=None)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, **ids)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def reference(model, prompt, n):
    """``transformers``' greedy continuation of ``prompt``: n token ids."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()
