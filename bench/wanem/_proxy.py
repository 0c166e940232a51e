"""The delay proxy: TCP forwarding with per-link one-way delay and bandwidth, in userspace.

Theory of operation. Each emulated node has its own loopback address; its server really
listens at ``ip:real_port`` and announces ``ip:proxy_port``, where this proxy listens.
Every node dials from its own address (``Host(source_host=ip)``), so the proxy knows a
connection's source node from its peer address and its destination node from the
listener it arrived on; it then opens the upstream connection from the source's
address too (the server sees the right peer address) and pumps both directions.

Each direction of each (source, destination) pair is one ``LinkQueue``, shared by all
connections on that pair: a FIFO bottleneck that serializes bytes at the link's
bandwidth, then adds the one-way delay. Bytes read from a socket are cut into segments
(``SEGMENT`` bytes, so a large message streams instead of arriving all at once at the
end), each stamped with its delivery time and queued; a delivery task per direction
sleeps until each segment is due and writes it (segments already due go out together).
Delivery times never decrease along one connection, so order is preserved; each is at
least the read time plus the delay, so every delay the proxy adds is a lower bound
(scheduling on a loaded machine only adds to it). EOF travels the link like data, then
half-closes the other side. The kernel completes TCP's own handshake before anything
here sees a connection, so its round trip is emulated by holding the first bytes from
the dialling side for one extra round trip.

``LinkQueue`` is the pure core (takes ``now``); ``DelayProxy`` is the trio shell.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from ._topology import Link, Node, Topology

__all__ = ["LinkQueue", "Route", "DelayProxy", "measure_overhead", "SEGMENT"]

log = logging.getLogger("wanem.proxy")

SEGMENT = 16384  # bytes scheduled as one unit (a few MSS): big messages stream
RECEIVE_SIZE = 65536
QUEUE_SEGMENTS = 256  # per direction of a connection: ~4 MiB in flight, then TCP backpressure
PROBE_IPS = ("127.0.0.253", "127.0.0.254")  # measure_overhead's two ends; keep nodes off them


class LinkQueue:
    """One direction of one link: a FIFO bottleneck at ``link.bandwidth``, then ``link.delay``."""

    __slots__ = ("link", "free_at", "bytes", "segments")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.free_at = -math.inf  # when the link has sent everything queued so far
        self.bytes = 0
        self.segments = 0

    def schedule(self, now: float, nbytes: int, *, not_before: float = -math.inf) -> float:
        """When ``nbytes`` handed to the link at ``now`` arrive at the far end.

        ``not_before``: the earliest time they may start (a connection being set up).
        """
        start = max(now, self.free_at, not_before)
        self.free_at = start + nbytes / self.link.bandwidth
        self.bytes += nbytes
        self.segments += 1
        return self.free_at + self.link.delay


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Listen for ``node`` at ``listen`` (port 0: any free port) and forward to ``target``."""

    node: str
    target: tuple[str, int]
    listen_port: int = 0


@dataclass(slots=True)
class _Stats:
    connections: int = 0
    refused: int = 0
    failed_upstream: int = 0
    links: dict[tuple[str, str], LinkQueue] = field(default_factory=dict)


