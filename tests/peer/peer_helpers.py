"""Helpers shared by the peer tests: in-process servers on loopback."""

from __future__ import annotations

import functools

from peer.node import ServeOptions, run_server
from protocol import Identity


async def start_server(nursery, model, blocks, bootstrap=(), **kw):
    """One in-process serving peer (``peer.node.run_server``) on loopback."""
    options = ServeOptions(model=model, blocks=blocks, bootstrap=tuple(bootstrap), **kw)
    return await nursery.start(functools.partial(run_server, Identity.generate(), options))
