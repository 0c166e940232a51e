"""bench/wanem: topologies (pure), the link queue (pure), and the delay proxy on real
loopback sockets: bytes and order preserved under random chunking, delays and
bandwidth as lower bounds (never upper ones: a loaded machine only adds)."""

from __future__ import annotations

import functools
import math
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from bench.wanem import DelayProxy, Link, LinkQueue, Route, Topology, TopologyError, regional
from bench.wanem._topology import REGION_RTT_MS

pytestmark = pytest.mark.timeout(60)


# -- topology -------------------------------------------------------------------------


def test_region_table_has_the_issue_figures() -> None:
    topo = Topology.make([("t", "tokyo"), ("t2", "tokyo"), ("s", "seoul"), ("v", "virginia"), ("f", "frankfurt")])
    assert topo.link("t", "s").rtt_ms == 30
    assert topo.link("t", "v").rtt_ms == 150
    assert topo.link("v", "f").rtt_ms == 90
    assert topo.link("f", "t").rtt_ms == 230
    assert 2 <= topo.link("t", "t2").rtt_ms <= 5
    assert topo.link("t", "v").delay == pytest.approx(0.075)  # one way: half the round trip
    assert topo.link("t", "s").mbit == 100
    assert [n.ip for n in topo.nodes] == ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]
    assert all(r >= 2 for r in REGION_RTT_MS.values())


def test_regional_swarm_in_one_line() -> None:
    topo = regional({"client": "tokyo"}, {"tokyo": 2, "seoul": 1, "virginia": 1}, bandwidth_mbit=25)
    assert [n.name for n in topo.nodes] == ["client", "tokyo-0", "tokyo-1", "seoul-0", "virginia-0"]
    assert topo.link("client", "virginia-0").rtt_ms == 150
    assert topo.link("seoul-0", "virginia-0").mbit == 25
    assert topo.link("tokyo-0", "tokyo-1").rtt_ms == 3


def test_link_rules_most_specific_first_and_file_round_trip() -> None:
    topo = Topology.make(
        [("client", "tokyo", "127.0.0.40"), ("a", "tokyo"), ("b", "virginia")],
        links=[{"a": "tokyo", "b": "virginia", "rtt_ms": 150, "bandwidth_mbit": 25},
               {"a": "client", "b": "b", "rtt_ms": 160},
               {"a": "tokyo", "b": "tokyo", "bandwidth_mbit": "unlimited"}],
        bandwidth_mbit=50)
    assert topo.link("client", "b").rtt_ms == 160
    assert topo.link("client", "b").mbit == 25  # node pair, then regions
    assert topo.link("a", "b").rtt_ms == 150
    assert topo.link("b", "a").mbit == 25
    assert math.isinf(topo.link("client", "a").bandwidth)
    assert topo.link("client", "a").rtt_ms == 3
    assert topo.node("a").ip == "127.0.0.10"
    assert topo.node_at("127.0.0.40").name == "client"
    assert Topology.loads(topo.dumps()) == topo
    assert "160ms/25M" in topo.table()


@pytest.mark.parametrize(("text", "match"), [
    ('[[node]]\nname = "x"\nregion = "mars"\n[[node]]\nname = "y"\nregion = "tokyo"\n', "no round-trip time"),
    ('[[node]]\nname = "x"\nregion = "tokyo"\nip = "10.0.0.1"\n', "not a loopback"),
    ('[[node]]\nname = "x"\nregion = "tokyo"\n[[node]]\nname = "x"\nregion = "tokyo"\n', "two nodes"),
    ('[[link]]\na = "p"\nb = "q"\nrtt_ms = 1\n', "neither a node nor a region"),
    ('[nodes]\n', "unknown sections"),
    ('[[node]]\nname = "x"\nregion = "tokyo"\n[[link]]\na = "x"\nb = "tokyo"\nrtt_ms = -1\n', "rtt_ms"),
])
def test_bad_topologies_say_why(text: str, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        Topology.loads(text)


def test_link_queue_serializes_then_delays() -> None:
    q = LinkQueue(Link(delay=0.010, bandwidth=1000.0))  # 1000 bytes/s
    assert q.schedule(0.0, 100) == pytest.approx(0.110)  # 0.1 s on the wire, then 10 ms
    assert q.schedule(0.0, 100) == pytest.approx(0.210)  # queued behind the first
    assert q.schedule(5.0, 0) == pytest.approx(5.010)  # an idle link: delay only
    assert q.schedule(5.0, 10, not_before=6.0) == pytest.approx(6.020)
    times = [q.schedule(7.0 + i * 0.001, 7) for i in range(50)]
    assert times == sorted(times)


# -- the proxy on real sockets --------------------------------------------------------


def _topology(rtt_ms: float, mbit: float | None) -> Topology:
    return Topology.make([("a", "here", "127.0.0.41"), ("b", "there", "127.0.0.42")],
                         links=[{"a": "here", "b": "there", "rtt_ms": rtt_ms, "bandwidth_mbit": mbit}],
                         bandwidth_mbit=None)


async def _start(nursery: trio.Nursery, topo: Topology, handler, **kwargs) -> tuple[str, int]:
    """An upstream server on node b and the proxy in front of it: the proxy's (host, port)."""
    b = topo.node("b").ip
    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=b))
    proxy = DelayProxy(topo, [Route(node="b", target=(b, listener.socket.getsockname()[1]))], **kwargs)
    addresses = await nursery.start(proxy.run)
    host, port = addresses["b"].rsplit(":", 1)
    return host, int(port)


