"""Many DHT peers in one trio process, on loopback: for tests, benchmarks and demos.

Each ``LocalPeer`` has its own identity, ``Host`` (127.0.0.1, port 0, unless
``host_options`` say otherwise: any 127.x.y.z is loopback, so a peer can listen on and
dial from its own address to look like a host of its own subnet) and ``DhtNode``,
running in its own cancel scope so that it can be killed alone (``kill``): its
listener and connections close as a crashed process's would.

Identities come from ``pool_identity``: deterministic identities whose puzzle was
solved once (``_pool``), so that a swarm of a hundred peers starts in no time.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol import Identity

from ..transport import Host
from ._node import DhtNode
from ._pool import POOL_SIZE, pool_identity
from ._records import RecordKind

__all__ = ["LocalPeer", "loopback_host", "pool_identity", "start_local_peer", "start_local_swarm"]


def loopback_host(subnet: int, host: int = 1) -> str:
    """``127.a.b.host`` with ``a.b`` = ``subnet``: one /24 per subnet number (1..65535)."""
    if not 0 < subnet < 65536 or not 0 < host < 255:
        raise ValueError("subnet must be 1..65535 and host 1..254")
    return f"127.{subnet >> 8}.{subnet & 255}.{host}"


@dataclass(slots=True, eq=False)
class LocalPeer:
    identity: Identity
    host: Host
    dht: DhtNode
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    alive: bool = True
    stopped: trio.Event = field(default_factory=trio.Event)  # set once killed and all closed

    @property
    def addr(self) -> str:
        return self.host.listen_addrs[0]

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    def kill(self) -> None:
        self.alive = False
        self.scope.cancel()


async def _serve(peer: LocalPeer, bootstrap: tuple[str, ...], *, task_status: trio.TaskStatus[None]) -> None:
    with peer.scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.host.run)
            await nursery.start(functools.partial(peer.dht.run, bootstrap=bootstrap))
            task_status.started()
    peer.alive = False
    peer.stopped.set()


async def start_local_peer(
    nursery: trio.Nursery,
    *,
    kinds: Mapping[str, RecordKind],
    bootstrap: tuple[str, ...] = (),
    identity: Identity | None = None,
    host_options: Mapping[str, Any] | None = None,
    **dht_options: Any,
) -> LocalPeer:
    """Start one peer in ``nursery``; returns once it listens and has bootstrapped."""
    identity = identity or Identity.generate()
    host = Host(identity, **(host_options or {}))
    peer = LocalPeer(identity=identity, host=host, dht=DhtNode(host, kinds=kinds, **dht_options))
    await nursery.start(_serve, peer, bootstrap)
    return peer


async def start_local_swarm(
    nursery: trio.Nursery, n: int, *, kinds: Mapping[str, RecordKind], rng: random.Random, **dht_options: Any
) -> list[LocalPeer]:
    """``n`` peers, each bootstrapping from one random earlier peer (the first from none);
    their identities are a random sample of the pool (beyond its size, derived anew)."""
    peers: list[LocalPeer] = []
    indexes = rng.sample(range(POOL_SIZE), min(n, POOL_SIZE)) + list(range(POOL_SIZE, max(n, POOL_SIZE)))
    for i in range(n):
        bootstrap = (rng.choice(peers).addr,) if peers else ()
        identity = pool_identity(indexes[i])
        peers.append(await start_local_peer(nursery, kinds=kinds, bootstrap=bootstrap, identity=identity,
                                            rng=random.Random(rng.random()), **dht_options))
    return peers
