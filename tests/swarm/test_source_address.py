"""``Host(source_host=...)``: outgoing connections leave from the given local address
(multi-homed hosts; the WAN emulator gives each peer its own 127.0.0.x)."""

from __future__ import annotations

import pytest
import trio

from protocol import Identity, Ping, Pong
from swarm.errors import PeerUnreachable
from swarm.transport import Host, PeerConnection

pytestmark = pytest.mark.timeout(60)


async def pong(conn: PeerConnection, request: Ping) -> Pong:
    return Pong()


async def test_outgoing_connection_binds_the_source_address() -> None:
    server = Host(Identity.generate(), host="127.0.0.1")
    server.add_handler(Ping, pong)
    client = Host(Identity.generate(), host="127.0.0.31", source_host="127.0.0.31")
    default = Host(Identity.generate(), host="127.0.0.1")
    seen: list[str] = []
    server.on_connection.append(lambda conn: seen.append(conn.address))
    async with trio.open_nursery() as nursery:
        for host in (server, client, default):
            await nursery.start(host.run)
        assert isinstance(await client.request(server.listen_addrs[0], Ping()), Pong)
        assert isinstance(await default.request(server.listen_addrs[0], Ping()), Pong)
        nursery.cancel_scope.cancel()
    assert seen[0].startswith("127.0.0.31:")
    assert seen[1].startswith("127.0.0.1:")  # default unchanged: the kernel's choice


async def test_unusable_source_address_is_peer_unreachable() -> None:
    server = Host(Identity.generate())
    client = Host(Identity.generate(), source_host="192.0.2.1")  # TEST-NET-1: not an address of this machine
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(client.run)
        with pytest.raises(PeerUnreachable):
            await client.connect(server.listen_addrs[0], timeout=5)
        nursery.cancel_scope.cancel()
