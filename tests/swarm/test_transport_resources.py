"""What remote peers can make a Host hold (issue 10 items 2 and 3; spec section 15):
the pure admission, trimming and incomplete-message budget, and the Host enforcing
them on loopback sockets. Attackers dial from their own 127.0.1.x addresses, a
subnet of their own; honest peers are on 127.0.0.1."""

from __future__ import annotations

import struct
from contextlib import asynccontextmanager

import pytest
import trio

from protocol import (
    NEED_DATA,
    Connection,
    FindNode,
    HandshakeComplete,
    Identity,
    Nodes,
    Ping,
    Pong,
    Role,
    encode_message,
)
from swarm.transport import Host, ResourceLimits
from swarm._transport._resources import ConnectionInfo, ConnectionManager, IncompleteBudget

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


# -- the pure cores ---------------------------------------------------------------------


def test_handshakes_have_per_ip_and_per_group_shares():
    manager = ConnectionManager(ResourceLimits(max_handshaking_per_ip=2, max_handshaking_per_group=3))
    assert manager.accept("a", "10.0.0.1", "g1", now=0)[0]
    assert manager.accept("b", "10.0.0.1", "g1", now=0)[0]
    admitted, _, reason = manager.accept("c", "10.0.0.1", "g1", now=0)
    assert not admitted
    assert "10.0.0.1" in reason
    assert manager.accept("d", "10.0.0.2", "g1", now=0)[0]
    assert not manager.accept("e", "10.0.0.3", "g1", now=0)[0]  # the group's share
    manager.handshake_ended("a")
    assert manager.accept("f", "10.0.0.1", "g1", now=0)[0]


def test_a_full_handshake_budget_gives_way_to_a_less_crowded_group():
    limits = ResourceLimits(max_handshaking=4, max_handshaking_per_ip=4, max_handshaking_per_group=4)
    manager = ConnectionManager(limits)
    for i in range(4):
        assert manager.accept(f"s{i}", "10.0.0.1", "crowded", now=i)[0]
    admitted, evict, _ = manager.accept("honest", "192.168.0.9", "other", now=9)
    assert admitted
    assert evict == "s0"  # the oldest of the most crowded group
    assert manager.handshaking == 4
    # one more from the crowded group does not displace anyone
    assert manager.accept("s9", "10.0.0.1", "crowded", now=10)[0] is False


def test_own_groups_are_exempt_from_shares_not_from_totals():
    manager = ConnectionManager(ResourceLimits(max_handshaking=3, max_handshaking_per_ip=1),
                                exempt_groups={"mine"})
    assert all(manager.accept(k, "127.0.0.1", "mine", now=0)[0] for k in "abc")
    assert not manager.accept("d", "127.0.0.1", "mine", now=0)[0]


def test_established_shares_are_checked_at_accept():
    manager = ConnectionManager(ResourceLimits(max_per_ip=2, max_per_group=10))
    for key in ("a", "b"):
        manager.accept(key, "10.0.0.1", "g", now=0)
        manager.handshake_ended(key)
        manager.opened(key, "10.0.0.1", "g", inbound=True)
    assert not manager.accept("c", "10.0.0.1", "g", now=0)[0]
    manager.closed("a")
    assert manager.accept("c", "10.0.0.1", "g", now=0)[0]


def info(key, group="g", *, inbound=True, opened=0.0, last_request=0.0, busy=False, protected=False):
    return ConnectionInfo(key=key, group=group, inbound=inbound, opened=opened, last_request=last_request,
                          busy=busy, protected=protected)