class DelayProxy:
    """Forward each route's traffic through the topology's links (module docstring).

    Args:
        topology: nodes and link figures; every route's node must be in it.
        routes: where to listen for each destination node and where to forward.
        emulate_connect: hold a new connection's first bytes for one round trip of its
            link (TCP's handshake, which the kernel completes unseen).
    """

    def __init__(self, topology: Topology, routes: Sequence[Route], *, emulate_connect: bool = True) -> None:
        self.topology = topology
        self.routes = list(routes)
        for route in self.routes:
            topology.node(route.node)  # raises for an unknown node
        self.emulate_connect = emulate_connect
        self.addresses: dict[str, str] = {}  # node -> "ip:port" where this proxy listens for it
        self.stats = _Stats()

    def queue(self, src: str, dst: str) -> LinkQueue:
        """The shared queue for traffic from node ``src`` to node ``dst``."""
        key = (src, dst)
        queue = self.stats.links.get(key)
        if queue is None:
            queue = self.stats.links[key] = LinkQueue(self.topology.link(src, dst))
        return queue

    async def run(self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every route and forward until cancelled; ``started(addresses)``."""
        listeners: list[tuple[Route, trio.SocketListener]] = []
        try:
            for route in self.routes:
                ip = self.topology.node(route.node).ip
                (listener,) = await trio.open_tcp_listeners(route.listen_port, host=ip)
                listeners.append((route, listener))
                port = listener.socket.getsockname()[1]
                self.addresses[route.node] = f"{ip}:{port}"
            async with trio.open_nursery() as nursery:
                for route, listener in listeners:
                    nursery.start_soon(self._accept_loop, nursery, route, listener)
                task_status.started(dict(self.addresses))
        finally:
            with trio.CancelScope(shield=True):
                for _, listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def _accept_loop(self, nursery: trio.Nursery, route: Route, listener: trio.SocketListener) -> None:
        dst = self.topology.node(route.node)
        while True:
            stream = await listener.accept()
            nursery.start_soon(self._serve, dst, route.target, stream)

    async def _serve(self, dst: Node, target: tuple[str, int], down: trio.SocketStream) -> None:
        accepted = trio.current_time()
        try:
            src_ip = down.socket.getpeername()[0]
        except OSError:
            await trio.aclose_forcefully(down)
            return
        src = self.topology.node_at(src_ip)
        if src is None and self.topology.unknown_source == "refuse":
            self.stats.refused += 1
            log.warning("refusing a connection to %s from %s: no node has that address (dial with "
                        "source_host set to the node's ip, or set unknown_source = \"direct\")", dst.name, src_ip)
            await trio.aclose_forcefully(down)
            return
        if src is None:
            forward = backward = LinkQueue(Link(delay=0.0))
        else:
            forward, backward = self.queue(src.name, dst.name), self.queue(dst.name, src.name)
        try:
            up = await trio.open_tcp_stream(*target, local_address=src_ip if src is not None else None)
        except OSError as exc:
            self.stats.failed_upstream += 1
            log.warning("cannot reach %s at %s:%d for %s: %s", dst.name, *target, src_ip, exc)
            await trio.aclose_forcefully(down)
            return
        self.stats.connections += 1
        for stream in (down, up):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        not_before = accepted + 2 * forward.link.delay if self.emulate_connect else -math.inf
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_direction, down, up, forward, not_before, nursery.cancel_scope)
                nursery.start_soon(_direction, up, down, backward, -math.inf, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(down)
                await trio.aclose_forcefully(up)


async def _direction(source: trio.SocketStream, sink: trio.SocketStream, queue: LinkQueue, not_before: float,
                     connection: trio.CancelScope) -> None:
    """Pump one direction; a reset on either side ends the whole connection."""
    send, receive = trio.open_memory_channel[tuple[float, bytes | None]](QUEUE_SEGMENTS)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_deliver, receive, sink)
            async with send:
                while True:
                    data = await source.receive_some(RECEIVE_SIZE)
                    now = trio.current_time()
                    if not data:
                        await send.send((queue.schedule(now, 0, not_before=not_before), None))
                        break
                    for i in range(0, len(data), SEGMENT):
                        piece = data[i:i + SEGMENT]
                        await send.send((queue.schedule(now, len(piece), not_before=not_before), piece))
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        connection.cancel()


async def _deliver(receive: trio.MemoryReceiveChannel[tuple[float, bytes | None]], sink: trio.SocketStream) -> None:
    pending: tuple[float, bytes | None] | None = None
    async with receive:
        while True:
            if pending is None:
                try:
                    pending = await receive.receive()
                except trio.EndOfChannel:
                    return
            due, data = pending
            pending = None
            if due > trio.current_time():
                await trio.sleep_until(due)
            if data is None:
                await sink.send_eof()
                return
            batch = [data]
            while True:  # whatever else is already due goes in the same write
                try:
                    pending = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if pending[1] is None or pending[0] > trio.current_time():
                    break
                batch.append(pending[1])
                pending = None
            await sink.send_all(batch[0] if len(batch) == 1 else b"".join(batch))


# -- overhead -----------------------------------------------------------------------------


async def measure_overhead(*, round_trips: int = 300, size: int = 64) -> tuple[float, float]:
    """Median round trip (s) of ``size``-byte ping-pongs, direct and through a zero-delay,
    unlimited-bandwidth proxy in this process: ``(direct, proxied)``."""
    a, b = PROBE_IPS
    topology = Topology.make([("probe", "here", a), ("echo", "here", b)], bandwidth_mbit=None, intra_rtt_ms=0.0)

    async def echo(stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        async with stream:
            while data := await stream.receive_some(RECEIVE_SIZE):
                await stream.send_all(data)

    async def ping(addr: str) -> float:
        host, port = addr.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port), local_address=a)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        payload, times = b"x" * size, []
        async with stream:
            for _ in range(round_trips + 10):
                t0 = trio.current_time()
                await stream.send_all(payload)
                got = 0
                while got < size:
                    got += len(await stream.receive_some(RECEIVE_SIZE))
                times.append(trio.current_time() - t0)
        return statistics.median(times[10:])

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host=b))
        port = listener.socket.getsockname()[1]
        proxy = DelayProxy(topology, [Route(node="echo", target=(b, port))], emulate_connect=False)
        addresses = await nursery.start(proxy.run)
        direct = await ping(f"{b}:{port}")
        proxied = await ping(addresses["echo"])
        nursery.cancel_scope.cancel()
    return direct, proxied
