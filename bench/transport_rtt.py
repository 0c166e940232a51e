"""Request round-trip time of swarm.transport on loopback, against a raw trio TCP echo.

Both sides run in this one process (as in the baseline), so each number includes
both peers' work. For each payload size it measures:

* raw: trio TCP echo of the same number of bytes (send_all, then read until all back);
* swarm: ``PeerConnection.request`` round trip (CBOR encode/decode, Noise encrypt/
  decrypt, request-id matching, a handler task on the server side): ``Ping``/``Pong``
  and a ``Forward``/``ForwardResult`` carrying a 4096-element f32 tensor (16 KiB).

Prints microseconds per round trip (median of several runs) and swarm/raw ratios.
Usage: python bench/transport_rtt.py [--rounds N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
import time

import trio

from protocol._identity import Identity
from protocol._messages import Forward, ForwardResult, Ping, Pong
from protocol._tensor import WireTensor
from swarm.transport import Host

HIDDEN = 4096  # f32 elements: 16 KiB, one decode step of a 4096-wide model


def forward_request(hidden: WireTensor) -> Forward:
    return Forward(id=0, session=bytes(16), step=0, position=0, hidden=hidden, signature=bytes(64))


async def raw_echo_rtt(size: int, rounds: int) -> float:
    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        payload = b"x" * size
        start = time.perf_counter()
        for _ in range(rounds):
            await stream.send_all(payload)
            got = 0
            while got < size:
                got += len(await stream.receive_some(1 << 16))
        elapsed = time.perf_counter() - start
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return elapsed / rounds


async def swarm_rtts(rounds: int) -> tuple[float, float]:
    hidden = WireTensor(dtype="f32", shape=(1, 1, HIDDEN), data=bytes(4 * HIDDEN))
    server, client = Host(Identity.generate()), Host(Identity.generate())

    async def pong(conn, request):
        return Pong(id=request.id)

    async def forward(conn, request):
        return ForwardResult(id=request.id, session=request.session, step=request.step, hidden=request.hidden,
                             signature=bytes(64))

    server.add_handler(Ping, pong)
    server.add_handler(Forward, forward)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(client.run)
        conn = await client.connect(server.listen_addrs[0], peer_id=server.peer_id)
        results = []
        for request in (Ping(id=0), forward_request(hidden)):
            for _ in range(rounds // 10):  # warm-up
                await conn.request(request)
            start = time.perf_counter()
            for _ in range(rounds):
                await conn.request(request)
            results.append((time.perf_counter() - start) / rounds)
        nursery.cancel_scope.cancel()
    return results[0], results[1]


async def main(rounds: int, repeats: int) -> None:
    raw_small, raw_big, ping, fwd = [], [], [], []
    for _ in range(repeats):
        raw_small.append(await raw_echo_rtt(40, rounds))
        raw_big.append(await raw_echo_rtt(4 * HIDDEN + 200, rounds))
        p, f = await swarm_rtts(rounds)
        ping.append(p)
        fwd.append(f)
    rs, rb, p, f = (statistics.median(x) * 1e6 for x in (raw_small, raw_big, ping, fwd))
    print(f"round trips on loopback, one process, median of {repeats} x {rounds} (microseconds):")
    print(f"  raw trio TCP echo, 40 B      {rs:8.1f}")
    print(f"  raw trio TCP echo, 16 KiB    {rb:8.1f}")
    print(f"  swarm Ping/Pong              {p:8.1f}   ratio to raw 40 B:   {p / rs:5.2f}x  (+{p - rs:.1f} us)")
    print(f"  swarm Forward 16 KiB         {f:8.1f}   ratio to raw 16 KiB: {f / rb:5.2f}x  (+{f - rb:.1f} us)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.repeats)
