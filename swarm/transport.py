"""The trio transport every network feature uses: TCP, the Noise handshake, one
multiplexed connection per peer pair (spec/SPEC.md, "Transport" and "Requests and
responses"; DESIGN.md, "Transport and channel").

Theory of operation. A ``Host`` listens (``run``), accepts and dials connections,
and owns every connection's task in its nursery, so a connection outlives the task
that dialled it and ends when the host stops. The handshake runs in the accepting
task or the dialling caller under ``limits.handshake_timeout``; then a
``PeerConnection`` (``swarm/_transport/_peer.py``, a trio adapter over the sans-IO
``protocol.Channel``) reads, dispatches and multiplexes. A connection is given the
host's handler table and its ``_forget`` as close callback; it knows nothing else of
the host.

Connection reuse: ``connect`` returns an open connection to the peer id if one
exists (whichever side dialled it), else one dialled to that exact address. Inbound
connections are never looked up by the listen addresses the peer claims, since
those are unverified and a peer could claim someone else's address. Concurrent
``connect`` calls for the same address share one dial.

Resources (spec section 15, ``swarm/_transport/_resources.py``): every accepted
socket is admitted by the ``ConnectionManager`` before its handshake (handshake
budget and per-IP and per-group shares, the most crowded group giving way when
the handshake budget is full); above the high watermark the least valuable
established connections are trimmed down to the low watermark; incomplete
messages reserve their declared length from one ``IncompleteBudget``; request
types have the size caps ``set_request_cap`` gives them.

Simultaneous dial (A dials B while B dials A) keeps both connections: each stays
fully usable and ``connections`` keeps the first one registered for that peer (the
other takes its place if it closes first). Closing one deterministically would need
both sides to agree while requests may already be in flight on either; an extra idle
connection costs little and goes away after ``limits.idle_timeout``.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace

import trio

from protocol import (
    DEFAULT_LIMITS,
    NEED_DATA,
    Connection,
    HandshakeComplete,
    Identity,
    Limits,
    Message,
    Role,
)
from protocol.errors import HandshakeError, LocalProtocolError, RemoteProtocolError

from ._address import PeerAddress, address_group, format_sockaddr
from ._transport import RECEIVE_SIZE, Handler, PeerConnection
from ._transport._resources import DEFAULT_RESOURCES, ConnectionInfo, ConnectionManager, IncompleteBudget, \
    ResourceLimits
from .errors import PeerUnreachable

__all__ = ["Host", "PeerConnection", "Handler", "PeerAddress", "ResourceLimits", "DEFAULT_RESOURCES"]

log = logging.getLogger("swarm.transport")

ConnectionCallback = Callable[[PeerConnection], None]
# accept() errors that mean "out of resources for now", not "the listener is broken"
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class _Dial:
    """A dial in progress that later ``connect`` calls for the same address wait on."""

    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: PeerConnection | None = None
        self.error: PeerUnreachable | None = None


class Host:
    """This peer's network endpoint: a listener, handlers and connections.

    Args:
        identity: this peer's Ed25519 identity (proved in every handshake).
        host, port: where to listen; port 0 picks a free port. An IPv6 host (``::1``)
            listens on IPv6.
        announce_addrs: addresses to tell peers (behind NAT); default the bound ones; empty:
            claim none (a DHT client: no node admits it as a contact).
        limits: protocol limits enforced on every connection.
        resources: budgets for handshakes, connections and incomplete messages.
        max_connections: shorthand for ``resources``' hard limit on established
            connections (watermarks lowered to fit).
        default_timeout: seconds for ``connect`` and ``request`` when not given.
        source_host: local address that outgoing connections bind to (multi-homed
            hosts; the WAN emulator gives each peer its own 127.0.0.x); default: the
            kernel's choice.

    Raises:
        InvalidAddress: an announce address is not ``host:port``.
    """

    def __init__(self, identity: Identity, *, host: str = "127.0.0.1", port: int = 0,
                 announce_addrs: Sequence[str] | None = None, limits: Limits = DEFAULT_LIMITS,
                 resources: ResourceLimits = DEFAULT_RESOURCES, max_connections: int | None = None,
                 default_timeout: float = 10.0, source_host: str | None = None) -> None:
        if default_timeout <= 0:
            raise ValueError("default_timeout must be positive")
        if max_connections is not None:
            if max_connections < 1:
                raise ValueError("max_connections must be positive")
            resources = replace(resources, max_connections=max_connections,
                                high_water=min(resources.high_water, max_connections),
                                low_water=min(resources.low_water, max_connections))
        self.identity = identity
        self.peer_id = identity.peer_id
        self.limits = limits
        self.resources = resources
        self.max_connections = resources.max_connections
        self.manager = ConnectionManager(resources)
        self.incomplete = IncompleteBudget(resources)
        self.request_caps: dict[type[Message], int] = {}
        self._decode_limiter = trio.CapacityLimiter(2)
        self._handshakes: dict[trio.SocketStream, trio.CancelScope] = {}
        self.default_timeout = default_timeout
        self._bind_host = host
        self._bind_port = port
        self.source_host = source_host
        self._announce = None if announce_addrs is None else [str(PeerAddress.parse(a)) for a in announce_addrs]
        self.listen_addrs: list[str] = list(self._announce or [])
        self.bound_addrs: list[str] = []  # where the listeners actually are, once running
        self.connections: dict[bytes, PeerConnection] = {}
        self.on_connection: list[ConnectionCallback] = []
        self._handlers: dict[type[Message], Handler] = {}
        self._all: set[PeerConnection] = set()
        self._by_addr: dict[str, PeerConnection] = {}
        self._dialing: dict[tuple[str, bytes | None], _Dial] = {}
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<Host {self.peer_id.hex()[:12]} at {', '.join(self.listen_addrs) or 'not listening'}>"

    def add_handler(self, request_type: type[Message], handler: Handler) -> None:
        """Serve ``request_type`` with ``handler(connection, request) -> response``.

        Connections already open serve it too. A ``SwarmError`` the handler raises
        is answered as ``ERROR`` with its code (a ``RemoteError`` keeps its
        retry_after); any other exception as ``ERROR INTERNAL``, with its traceback logged.
        """
        if getattr(request_type, "KIND", None) != "request":
            raise LocalProtocolError(f"{request_type!r} is not a request message type")
        self._handlers[request_type] = handler

    def set_request_cap(self, request_type: type[Message], size: int) -> None:
        """Refuse ``request_type`` messages declaring more than ``size`` bytes (at once,
        from their envelope head; spec section 6), on every connection; a connection may
        still raise it for itself (``PeerConnection.allow``)."""
        if getattr(request_type, "KIND", None) != "request" or size < 1:
            raise LocalProtocolError(f"a size cap is for a request type and positive, got {request_type!r}, {size}")
        self.request_caps[request_type] = size

    @property
    def handshaking(self) -> int:
        """Inbound sockets whose handshake is under way."""
        return self.manager.handshaking

    # -- listening ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; every connection is closed on the way out.

        ``task_status.started()`` is called once listening, when ``listen_addrs`` is set.

        Raises:
            OSError: the address cannot be bound.
        """
        listeners = await trio.open_tcp_listeners(self._bind_port, host=self._bind_host)
        try:
            self.bound_addrs = [format_sockaddr(listener.socket.getsockname()) for listener in listeners]
            self.listen_addrs = list(self._announce) if self._announce is not None else list(self.bound_addrs)
            own = {address_group(a) for a in (*self.bound_addrs, *self.listen_addrs)}
            self.manager.exempt_groups = own
            self.incomplete.exempt_groups = own
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                log.info("peer %s listening on %s", self.peer_id.hex()[:12], ", ".join(self.bound_addrs))
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("cannot accept connections for now: %s", exc)
                await trio.sleep(0.1)
                continue
            address = _remote(stream)
            ip, group = _ip(address), address_group(address)
            if len(self._all) >= self.max_connections and not self._trim(room=1):
                admitted, evict, reason = False, None, f"{self.max_connections} connections already"
            else:
                admitted, evict, reason = self.manager.accept(stream, ip, group, now=trio.current_time())
            if not admitted:
                log.info("refusing connection from %s: %s", address, reason)
                await trio.aclose_forcefully(stream)
                continue
            if evict is not None and evict in self._handshakes:
                log.info("aborting the handshake of %s to make room for %s", _remote(evict), address)
                self._handshakes.pop(evict).cancel()
            scope = self._handshakes[stream] = trio.CancelScope()
            self._nursery.start_soon(self._serve_inbound, stream, scope, address, ip, group)

    async def _serve_inbound(self, stream: trio.SocketStream, scope: trio.CancelScope, address: str, ip: str,
                             group: str) -> None:
        try:
            try:
                with scope:
                    with trio.fail_after(self.limits.handshake_timeout):
                        conn, info = await self._handshake(stream, Role.RESPONDER, None)
                if scope.cancelled_caught:  # evicted for a newcomer from a less crowded group
                    await trio.aclose_forcefully(stream)
                    return
            finally:
                self._handshakes.pop(stream, None)
                self.manager.handshake_ended(stream)
        except trio.TooSlowError:
            log.warning("handshake with %s timed out after %g s", address, self.limits.handshake_timeout)
            await trio.aclose_forcefully(stream)
            return
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.warning("handshake with %s failed: %s: %s", address, type(exc).__name__, exc)
            await trio.aclose_forcefully(stream)
            return
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        connection = self._adopt(stream, conn, info, address=address, inbound=True, ip=ip, group=group)
        if connection.is_open:
            await connection.run()

    # -- dialling ---------------------------------------------------------------------

    async def connect(self, addr: str | PeerAddress, *, peer_id: bytes | None = None,
                      timeout: float | None = None) -> PeerConnection:
        """An open connection to the peer at ``addr``, reusing one if there is one.

        Args:
            addr: ``host:port`` or ``[ipv6]:port``.
            peer_id: the peer id expected there; the handshake fails unless the peer
                proves it. An open connection to that peer id is reused whatever its address.
            timeout: seconds for TCP connect plus handshake (default ``default_timeout``).

        Raises:
            PeerUnreachable: refused, timed out, or the handshake failed (the cause,
                e.g. a ``HandshakeError`` for a wrong peer id, is ``__cause__``).
            InvalidAddress: ``addr`` does not parse.
            LocalProtocolError: the host is not running.
        """
        address = PeerAddress.parse(addr)
        key = (str(address), peer_id)
        existing = self._existing(key)
        if existing is not None:  # the common case: no deadline to set up
            await trio.lowlevel.checkpoint()
            return existing
        timeout = self.default_timeout if timeout is None else timeout
        with trio.move_on_after(timeout) as scope:
            while True:
                existing = self._existing(key)
                if existing is not None:
                    return existing
                dial = self._dialing.get(key)
                if dial is None:
                    break
                await dial.done.wait()
                if dial.error is not None:
                    raise PeerUnreachable(address, dial.error.reason, peer_id=peer_id) from dial.error
                # else: it succeeded (found above next time round) or its caller was cancelled (we dial)
            dial = self._dialing[key] = _Dial()
            try:
                dial.result = await self._dial(address, peer_id)
                return dial.result
            except PeerUnreachable as exc:
                dial.error = exc
                raise
            finally:
                del self._dialing[key]
                dial.done.set()
        assert scope.cancelled_caught
        raise PeerUnreachable(address, f"no connection within {timeout:g} s", peer_id=peer_id)

    def _existing(self, key: tuple[str, bytes | None]) -> PeerConnection | None:
        address, peer_id = key
        connection = self.connections.get(peer_id) if peer_id is not None else self._by_addr.get(address)
        return connection if connection is not None and connection.is_open else None

    async def _dial(self, address: PeerAddress, peer_id: bytes | None) -> PeerConnection:
        if self._nursery is None:
            raise LocalProtocolError("Host.run() must be running to connect")
        try:
            stream = await trio.open_tcp_stream(address.host, address.port, local_address=self.source_host)
        except OSError as exc:
            raise PeerUnreachable(address, exc.strerror or str(exc), peer_id=peer_id) from exc
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                conn, info = await self._handshake(stream, Role.INITIATOR, peer_id)
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise PeerUnreachable(address, "handshake timed out", peer_id=peer_id) from exc
            if isinstance(exc, RemoteProtocolError):
                reason = f"handshake failed: {exc}"
                raise PeerUnreachable(address, reason, peer_id=peer_id) from exc
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                raise PeerUnreachable(address, f"connection lost during the handshake ({exc!r})",
                                      peer_id=peer_id) from exc
            raise
        if self._nursery is None:  # the host stopped while we were handshaking
            await trio.aclose_forcefully(stream)
            raise LocalProtocolError("Host.run() stopped while connecting")
        remote = _remote(stream)
        connection = self._adopt(stream, conn, info, address=str(address), inbound=False, ip=_ip(remote),
                                 group=address_group(remote))
        self._by_addr[str(address)] = connection
        self._nursery.start_soon(connection.run)
        return connection

    async def request(self, addr: str | PeerAddress, message: Message, *, peer_id: bytes | None = None,
                      timeout: float | None = None) -> Message:
        """``connect(addr, peer_id=...)`` then ``request(message)`` on that connection.

        ``timeout`` bounds each of the two steps (default ``default_timeout``).
        Raises what ``connect`` and ``PeerConnection.request`` raise.
        """
        address = PeerAddress.parse(addr)
        connection = self._existing((str(address), peer_id))  # skips connect's checkpoint
        if connection is None:
            connection = await self.connect(address, peer_id=peer_id, timeout=timeout)
        return await connection.request(message, timeout=timeout)

    # -- handshake and bookkeeping -----------------------------------------------------

    async def _handshake(self, stream: trio.SocketStream, role: Role,
                         expected_peer_id: bytes | None) -> tuple[Connection, HandshakeComplete]:
        # Nagle would hold each small frame for the peer's delayed ACK; trio sets it too.
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        conn = Connection(self.identity, role, listen_addrs=self.listen_addrs, limits=self.limits,
                          expected_peer_id=expected_peer_id)
        if role is Role.INITIATOR:
            await stream.send_all(conn.initiate())
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                await stream.send_all(out)
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            elif type(event) is HandshakeComplete:
                return conn, event
            else:  # the connection gives nothing else before HandshakeComplete
                raise HandshakeError(f"unexpected {type(event).__name__} during the handshake")

    def _adopt(self, stream: trio.SocketStream, conn: Connection, info: HandshakeComplete, *, address: str,
               inbound: bool, ip: str, group: str) -> PeerConnection:
        connection = PeerConnection(stream, conn, info, handlers=self._handlers, on_close=self._forget,
                                    address=address, inbound=inbound, limits=self.limits,
                                    default_timeout=self.default_timeout, caps=self.request_caps.get,
                                    group=group, incomplete=self.incomplete, resources=self.resources,
                                    decode_limiter=self._decode_limiter)
        self._all.add(connection)
        self.manager.opened(connection, ip, group, inbound=inbound)
        if len(self._all) > self.resources.high_water:
            self._trim()
        if not connection.is_open:  # trimmed at once: the least valuable of all
            return connection
        self.connections.setdefault(connection.peer_id, connection)
        log.debug("connected %r", connection)
        for callback in list(self.on_connection):
            try:
                callback(connection)
            except Exception:
                log.exception("on_connection callback %r failed", callback)
        return connection

    def _trim(self, *, room: int = 0) -> bool:
        """Close the least valuable connections once above the high watermark (down to
        the low one: ``ConnectionManager.trim``); True if ``room`` more fit under the
        hard limit afterwards."""
        now = trio.current_time()
        infos = [ConnectionInfo(key=c, group=c.group, inbound=c.inbound, opened=c.opened_at,
                                last_request=c.last_request, busy=c.busy, protected=c.protected)
                 for c in self._all if c.is_open]
        victims = self.manager.trim(infos, now=now)
        if victims:
            log.info("trimming %d of %d connections (above the high watermark of %d)", len(victims), len(infos),
                     self.resources.high_water)
        for victim in victims:
            victim.drop("trimmed: this peer has too many connections")
        return len(self._all) + room <= self.max_connections

    def _forget(self, connection: PeerConnection) -> None:
        """A connection's close callback: it is no longer reachable through this host."""
        self._all.discard(connection)
        self.manager.closed(connection)
        self.incomplete.release(connection)
        if self.connections.get(connection.peer_id) is connection:
            del self.connections[connection.peer_id]
            for other in self._all:
                if other.peer_id == connection.peer_id and other.is_open:
                    self.connections[other.peer_id] = other
                    break
        for addr in [a for a, c in self._by_addr.items() if c is connection]:
            del self._by_addr[addr]


def _ip(address: str) -> str:
    """The host part of ``host:port`` / ``[v6]:port``."""
    return address.rsplit(":", 1)[0].strip("[]")


def _remote(stream: trio.SocketStream) -> str:
    try:
        return format_sockaddr(stream.socket.getpeername())
    except OSError:
        return "?"
