"""Request round-trip time of swarm.transport on loopback, against a raw trio TCP echo.

Both sides run in this one process (as in the baseline), so each number includes
both peers' work. For each payload size it measures:

* raw: trio TCP echo of the same number of bytes (send_all, then read until all back);
* trio model: the transport's task structure with plain bytes (reader tasks, a task
  per request on the server, a send lock, an Event per request): what trio costs;
* sans-IO: encode + encrypt + decrypt + decode of request and response, no I/O;
* swarm: ``PeerConnection.request`` round trip (CBOR encode/decode, Noise encrypt/
  decrypt, request-id matching, a handler task on the server side): ``Ping``/``Pong``
  and a ``Forward``/``ForwardResult`` carrying a 4096-element f32 tensor (16 KiB).

Prints microseconds per round trip (median and best of several runs) and swarm/raw ratios.
Usage: python bench/transport_rtt.py [--rounds N] [--repeats R] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import trio

from protocol import (
    Connection,
    Forward,
    ForwardResult,
    Identity,
    Message,
    Ping,
    Pong,
    Role,
    WireTensor,
    decode_message,
    encode_message,
)
from swarm.transport import Host, PeerConnection

HIDDEN = 4096  # f32 elements: 16 KiB, one decode step of a 4096-wide model
clock = time.perf_counter  # --clock cpu: time.process_time, steadier on a loaded machine


def forward_request(hidden: WireTensor) -> Forward:
    return Forward(session=bytes(16), step=0, position=0, hidden=hidden, signature=bytes(64))


async def raw_echo_rtt(size: int, rounds: int) -> float:
    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        payload = b"x" * size
        start = clock()
        for _ in range(rounds):
            await stream.send_all(payload)
            got = 0
            while got < size:
                got += len(await stream.receive_some(1 << 16))
        elapsed = clock() - start
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return elapsed / rounds


async def trio_model_rtt(size: int, rounds: int) -> float:
    """The transport's task structure with plain bytes: a reader task per side, a task
    spawned per request on the server, sends under a StrictFIFOLock, the requester woken
    by an Event under a deadline. No framing, crypto or CBOR: what trio itself costs."""
    async def server(stream: trio.SocketStream) -> None:
        lock = trio.StrictFIFOLock()

        async def handle(data: bytes) -> None:
            async with lock:
                await stream.send_all(data)

        async with trio.open_nursery() as nursery:
            got = 0
            while data := await stream.receive_some(1 << 16):
                got += len(data)
                if got >= size:
                    got = 0
                    nursery.start_soon(handle, b"y" * size)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        waiting: list[trio.Event] = []

        async def reader() -> None:
            got = 0
            while data := await stream.receive_some(1 << 16):
                got += len(data)
                if got >= size:
                    got = 0
                    waiting.pop().set()

        nursery.start_soon(reader)
        lock = trio.StrictFIFOLock()
        payload = b"x" * size
        start = clock()
        for _ in range(rounds):
            event = trio.Event()
            waiting.append(event)
            with trio.CancelScope(deadline=trio.current_time() + 10):
                async with lock:
                    await stream.send_all(payload)
                await event.wait()
        elapsed = clock() - start
        nursery.cancel_scope.cancel()
    return elapsed / rounds


async def swarm_rtts(rounds: int) -> tuple[float, float]:
    hidden = WireTensor(dtype="f32", shape=(1, 1, HIDDEN), data=bytes(4 * HIDDEN))
    server, client = Host(Identity.generate()), Host(Identity.generate())

    async def pong(conn: PeerConnection, request: Ping) -> Pong:
        return Pong()

    async def forward(conn: PeerConnection, request: Forward) -> ForwardResult:
        return ForwardResult(session=request.session, step=request.step, hidden=request.hidden,
                             signature=bytes(64))

    server.add_handler(Ping, pong)
    server.add_handler(Forward, forward)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(client.run)
        conn = await client.connect(server.listen_addrs[0], peer_id=server.peer_id)
        results = []
        for request in (Ping(), forward_request(hidden)):
            for _ in range(rounds // 10):  # warm-up
                await conn.request(request)
            start = clock()
            for _ in range(rounds):
                await conn.request(request)
            results.append((clock() - start) / rounds)
        nursery.cancel_scope.cancel()
    return results[0], results[1]


def sansio_rtt(request: Message, response: Message, rounds: int) -> float:
    """The protocol layer's share of one round trip, without sockets or trio: encode,
    encrypt, decrypt and decode the request and then the response."""
    a, b = Connection(Identity.generate(), Role.INITIATOR), Connection(Identity.generate(), Role.RESPONDER)
    b.receive_data(a.initiate())
    b.next_event()
    a.receive_data(b.data_to_send())
    a.next_event()
    b.receive_data(a.data_to_send())
    b.next_event()
    start = clock()
    for _ in range(rounds):
        for src, dst, message in ((a, b, request), (b, a, response)):
            dst.receive_data(src.send(encode_message(message, 1)))
            decode_message(dst.next_event().payload)
    return (clock() - start) / rounds


async def main(rounds: int, repeats: int) -> None:
    raw_small, raw_big, ping, fwd, sans_ping, sans_fwd = [], [], [], [], [], []
    model_small, model_big = [], []
    hidden = WireTensor(dtype="f32", shape=(1, 1, HIDDEN), data=bytes(4 * HIDDEN))
    result = ForwardResult(session=bytes(16), step=0, hidden=hidden, signature=bytes(64))
    for _ in range(repeats):
        sans_ping.append(sansio_rtt(Ping(), Pong(), rounds))
        sans_fwd.append(sansio_rtt(forward_request(hidden), result, rounds))
        raw_small.append(await raw_echo_rtt(40, rounds))
        raw_big.append(await raw_echo_rtt(4 * HIDDEN + 200, rounds))
        model_small.append(await trio_model_rtt(40, rounds))
        model_big.append(await trio_model_rtt(4 * HIDDEN + 200, rounds))
        p, f = await swarm_rtts(rounds)
        ping.append(p)
        fwd.append(f)
    kind = "CPU" if clock is time.process_time else "wall"
    print(f"round trips on loopback, one process, {repeats} runs x {rounds} "
          f"({kind} microseconds; median / best run):")
    for name, runs, base, base_name in (
        ("raw trio TCP echo, 40 B", raw_small, None, ""),
        ("raw trio TCP echo, 16 KiB", raw_big, None, ""),
        ("trio model, 40 B", model_small, raw_small, "raw 40 B"),
        ("trio model, 16 KiB", model_big, raw_big, "raw 16 KiB"),
        ("swarm Ping/Pong", ping, raw_small, "raw 40 B"),
        ("swarm Forward 16 KiB", fwd, raw_big, "raw 16 KiB"),
        ("  of which sans-IO, Ping", sans_ping, None, ""),
        ("  of which sans-IO, Forward", sans_fwd, None, ""),
    ):
        med, best = statistics.median(runs) * 1e6, min(runs) * 1e6
        line = f"  {name:28s} {med:8.1f} / {best:8.1f}"
        if base is not None:
            base_med = statistics.median(base) * 1e6
            line += f"   ratio to {base_name}: {med / base_med:5.2f}x (+{med - base_med:.1f} us)"
        print(line)
    for name, runs, model in (("Ping", ping, model_small), ("Forward", fwd, model_big)):
        m = statistics.median(model)
        print(f"  swarm {name} / trio model of the same task structure: {statistics.median(runs) / m:5.2f}x")
    own = [statistics.median(s) - statistics.median(r) - statistics.median(x)
           for s, r, x in ((ping, model_small, sans_ping), (fwd, model_big, sans_fwd))]
    print(f"  rest (swarm - trio model - sans-IO; dispatch, message objects, cache effects): "
          f"Ping {own[0] * 1e6:.1f} us, Forward {own[1] * 1e6:.1f} us")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, which other load on the machine disturbs less")
    args = parser.parse_args()
    if args.clock == "cpu":
        clock = time.process_time
    trio.run(main, args.rounds, args.repeats)