def test_trim_keeps_protected_busy_and_new_connections_and_drops_idle_crowded_newest_first():
    limits = ResourceLimits(high_water=6, low_water=3, max_connections=10, grace=5, idle_after=5)
    manager = ConnectionManager(limits)
    now = 100.0
    conns = [
        info("sessions", protected=True),
        info("busy", busy=True),
        info("new", opened=98.0),
        info("active", last_request=99.0, group="solo"),
        info("outbound", inbound=False),
        info("crowded-old", group="crowd", opened=1.0),
        info("crowded-new", group="crowd", opened=2.0),
        info("crowded-newer", group="crowd", opened=3.0),
    ]
    assert manager.trim(conns[:6], now=now) == []  # at the high watermark: nothing to do
    victims = manager.trim(conns, now=now)
    assert victims == ["crowded-newer", "crowded-new", "crowded-old", "outbound", "active"]


def test_incomplete_budget_total_and_group_share():
    budget = IncompleteBudget(ResourceLimits(max_incomplete_total=10 * MiB, max_incomplete_per_group=4 * MiB),
                              exempt_groups={"mine"})
    assert budget.reserve("a", "evil", 3 * MiB)
    assert not budget.reserve("b", "evil", 2 * MiB)  # the group's share
    assert budget.reserve("c", "mine", 6 * MiB)  # exempt from shares ...
    assert not budget.reserve("d", "other", 2 * MiB)  # ... not from the total
    budget.release("a")
    assert budget.reserve("d", "other", 2 * MiB)
    assert budget.total == 8 * MiB


# -- on loopback -----------------------------------------------------------------------------


async def pong(conn, request):
    return Pong()


async def nodes(conn, request):
    return Nodes(nodes=())


@asynccontextmanager
async def victim(resources: ResourceLimits, **kw):
    async with trio.open_nursery() as nursery:
        host = Host(Identity.generate(), resources=resources, **kw)
        host.add_handler(Ping, pong)
        host.add_handler(FindNode, nodes)
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


def port_of(host: Host) -> int:
    return int(host.listen_addrs[0].rsplit(":", 1)[1])


async def raw_connect(host: Host, source: str, *, handshake: bool = True):
    """A socket from ``source`` (a 127.0.1.x attacker address) and, if asked, a completed
    handshake on it: (stream, protocol.Connection or None)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(host), local_address=source)
    if not handshake:
        return stream, None
    conn = Connection(Identity.generate(), Role.INITIATOR)
    await stream.send_all(conn.initiate())
    while True:
        event = conn.next_event()
        if out := conn.data_to_send():
            await stream.send_all(out)
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        else:
            assert isinstance(event, HandshakeComplete)
            return stream, conn


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """The peer closes the stream, after at most a short connection-level ERROR saying
    why (spec section 6). Call it under a deadline."""
    said = 0
    try:
        while data := await stream.receive_some(65536):
            said += len(data)
            if said > 1024:  # more than one notice: not a close
                return False
        return True
    except trio.BrokenResourceError:
        return True


async def honest_ping(host: Host) -> None:
    async with trio.open_nursery() as nursery:
        client = Host(Identity.generate())
        await nursery.start(client.run)
        with trio.fail_after(5):
            assert await client.request(host.listen_addrs[0], Ping()) == Pong()
        nursery.cancel_scope.cancel()


async def test_silent_sockets_from_one_address_leave_handshakes_to_others():
    limits = ResourceLimits(max_handshaking=8, max_handshaking_per_ip=2, max_handshaking_per_group=4)
    async with victim(limits) as host:
        silent = [(await raw_connect(host, "127.0.1.1", handshake=False))[0] for _ in range(20)]
        with trio.fail_after(5):  # beyond its IP's share, each is closed at once
            refused = [await closed_by_peer(s) for s in silent[2:]]
        assert all(refused)
        assert host.handshaking == 2
        await honest_ping(host)
        for s in silent:
            await s.aclose()


async def test_established_connections_per_ip_are_capped_and_trimmed_above_the_watermark():
    limits = ResourceLimits(max_per_ip=3, max_per_group=10, high_water=6, low_water=4, max_connections=8,
                            grace=0.01, idle_after=0.01)
    async with victim(limits) as host:
        held = []
        for _ in range(3):
            held.append(await raw_connect(host, "127.0.1.1"))
        extra, _ = await raw_connect(host, "127.0.1.1", handshake=False)
        with trio.fail_after(5):
            assert await closed_by_peer(extra)  # the IP's share is taken: refused before its handshake
        for i in range(2, 5):
            held.append(await raw_connect(host, f"127.0.1.{i}"))
        with trio.fail_after(5):
            while len(host.connections) != 6:
                await trio.sleep(0.01)
        # past the (tiny) grace and idle period of the newest, by the host's own clock: all idle
        newest = max(c.opened_at for c in host.connections.values())
        await trio.sleep_until(newest + max(limits.grace, limits.idle_after))
        await honest_ping(host)  # the seventh connection: back to the low watermark, newest idle first
        assert len(host.connections) <= 4
        gone = [await closed_by_peer(stream) for stream, _ in held[-3:]]
        assert all(gone)


def big_ping(size: int) -> bytes:
    """A PING envelope carrying an unknown key with a byte string: ``size`` bytes."""
    head = encode_message(Ping(), 2)[:-1] + b"\xa1\x09\x5a"  # [2, 2, {9: bstr(n)}]
    return head + (size - len(head) - 4).to_bytes(4, "big") + bytes(size - len(head) - 4)


def first_frame(wire: bytes) -> bytes:
    """The first Noise message of a message's frames: the rest never comes."""
    (length,) = struct.unpack(">H", wire[:2])
    return wire[: 2 + length]


