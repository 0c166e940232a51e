"""Measured round trips: PING a peer, keep RTTs fresh, and what a server publishes
as ``next_pings`` (spec section 10, "Routing"; Petals' ``next_pings``).

Theory of operation. ``ping`` measures one round trip on an open connection (the
connection is dialled first, so the handshake is not counted). ``refresh_rtts`` pings,
at once and each within a deadline, the peers whose RTT a ``PeerHealth`` lacks or
holds too old: clients call it before relying on a candidate ("PING on first
contact, refreshed with age"). A peer that does not answer is recorded as failed.

``NextPings`` is the server's side: every ``interval`` seconds it reads who serves
the block right after its span (one DHT read of that block's key), pings up to
``MAX_NEXT_PINGS`` of them and keeps their RTTs, which the server's announcement
carries (``Announcement.next_pings``), so a client can cost server -> server legs
it cannot measure itself. ``next_servers`` (pure) picks whom to ping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from protocol import MAX_NEXT_PINGS, Announcement, NextPing, Ping
from protocol.errors import ProtocolError, SwarmError

from .errors import PeerUnreachable
from .health import PeerHealth
from .transport import Host

if TYPE_CHECKING:
    from .dht import DhtNode

__all__ = ["NextPings", "next_servers", "ping", "refresh_rtts", "PING_TIMEOUT"]

log = logging.getLogger("swarm.latency")

#: Seconds a PING (connect included) may take before the peer counts as unreachable.
PING_TIMEOUT = 2.0


async def ping(host: Host, peer_id: bytes, addrs: Sequence[str], *, timeout: float = PING_TIMEOUT) -> float:
    """The round trip of one PING to ``peer_id``, in seconds (the dial is not counted).

    Raises:
        PeerUnreachable: no address answered; RequestTimeout: no PONG in time;
        RemoteError: the peer answered ERROR.
    """
    last: BaseException | None = None
    conn = None
    for addr in addrs:
        try:
            conn = await host.connect(addr, peer_id=peer_id, timeout=timeout)
            break
        except PeerUnreachable as exc:
            last = exc
    if conn is None:
        raise PeerUnreachable(",".join(addrs) or "?", f"no address answered ({last})", peer_id=peer_id)
    t0 = trio.current_time()
    await conn.request(Ping(), timeout=timeout)
    return trio.current_time() - t0


async def refresh_rtts(host: Host, health: PeerHealth, peers: Mapping[bytes, Sequence[str]], *,
                       timeout: float = PING_TIMEOUT, concurrency: int = 16, force: bool = False) -> None:
    """PING, at once, the ``peers`` (id -> addresses) whose RTT ``health`` lacks or holds
    stale (all of them with ``force``); each answer is an RTT sample, each silence a failure."""
    now = trio.current_time()
    due = [(p, a) for p, a in peers.items() if a and (force or health.needs_rtt(p, now))]
    if not due:
        return
    limiter = trio.CapacityLimiter(concurrency)

    async def one(peer_id: bytes, addrs: Sequence[str]) -> None:
        async with limiter:
            try:
                rtt = await ping(host, peer_id, addrs, timeout=timeout)
            except (SwarmError, ProtocolError) as exc:
                health.failed(peer_id, trio.current_time(), reason=f"no answer to PING: {exc}")
                return
        health.observe_rtt(peer_id, rtt, trio.current_time())

    async with trio.open_nursery() as nursery:
        for peer_id, addrs in due:
            nursery.start_soon(one, peer_id, tuple(addrs))


def next_servers(announcements: Iterable[Announcement], *, me: bytes, span: tuple[int, int],
                 limit: int = MAX_NEXT_PINGS) -> list[Announcement]:
    """The servers a server of ``span`` pings: those serving block ``span[1]`` (where a
    route leaving it continues), not itself, the ones serving most of what follows first."""
    after = [a for a in announcements if a.peer_id != me and a.span[0] <= span[1] < a.span[1]]
    after.sort(key=lambda a: (-(a.span[1] - span[1]), a.peer_id))
    return after[:limit]


class NextPings:
    """A server's measured RTTs to the servers of the following blocks (module docstring).

    Args:
        host, dht: the server's transport and DHT node.
        model: the served model id.
        span: ``span()`` gives the span served now (it may move when rebalancing).
        num_blocks: the model's block count (the last span has no next servers).
        interval: seconds between measurements.
    """

    def __init__(self, host: Host, dht: DhtNode, *, model: str, span: Callable[[], tuple[int, int]],
                 num_blocks: int, interval: float = 60.0, timeout: float = PING_TIMEOUT) -> None:
        self.host, self.dht, self.model, self.span, self.num_blocks = host, dht, model, span, num_blocks
        self.interval, self.timeout = interval, timeout
        self.health = PeerHealth()
        self._targets: list[bytes] = []

    def table(self) -> tuple[NextPing, ...] | None:
        """The announcement's ``next_pings`` (None before anything was measured)."""
        now = trio.current_time()
        pings = [NextPing(peer_id=p, rtt=rtt) for p in sorted(self._targets)
                 if (rtt := self.health.rtt(p)) is not None and math.isfinite(rtt)
                 and not self.health.backed_off(p, now)]
        return tuple(pings) or None

    async def measure(self) -> None:
        """One round: read who serves the next block, ping them."""
        from .announce import block_key, decode_block_value

        start, end = self.span()
        if end >= self.num_blocks:
            self._targets = []
            return
        found: list[Announcement] = []
        for record in await self.dht.get(block_key(self.model, end)):
            try:
                block, ann = decode_block_value(_decode(record.value))
            except (SwarmError, ProtocolError):
                continue
            if block == end and ann.model == self.model and ann.peer_id == record.publisher_id:
                found.append(ann)
        chosen = next_servers(found, me=self.host.peer_id, span=(start, end))
        self._targets = [a.peer_id for a in chosen]
        await refresh_rtts(self.host, self.health, {a.peer_id: a.addrs for a in chosen}, timeout=self.timeout,
                           force=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.measure()
            except SwarmError as exc:  # the DHT may be briefly unreachable; next round
                log.info("measuring next_pings failed: %s", exc)
            await trio.sleep(self.interval)


def _decode(value: bytes) -> list:
    from protocol import cbor_decode

    return cbor_decode(value, max_size=len(value))
