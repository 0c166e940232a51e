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
