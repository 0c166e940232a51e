"""Helpers shared by the verification tests (imported by name: test dirs are not packages)."""

from __future__ import annotations

import functools

import torch
import trio

from peer.node import ServeOptions, run_server
from protocol import Identity


def reference(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


async def start(nursery: trio.Nursery, model: str, blocks, bootstrap=(), **kw):
    options = ServeOptions(model=model, blocks=blocks, bootstrap=tuple(bootstrap), **kw)
    return await nursery.start(functools.partial(run_server, Identity.generate(), options))


async def eventually(predicate, timeout: float = 30.0) -> None:
    """Wait (polling) until ``predicate()`` is true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def measured_fastest(client, fast, slow) -> None:
    """Make ``client`` have measured node ``fast`` fastest and the ``slow`` nodes slow
    (routing goes by what the client measured, not by announcements), so that its
    routes go through ``fast`` first."""
    now = trio.current_time()
    for node, seconds in [(fast, 0.0)] + [(s, 1.0) for s in slow]:
        client.health.observe_rtt(node.identity.peer_id, 0.001, now)
        client.health.observe_step(node.identity.peer_id, now, seconds=seconds, blocks=3, tokens=1, success=False)