async def test_a_message_over_its_type_cap_is_refused_from_its_head():
    async with victim(ResourceLimits()) as host:
        stream, conn = await raw_connect(host, "127.0.1.1")
        await stream.send_all(first_frame(conn.send(big_ping(100_000))))  # PING's cap is about 4 KiB
        with trio.fail_after(5):
            assert await closed_by_peer(stream)
        assert host.incomplete.total == 0
        await honest_ping(host)


async def test_a_stalled_message_is_dropped_at_its_deadline_and_frees_its_reservation():
    limits = ResourceLimits(message_deadline=0.3, message_min_rate=1e12)
    async with victim(limits) as host:
        host.set_request_cap(Ping, 4 * MiB)  # let PING be large, for the test
        stream, conn = await raw_connect(host, "127.0.1.1")
        await stream.send_all(first_frame(conn.send(big_ping(1 * MiB))))
        with trio.fail_after(5):
            while host.incomplete.total != 1 * MiB:
                await trio.sleep(0.01)
        started = trio.current_time()
        with trio.fail_after(5):
            assert await closed_by_peer(stream)
        assert trio.current_time() - started >= 0.2
        assert host.incomplete.total == 0
        await honest_ping(host)


async def test_incomplete_messages_of_one_group_cannot_take_the_whole_budget():
    limits = ResourceLimits(max_incomplete_total=8 * MiB, max_incomplete_per_group=2 * MiB, message_deadline=30)
    async with victim(limits) as host:
        host.set_request_cap(Ping, 4 * MiB)
        held = []
        for i in range(2):  # each declares 1.5 MiB and sends 64 KiB: the second does not fit the share
            stream, conn = await raw_connect(host, f"127.0.1.{i + 1}")
            await stream.send_all(first_frame(conn.send(big_ping(3 * MiB // 2))))
            held.append(stream)
            with trio.fail_after(5):
                while host.incomplete.total < 3 * MiB // 2:
                    await trio.sleep(0.01)
        with trio.fail_after(5):
            assert await closed_by_peer(held[1])
        assert host.incomplete.total == 3 * MiB // 2
        # another group still has room
        stream, conn = await raw_connect(host, "127.0.2.1")
        await stream.send_all(first_frame(conn.send(big_ping(3 * MiB // 2))))
        with trio.fail_after(5):
            while host.incomplete.total < 3 * MiB:
                await trio.sleep(0.01)
        await honest_ping(host)
        for s in (*held, stream):
            await s.aclose()
