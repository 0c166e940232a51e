"""swarm.transport on real loopback sockets: handshake, multiplexing, reuse, errors,
hostile peers, limits. (Named test_transport_host.py: tests/protocol/test_transport.py
exists and the test directories are not packages.)"""

from __future__ import annotations

import logging
import socket
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from protocol import (
    NEED_DATA,
    Connection,
    ConnectionEnded,
    Error,
    FindNode,
    HandshakeComplete,
    Identity,
    Limits,
    MessageReceived,
    Nodes,
    Ping,
    Pong,
    Role,
    Stored,
    cbor_encode,
    decode_message,
    encode_message,
)
from protocol.errors import ErrorCode, HandshakeError, RemoteError, SwarmError, UnexpectedMessage
from swarm.errors import NoRoute, PeerUnreachable, RequestTimeout
from swarm.transport import Host, PeerConnection

pytestmark = pytest.mark.timeout(60)


async def pong(conn: PeerConnection, request: Ping) -> Pong:
    return Pong()


@asynccontextmanager
async def hosts(*configs: dict):
    """Start one Host per config (kwargs), each answering Ping; stop them all after."""
    async with trio.open_nursery() as nursery:
        started = []
        for config in configs:
            host = Host(Identity.generate(), **config)
            host.add_handler(Ping, pong)
            await nursery.start(host.run)
            started.append(host)
        yield started
        nursery.cancel_scope.cancel()


class RawPeer:
    """A hand-driven peer: our own protocol.Connection over a plain trio stream, so a
    test can send what a well-behaved Host never would."""

    def __init__(self, stream: trio.SocketStream, conn: Connection, identity: Identity) -> None:
        self.stream, self.conn, self.peer_id = stream, conn, identity.peer_id

    @classmethod
    async def connect(cls, address: str, expected_peer_id: bytes | None = None) -> RawPeer:
        host, port = address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        identity = Identity.generate()
        conn = Connection(identity, Role.INITIATOR, expected_peer_id=expected_peer_id)
        await stream.send_all(conn.initiate())
        while True:
            event = conn.next_event()
            if out := conn.data_to_send():
                await stream.send_all(out)
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            else:
                assert isinstance(event, HandshakeComplete)
                return cls(stream, conn, identity)

    async def send(self, message, request_id: int) -> None:
        await self.send_payload(encode_message(message, request_id))

    async def send_payload(self, payload: bytes) -> None:
        await self.stream.send_all(self.conn.send(payload))

    async def receive(self):
        """The next (id, message), or None when the host closes the connection."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset by the host
                    return None
                self.conn.receive_data(data)
            elif isinstance(event, MessageReceived):
                return decode_message(event.payload)
            else:
                assert isinstance(event, ConnectionEnded)
                return None


async def until(predicate, timeout: float = 10.0) -> None:
    """Return once ``predicate()`` holds: what a peer sent has been read by the other.

    Not ``wait_all_tasks_blocked``: a task waiting for bytes the kernel has not handed
    over yet counts as blocked, so with real sockets it can return too early."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