async def _dial(addr: tuple[str, int], source: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*addr, local_address=source)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(random.randint(1, 70000)):
            await stream.send_all(data)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_bytes_and_order_preserved_under_random_chunking(seed: int) -> None:
    """Three connections at once share one shaped link; each sends random bytes in
    random chunks, the far side echoes them in its own random chunks; everything comes
    back intact and in order, and EOF travels the link (half-close) like data."""
    rng = random.Random(seed)
    topo = _topology(rtt_ms=2.0, mbit=200.0)

    async def one(addr: tuple[str, int], payload: bytes) -> None:
        stream = await _dial(addr, topo.node("a").ip)
        received = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some(rng.randint(1, 70000)):
                received.extend(data)

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            sent = 0
            while sent < len(payload):
                n = rng.choice([1, 7, 100, 1500, 16383, 16384, 16385, 65536, 200000])
                await stream.send_all(payload[sent:sent + n])
                sent += n
                if rng.random() < 0.2:
                    await trio.lowlevel.checkpoint()
            await stream.send_eof()
        assert bytes(received) == payload

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            addr = await _start(nursery, topo, _echo)
            payloads = [rng.randbytes(rng.randint(1, 600_000)) for _ in range(3)]
            async with trio.open_nursery() as clients:
                for payload in payloads:
                    clients.start_soon(one, addr, payload)
            nursery.cancel_scope.cancel()


async def test_round_trip_and_transfer_are_at_least_the_configured_figures() -> None:
    topo = _topology(rtt_ms=40.0, mbit=8.0)  # 20 ms each way, 1 MB/s
    async with trio.open_nursery() as nursery:
        addr = await _start(nursery, topo, _echo)
        t0 = trio.current_time()
        stream = await _dial(addr, topo.node("a").ip)
        async with stream:
            await stream.send_all(b"x")
            assert await stream.receive_some(10) == b"x"
            first = trio.current_time() - t0
            rtts = []
            for _ in range(5):
                t0 = trio.current_time()
                await stream.send_all(b"ping")
                got = b""
                while len(got) < 4:
                    got += await stream.receive_some(10)
                rtts.append(trio.current_time() - t0)
            t0 = trio.current_time()
            blob = bytes(200_000)
            await stream.send_all(blob)
            got_n = 0
            while got_n < len(blob):
                got_n += len(await stream.receive_some(65536))
            transfer = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert first >= 2 * 0.040  # the TCP handshake's round trip, then the data's
    assert min(rtts) >= 0.040
    assert transfer >= 0.2 + 0.040  # 200 kB at 1 MB/s (echoed back as it streams), plus the round trip


async def test_unknown_source_refused_or_direct() -> None:
    async with trio.open_nursery() as nursery:
        addr = await _start(nursery, _topology(rtt_ms=1.0, mbit=None), _echo)
        stream = await _dial(addr, "127.0.0.1")  # no node has 127.0.0.1
        assert await stream.receive_some(10) == b""  # closed by the proxy
        await stream.aclose()
        nursery.cancel_scope.cancel()
    direct = Topology.make([("a", "here", "127.0.0.41"), ("b", "here", "127.0.0.42")], unknown_source="direct")
    async with trio.open_nursery() as nursery:
        addr = await _start(nursery, direct, _echo)
        stream = await _dial(addr, "127.0.0.1")
        async with stream:
            await stream.send_all(b"hello")
            assert await stream.receive_some(10) == b"hello"
        nursery.cancel_scope.cancel()


async def test_upstream_reset_closes_the_client_side() -> None:
    async def slam(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        await trio.aclose_forcefully(stream)

    topo = _topology(rtt_ms=2.0, mbit=None)
    async with trio.open_nursery() as nursery:
        addr = await _start(nursery, topo, slam)
        stream = await _dial(addr, topo.node("a").ip)
        with trio.fail_after(10):
            await stream.send_all(b"hi")
            try:
                assert await stream.receive_some(10) == b""
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_children_die_with_a_sigkilled_parent() -> None:
    """A benchmark killed with SIGKILL leaves no server or proxy behind (PR_SET_PDEATHSIG)."""
    root = str(Path(__file__).resolve().parents[2])
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {root!r})\n"
        "from bench.wanem import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child}").exists() and _state(child) != "Z":
        assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