async def read_until_closed(stream: trio.SocketStream) -> None:
    """Returns once the other side closed (EOF or reset), whatever it sent before."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


# -- handshake, requests, reuse ---------------------------------------------------------


async def test_handshake_and_ping_both_directions():
    seen: list[PeerConnection] = []
    async with hosts({}, {}) as (a, b):
        b.on_connection.append(seen.append)
        conn = await a.connect(b.listen_addrs[0], peer_id=b.peer_id)
        assert conn.peer_id == b.peer_id
        assert conn.public_key == b.identity.public_key
        assert conn.listen_addrs == tuple(b.listen_addrs)
        assert not conn.inbound
        assert conn.channel.next_id == 1
        assert await conn.request(Ping()) == Pong()

        back = b.connections[a.peer_id]
        assert seen == [back]
        assert back.inbound
        assert back.peer_id == a.peer_id
        assert back.listen_addrs == tuple(a.listen_addrs)
        assert back.handshake_hash == conn.handshake_hash
        assert await back.request(Ping()) == Pong()
        assert back.channel.next_id == 2  # ids are per direction: each side numbers its own
        assert await a.request(b.listen_addrs[0], Ping()) == Pong()
        assert conn.channel.next_id == 3


async def test_concurrent_requests_are_multiplexed_and_answered_out_of_order():
    release = {i: trio.Event() for i in range(5)}
    answered: list[int] = []

    async def find_node(conn, request: FindNode) -> Nodes:
        await release[request.target[0]].wait()
        return Nodes(nodes=())

    async with hosts({}, {}) as (a, b):
        b.add_handler(FindNode, find_node)
        conn = await a.connect(b.listen_addrs[0])

        async def ask(i: int) -> None:
            response = await conn.request(FindNode(target=bytes([i]) * 20))
            assert isinstance(response, Nodes)
            answered.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(ask, i)
            await until(lambda: a.peer_id in b.connections and b.connections[a.peer_id].channel.incoming == 5)
            for done, i in enumerate((3, 0, 4, 2, 1), start=1):  # all five in flight, answered out of order
                release[i].set()
                await until(lambda done=done: len(answered) == done)
        assert answered == [3, 0, 4, 2, 1]
        assert len(b._all) == 1


async def test_large_messages_span_many_frames():
    from protocol import Forward, ForwardResult, WireTensor

    async def echo(conn, request: Forward) -> ForwardResult:
        return ForwardResult(session=request.session, step=request.step, hidden=request.hidden,
                             signature=bytes(64))

    data = (bytes(range(256)) * 4700)[: 4 * 300_000]
    hidden = WireTensor(dtype="f32", shape=(1, 300, 1000), data=data)  # 1.2 MB: about 19 Noise frames
    async with hosts({}, {}) as (a, b):
        b.add_handler(Forward, echo)
        conn = await a.connect(b.listen_addrs[0])
        for _ in range(3):
            request = Forward(session=bytes(16), step=1, position=0, hidden=hidden, signature=bytes(64))
            response = await conn.request(request)
            assert response.hidden.data == data
            assert response.step == 1


async def test_big_messages_are_encrypted_and_decrypted_in_bulk_threads(monkeypatch):
    # ~1 ms per MiB of ChaCha20-Poly1305 that every other connection would wait for
    import threading

    from protocol import Forward, ForwardResult, WireTensor
    from swarm._transport import _peer

    ran: list[tuple[str, str]] = []

    async def recording(fn, *args):
        def job():
            ran.append((fn.__name__, threading.current_thread().name))
            return fn(*args)
        return await run_bulk(job)

    run_bulk = _peer.run_bulk
    monkeypatch.setattr(_peer, "run_bulk", recording)

    async def echo(conn, request: Forward) -> ForwardResult:
        return ForwardResult(session=request.session, step=request.step, hidden=request.hidden,
                             signature=bytes(64))

    data = bytes(range(256)) * 4096  # 1 MiB
    hidden = WireTensor(dtype="f32", shape=(1, 256, 1024), data=data)
    async with hosts({}, {}) as (a, b):
        b.add_handler(Forward, echo)
        conn = await a.connect(b.listen_addrs[0])
        await conn.request(Ping())
        assert ran == []  # small messages stay on the loop
        request = Forward(session=bytes(16), step=1, position=0, hidden=hidden, signature=bytes(64))
        response = await conn.request(request)
        assert response.hidden.data == data
    assert {name for name, _ in ran} == {"send", "decrypt_received"}
    assert [name for name, _ in ran].count("send") == 2  # the request and its answer
    assert {thread for _, thread in ran} == {"bulk compute"}


async def test_one_connection_is_reused_in_both_directions():
    async with hosts({}, {}) as (a, b):
        first = await a.connect(b.listen_addrs[0])
        assert await a.connect(b.listen_addrs[0]) is first
        assert await a.connect(b.listen_addrs[0], peer_id=b.peer_id) is first
        for _ in range(20):
            await a.request(b.listen_addrs[0], Ping(), peer_id=b.peer_id)
        inbound = b.connections[a.peer_id]
        # b reaches a over the connection a opened, whatever address it names
        assert await b.connect(a.listen_addrs[0], peer_id=a.peer_id) is inbound
        for _ in range(20):
            await b.request(a.listen_addrs[0], Ping(), peer_id=a.peer_id)
        assert len(a._all) == len(b._all) == 1
        assert first.channel.next_id == 21
        assert inbound.channel.next_id == 21


async def test_concurrent_connects_share_one_dial():
    async with hosts({}, {}) as (a, b):
        results: list[PeerConnection] = []

        async def dial():
            results.append(await a.connect(b.listen_addrs[0]))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(dial)
        assert len(results) == 5
        assert all(r is results[0] for r in results)
        assert len(b._all) == 1


async def test_simultaneous_dial_keeps_both_connections_usable():
    async with hosts({}, {}) as (a, b):
        conns = {}

        async def dial(src, dst):
            conns[src.peer_id] = await src.connect(dst.listen_addrs[0], peer_id=dst.peer_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dial, a, b)
            nursery.start_soon(dial, b, a)
        assert await conns[a.peer_id].request(Ping()) == Pong()
        assert await conns[b.peer_id].request(Ping()) == Pong()
        # each side keeps one entry per peer; later connects return it
        assert list(a.connections) == [b.peer_id]
        assert list(b.connections) == [a.peer_id]
        assert await a.connect(b.listen_addrs[0], peer_id=b.peer_id) is a.connections[b.peer_id]


async def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 on this machine: {exc}")
    async with hosts({"host": "::1"}, {"host": "::1"}) as (a, b):
        assert b.listen_addrs[0].startswith("[::1]:")
        assert await a.request(b.listen_addrs[0], Ping(), peer_id=b.peer_id) == Pong()
        assert await b.connections[a.peer_id].request(Ping()) == Pong()


async def test_announce_addrs_are_told_in_the_handshake():
    async with hosts({"announce_addrs": ["203.0.113.7:4000", "[2001:db8::1]:4000"]}, {}) as (a, b):
        assert a.listen_addrs == ["203.0.113.7:4000", "[2001:db8::1]:4000"]
        assert b.listen_addrs[0].startswith("127.0.0.1:")
        assert a.bound_addrs[0].startswith("127.0.0.1:")
        conn = await b.connect(a.bound_addrs[0], peer_id=a.peer_id)
        assert conn.listen_addrs == ("203.0.113.7:4000", "[2001:db8::1]:4000")


# -- failures -------------------------------------------------------------------------


async def test_wrong_peer_id_fails_the_handshake():
    async with hosts({}, {}) as (a, b):
        with pytest.raises(PeerUnreachable, match="handshake failed") as info:
            await a.connect(b.listen_addrs[0], peer_id=bytes(20))
        assert isinstance(info.value.__cause__, HandshakeError)
        assert not a.connections
        assert await a.request(b.listen_addrs[0], Ping(), peer_id=b.peer_id) == Pong()


async def test_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    async with hosts({}) as (a,):
        with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port}") as info:
            await a.request(f"127.0.0.1:{port}", Ping())
        assert isinstance(info.value.__cause__, OSError)
        assert "check that it is running" in str(info.value)


async def test_request_timeout_leaves_the_connection_usable():
    release = trio.Event()

    async def slow(conn, request):
        await release.wait()
        return Nodes(nodes=())

    async with hosts({}, {}) as (a, b):
        b.add_handler(FindNode, slow)
        conn = await a.connect(b.listen_addrs[0])
        with pytest.raises(RequestTimeout, match="FindNode") as info:
            await conn.request(FindNode(target=bytes(20)), timeout=0.05)
        assert info.value.timeout == 0.05
        assert conn.free_slots == a.limits.max_concurrent_requests - 1  # b still works on it
        assert conn.channel.outstanding == 1
        assert conn.channel.awaited == 0
        release.set()
        assert await conn.request(Ping()) == Pong()  # the late Nodes is dropped
        assert conn.free_slots == a.limits.max_concurrent_requests
        assert conn.channel.outstanding == 0
        assert conn.is_open


async def test_handler_errors_become_remote_errors(caplog):
    async def failing(conn, request: FindNode):
        kind = request.target[0]
        if kind == 0:
            raise NoRoute(3, 6)
        if kind == 1:
            raise RemoteError("downstream is busy", code=ErrorCode.BUSY, retry_after=2.5)
        if kind == 2:
            raise RemoteError("from the future", code=4242)
        if kind == 3:
            return Stored()  # the wrong response type
        raise ValueError("bug in the handler")

    async with hosts({}, {}) as (a, b):
        b.add_handler(FindNode, failing)
        conn = await a.connect(b.listen_addrs[0])

        async def ask(kind: int) -> RemoteError:
            with pytest.raises(RemoteError) as info:
                await conn.request(FindNode(target=bytes([kind]) * 20))
            return info.value

        error = await ask(0)
        assert error.code == ErrorCode.SPAN_NOT_SERVED
        assert "no route: blocks 3..5" in error.message
        error = await ask(1)
        assert (error.code, error.message, error.retry_after) == (ErrorCode.BUSY, "downstream is busy", 2.5)
        assert (await ask(2)).code == 4242
        with caplog.at_level(logging.ERROR, logger="swarm.transport"):
            assert (await ask(3)).code == ErrorCode.INTERNAL
            error = await ask(4)
        assert error.code == ErrorCode.INTERNAL
        assert error.message == "internal error"  # no internals leak
        assert any(r.exc_info and "bug in the handler" in str(r.exc_info[1]) for r in caplog.records)
        assert await conn.request(Ping()) == Pong()  # the peer keeps serving


async def test_unhandled_request_type_is_unknown_message():
    async with hosts({}, {}) as (a, b):
        with pytest.raises(RemoteError) as info:
            await a.request(b.listen_addrs[0], FindNode(target=bytes(20)))
        assert info.value.code == ErrorCode.UNKNOWN_MESSAGE


async def test_unknown_message_types_on_the_wire():
    async with hosts({}) as (b,):
        raw = await RawPeer.connect(b.listen_addrs[0], b.peer_id)
        await raw.send_payload(cbor_encode([98, 7, {0: "from a later version"}]))  # even: a request
        answer_id, answer = await raw.receive()
        assert isinstance(answer, Error)
        assert answer_id == 7
        assert answer.code == ErrorCode.UNKNOWN_MESSAGE
        await raw.send_payload(cbor_encode([99, 8, {}]))  # odd: a response nobody asked for, ignored
        await raw.send(Pong(), 55)  # a known response nobody asked for, ignored
        await raw.send(Ping(), 9)
        assert await raw.receive() == (9, Pong())

        # answers to b's own requests: an unknown type, then a type that does not fit
        back = b.connections[raw.peer_id]
        async with trio.open_nursery() as nursery:
            async def expect_unexpected():
                with pytest.raises(UnexpectedMessage, match="unknown message type 99"):
                    await back.request(Ping())
                with pytest.raises(UnexpectedMessage, match="Stored"):
                    await back.request(Ping())

            nursery.start_soon(expect_unexpected)
            request_id, _ = await raw.receive()
            await raw.send_payload(cbor_encode([99, request_id, {}]))
            request_id, _ = await raw.receive()
            await raw.send(Stored(), request_id)
        assert back.is_open


async def test_closing_fails_outstanding_requests_on_both_sides():
    async def never(conn, request):
        await trio.sleep_forever()

    async with hosts({}, {}) as (a, b):
        b.add_handler(FindNode, never)
        conn = await a.connect(b.listen_addrs[0])
        async with trio.open_nursery() as nursery:
            async def ask():
                with pytest.raises(PeerUnreachable, match="closed by us"):
                    await conn.request(FindNode(target=bytes(20)))

            nursery.start_soon(ask)
            await until(lambda: a.peer_id in b.connections and b.connections[a.peer_id].channel.incoming == 1)
            back = b.connections[a.peer_id]
            await conn.aclose()
        assert not conn.is_open
        assert b.peer_id not in a.connections
        with pytest.raises(PeerUnreachable):
            await conn.request(Ping())
        with trio.fail_after(5):
            await back.wait_closed()  # b sees EOF: its handler is cancelled and a forgotten
        assert a.peer_id not in b.connections
        assert await a.request(b.listen_addrs[0], Ping()) == Pong()  # a fresh connection


async def test_stopping_a_host_closes_its_connections():
    async with hosts({}) as (a,):
        async with hosts({}) as (b,):
            conn = await a.connect(b.listen_addrs[0])
            assert await conn.request(Ping()) == Pong()
        assert not b.connections
        with trio.fail_after(5):
            await conn.wait_closed()
        assert not a.connections
        with pytest.raises(PeerUnreachable):
            await conn.request(Ping())


# -- hostile peers and limits ------------------------------------------------------------


async def test_garbage_before_the_handshake(caplog):
    async with hosts({}, {}) as (a, b):
        stream = await trio.open_tcp_stream("127.0.0.1", int(b.listen_addrs[0].rsplit(":", 1)[1]))
        with caplog.at_level(logging.WARNING, logger="swarm.transport"):
            await stream.send_all(b"\x00\x05GET / HTTP/1.1\r\n\r\n" * 4)
            with trio.fail_after(5):
                await read_until_closed(stream)
        assert any("handshake with" in r.getMessage() for r in caplog.records)
        assert await a.request(b.listen_addrs[0], Ping()) == Pong()


@pytest.mark.parametrize("attack", ["garbage frame", "malformed message", "oversized message"])
async def test_hostile_bytes_after_the_handshake_close_that_connection_only(attack, caplog):
    async with hosts({}, {"limits": Limits(max_message_size=4096)}) as (a, b):
        good = await a.connect(b.listen_addrs[0])
        raw = await RawPeer.connect(b.listen_addrs[0], b.peer_id)
        await raw.send(Ping(), 1)
        assert await raw.receive() == (1, Pong())
        with caplog.at_level(logging.WARNING, logger="swarm.transport"):
            if attack == "garbage frame":
                await raw.stream.send_all(b"\x00\x20" + bytes(range(32)))
            elif attack == "malformed message":
                await raw.send_payload(cbor_encode([2, 5, {0: "a Ping has no fields, but this is not a map key"}, 1]))
            else:
                await raw.send_payload(bytes(8000))
            with trio.fail_after(5):
                # The host's own direction is intact: it says why (id 0), then closes.
                request_id, notice = await raw.receive()
                assert request_id == 0
                assert notice.code == {"garbage frame": ErrorCode.DECRYPT_FAILED,
                                       "malformed message": ErrorCode.MALFORMED}.get(attack, ErrorCode.LIMIT_EXCEEDED)
                assert await raw.receive() is None
        assert [r for r in caplog.records if "dropping connection" in r.getMessage()]
        assert raw.peer_id not in b.connections
        assert await good.request(Ping()) == Pong()


async def test_too_many_concurrent_requests_drop_the_connection():
    async def never(conn, request):
        await trio.sleep_forever()

    async with hosts({"limits": Limits(max_concurrent_requests=2)}) as (b,):
        b.add_handler(FindNode, never)
        raw = await RawPeer.connect(b.listen_addrs[0])
        for i in range(1, 4):
            await raw.send(FindNode(target=bytes(20)), i)
        with trio.fail_after(5):
            request_id, notice = await raw.receive()  # why it closes, as a connection-level ERROR
            assert request_id == 0
            assert notice.code == ErrorCode.LIMIT_EXCEEDED
            assert await raw.receive() is None


async def test_outgoing_requests_wait_for_a_slot_instead_of_tripping_the_limit():
    release = trio.Event()

    async def gated(conn, request):
        await release.wait()
        return Nodes(nodes=())

    limits = Limits(max_concurrent_requests=2)
    async with hosts({"limits": limits}, {"limits": limits}) as (a, b):
        b.add_handler(FindNode, gated)
        conn = await a.connect(b.listen_addrs[0])
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(conn.request, FindNode(target=bytes(20)))
            await until(lambda: a.peer_id in b.connections and b.connections[a.peer_id].channel.incoming == 2)
            await trio.testing.wait_all_tasks_blocked()  # the other three wait here, not there
            assert conn.free_slots == 0
            assert conn.channel.outstanding == 2
            release.set()
        assert conn.is_open
        assert conn.channel.next_id == 6


async def test_a_request_is_uncounted_before_its_answer_is_written():
    """The requester may send its next request as soon as it reads an answer, and the
    responder's reader may take it before the answering task runs again: a request
    still counted then would make an honest peer exceed max_concurrent_requests after
    a burst (seen when a SIGSTOPped server resumed)."""

    async def answer(conn, request):
        return Nodes(nodes=())

    async with hosts({}, {}) as (a, b):
        b.add_handler(FindNode, answer)
        conn = await a.connect(b.listen_addrs[0])
        await conn.request(FindNode(target=bytes(20)))
        served = b.connections[a.peer_id]
        counted_at_write = []
        send = served._send_payload

        async def recording(payload):
            counted_at_write.append(served.channel.incoming)
            await send(payload)

        served._send_payload = recording
        await conn.request(FindNode(target=bytes(20)))
        assert counted_at_write == [0]


async def test_a_peer_that_stops_reading_loses_the_connection(caplog):
    from protocol import Forward, ForwardResult, WireTensor

    async def echo(conn, request: Forward) -> ForwardResult:
        return ForwardResult(session=request.session, step=request.step, hidden=request.hidden,
                             signature=bytes(64))

    elements = 4 << 20  # 16 MiB answers: more than both socket buffers hold
    hidden = WireTensor(dtype="f32", shape=(1, 1, elements), data=bytes(4 * elements))
    async with hosts({"limits": Limits(idle_timeout=0.3)}) as (b,):
        b.add_handler(Forward, echo)
        adopted: list[PeerConnection] = []
        handshaken = trio.Event()
        b.on_connection.append(lambda conn: (adopted.append(conn), handshaken.set()))
        raw = await RawPeer.connect(b.listen_addrs[0])
        raw.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with caplog.at_level(logging.WARNING, logger="swarm.transport"):
            await raw.send(Forward(session=bytes(16), step=0, position=0, hidden=hidden, signature=bytes(64)), 1)
            with trio.fail_after(10):  # and never read the answer
                await handshaken.wait()
                await adopted[0].wait_closed()
        assert raw.peer_id not in b.connections
        assert any("read nothing" in r.getMessage() for r in caplog.records)


async def test_max_connections_refuses_inbound():
    async with hosts({}, {}, {"max_connections": 1}) as (a, b, c):
        await a.connect(c.listen_addrs[0])
        raw_stream = await trio.open_tcp_stream("127.0.0.1", int(c.listen_addrs[0].rsplit(":", 1)[1]))
        with trio.fail_after(5):
            await read_until_closed(raw_stream)
        with pytest.raises(PeerUnreachable):
            await b.connect(c.listen_addrs[0])
        assert len(c._all) == 1


async def test_handshake_timeout():
    async with hosts({"limits": Limits(handshake_timeout=0.1)}) as (b,):
        stream = await trio.open_tcp_stream("127.0.0.1", int(b.listen_addrs[0].rsplit(":", 1)[1]))
        with trio.fail_after(5):
            await read_until_closed(stream)  # we sent nothing; b gave up
        assert b.handshaking == 0


async def test_idle_connections_are_closed_and_redialled():
    async with hosts({"limits": Limits(idle_timeout=0.2)}, {}) as (a, b):
        conn = await a.connect(b.listen_addrs[0])
        assert await conn.request(Ping()) == Pong()
        with trio.fail_after(5):
            await conn.wait_closed()
        assert not a.connections  # forgotten as it closed, not some time later
        fresh = await a.connect(b.listen_addrs[0])
        assert fresh is not conn
        assert await fresh.request(Ping()) == Pong()


async def test_a_busy_connection_is_not_idle(mock_clock):
    # Virtual time that only moves when the test jumps it, and only once the request is
    # outstanding on both sides and every task has settled: however slow the machine,
    # the watchdog wakes exactly three times with the request outstanding.
    started, release = trio.Event(), trio.Event()

    async def slow(conn, request):
        started.set()
        await release.wait()
        return Nodes(nodes=())

    async with hosts({"limits": Limits(idle_timeout=0.1)}, {}) as (a, b):
        b.add_handler(FindNode, slow)
        conn = await a.connect(b.listen_addrs[0])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.request, FindNode(target=bytes(20)))
            await started.wait()
            for _ in range(3):  # three idle periods with a request outstanding
                mock_clock.jump(0.1)
                await trio.testing.wait_all_tasks_blocked()
            assert conn.is_open
            release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert conn.is_open  # answered just now: not idle yet
        mock_clock.jump(0.1)  # idle at last: closed after one more period
        await trio.testing.wait_all_tasks_blocked()
        assert not conn.is_open


def test_errors_are_swarm_errors_with_one_line_messages():
    for error in (PeerUnreachable("h:1", "refused"), RequestTimeout("Ping", "h:1", 2.0), NoRoute(0, 4)):
        assert isinstance(error, SwarmError)
        assert "\n" not in str(error)
    assert str(NoRoute(3, 6)).startswith("no route: blocks 3..5 are not served")


async def test_connect_needs_a_running_host():
    from protocol.errors import LocalProtocolError

    host = Host(Identity.generate())
    with pytest.raises(LocalProtocolError):
        await host.connect("127.0.0.1:9")
