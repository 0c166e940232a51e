"""One open, authenticated connection to a peer: a thin trio adapter over the sans-IO
``protocol.Connection`` (bytes) and ``protocol.Channel`` (requests and responses)
(spec/SPEC.md, "Transport" and "Requests and responses").

Theory of operation. Whoever creates a ``PeerConnection`` (``Host``, after a completed
handshake) gives it the handlers it serves and a callback to call when it closes, and
runs ``run`` in its own nursery. ``run``'s one reader task feeds received bytes to the
connection and each message to the channel, then acts on what the channel says:

* a response to one of *our* requests is handed to the waiting requester through its
  ``_Waiter`` (an Event plus a slot, the channel's token for the request), with no
  task spawned;
* a request starts a handler task in the connection's nursery; the handler's
  return value, or the ``ERROR`` its exception maps to, is sent back; a request of a
  type nobody serves is answered ``ERROR UNKNOWN_MESSAGE`` the same way.

Sends are serialised by a ``StrictFIFOLock`` held across encrypt-and-write, so the
Noise nonce order is the write order. A write interrupted half-way (cancelled or
failed) leaves a partial frame on the stream, so it closes the connection.

Outgoing requests take a slot of a semaphore sized ``limits.max_concurrent_requests``,
so this side never trips the peer's limit; a slot is released when the response
arrives, not when the requester gives up (a timed-out request still occupies the
peer until it answers). Incoming requests beyond the limit drop the connection (the
channel raises).

A watchdog task closes the connection after ``limits.idle_timeout`` without traffic
while nothing is outstanding either way, or when one write has been stuck that long
(the peer stopped reading).

What the peer makes us hold is bounded before it is held (spec section 15): every
message's declared length is checked against its type's cap as soon as its envelope
head arrives (``Channel.message_cap``; the application raises a cap with ``allow``);
a message longer than one Noise message reserves its declared length from the
host's ``IncompleteBudget`` while it arrives, and must be complete within
``ResourceLimits.message_deadline_for(length)`` (the read loop runs under a cancel
scope whose deadline is set only while such a message is incomplete); a message
larger than ``OFFTHREAD_DECODE`` is decoded in a worker thread, so that the event
loop other connections depend on never waits for it. Closing is immediate and synchronous (``_close``): the
requesters waiting are failed and the close callback runs before anything else can
see the connection, so a closed connection is never found among the owner's open ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from protocol import (
    NEED_DATA,
    UNSERVED_CAP,
    Channel,
    Connection,
    ConnectionEnded,
    HandshakeComplete,
    Limits,
    Message,
    MessageReceived,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
)
from protocol.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError, SwarmError, UnexpectedMessage

from ..bulk import run_bulk
from ..errors import PeerUnreachable, RequestTimeout
from ._resources import DEFAULT_RESOURCES, IncompleteBudget, ResourceLimits

__all__ = ["PeerConnection", "Handler", "RECEIVE_SIZE", "OFFTHREAD_DECODE"]

log = logging.getLogger("swarm.transport")

#: ``handler(connection, request) -> response``. The request is an instance of the type
#: the handler is registered for (handlers are kept in a dict keyed by that type), which
#: a Callable type cannot say per entry: hence ``Any`` rather than ``Message``, since a
#: handler taking ``Ping`` is not a handler taking every ``Message``.
Handler = Callable[["PeerConnection", Any], Awaitable[Message]]

#: Bytes asked of the socket per read. CPython's recv allocates the whole size up
#: front: asking 256 KiB for a 100-byte message costs ~70 us against ~10 us for 64 KiB
#: (measured), so reads start small and grow only while they come back full.
RECEIVE_SIZE = 64 * 1024
MAX_RECEIVE_SIZE = 1024 * 1024
#: Messages larger than this are decoded in a worker thread (a few ms of work and more).
OFFTHREAD_DECODE = 1024 * 1024
#: Received bytes at least this many are decrypted, and messages at least this long
#: encrypted, in a bulk thread (``swarm.bulk``): ChaCha20-Poly1305 takes about 1 ms
#: per MiB here, which every other connection's messages would wait for (a flood of
#: whole-context FORWARD_ONCEs spent 13% of a server's event loop in crypto and
#: copies; issue 10, item 4). Below it, a thread's round trip costs more than it saves.
OFFTHREAD_CRYPTO = 256 * 1024


async def _acquire(lock: trio.StrictFIFOLock | trio.Semaphore) -> None:
    """Acquire without a scheduler round trip when free (the write that follows
    checkpoints anyway); wait in FIFO order otherwise."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class _Waiter:
    """The rendezvous of one outstanding request with the reader task."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: ResponseReceived | BaseException | None = None


class PeerConnection:
    """An open connection to an authenticated peer, shared by everything that talks to it.

    Args:
        stream: the TCP stream the handshake ran on.
        conn: the sans-IO connection, its handshake complete.
        info: what the handshake proved.
        handlers: request type -> handler; read when each request arrives (a live
            mapping: handlers added later are served).
        on_close: called once with this connection as it closes.
        address: the remote socket address, ``host:port``.
        inbound: whether the peer dialled us.
        limits: the protocol limits of both directions.
        default_timeout: seconds ``request`` waits when not told.
        caps: request type -> the host's size cap for it (None: the type's own).
        group: the remote address's group (/24 or /64), for the incomplete budget.
        incomplete: the host's budget for incomplete messages (None: none).
        resources: the deadlines for incomplete messages.
        decode_limiter: threads that decode large messages (shared by the host's connections).

    Attributes:
        peer_id, public_key: the peer's proven identity (from the handshake).
        listen_addrs: the addresses the peer says it listens on (unverified claims).
        handshake_hash: the Noise handshake hash, unique to this connection.
        channel: the request multiplexer's state (read it, do not drive it).
    """

    def __init__(self, stream: trio.SocketStream, conn: Connection, info: HandshakeComplete, *,
                 handlers: Mapping[type[Message], Handler], on_close: Callable[[PeerConnection], None],
                 address: str, inbound: bool, limits: Limits, default_timeout: float,
                 caps: Callable[[type[Message]], int | None] | None = None, group: str = "",
                 incomplete: IncompleteBudget | None = None, resources: ResourceLimits = DEFAULT_RESOURCES,
                 decode_limiter: trio.CapacityLimiter | None = None) -> None:
        self.peer_id = info.peer_id
        self.public_key = info.public_key
        self.listen_addrs = info.listen_addrs
        self.handshake_hash = info.handshake_hash
        self.address = address
        self.inbound = inbound
        self.group = group
        self.channel = Channel(limits=limits, serves=lambda request_type: request_type in handlers, caps=caps)
        conn.set_message_cap(self.channel.message_cap)
        self._incomplete = incomplete
        self._resources = resources
        self._decode_limiter = decode_limiter or trio.CapacityLimiter(1)
        self._tracked: tuple[int, int] = (0, 0)  # (messages received, incomplete length) last accounted
        self._received = 0
        self._read_scope = trio.CancelScope()
        self._tags: set[str] = set()
        self._handlers = handlers
        self._on_close = on_close
        self._stream = stream
        self._conn = conn
        self._limits = limits
        self._default_timeout = default_timeout
        self._send_lock = trio.StrictFIFOLock()
        self._slots = trio.Semaphore(limits.max_concurrent_requests)
        self._last_activity = trio.current_time()
        self.opened_at = self._last_activity
        self.last_request = self._last_activity  # last request sent or received
        self._writing_since: float | None = None  # when the write in progress started
        self._open = True
        self._closed_reason = "closed"
        self._closed = trio.Event()
        self._cancel_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None  # handler tasks; set by run
        self._finished = trio.Event()

    def __repr__(self) -> str:
        direction = "from" if self.inbound else "to"
        return f"<PeerConnection {direction} {self.peer_id.hex()[:12]} at {self.address}{'' if self._open else ' closed'}>"

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def free_slots(self) -> int:
        """Requests this side may still send before waiting for a response."""
        return self._slots.value

    @property
    def busy(self) -> bool:
        """Whether a request is outstanding either way."""
        return self._busy()

    @property
    def protected(self) -> bool:
        """Whether the application asked to keep this connection (``protect``)."""
        return bool(self._tags)

    def protect(self, tag: str) -> None:
        """Keep this connection when the host trims connections, until ``unprotect(tag)``
        (libp2p's connection manager tags; e.g. a server protects a connection while it
        owns sessions there)."""
        self._tags.add(tag)

    def unprotect(self, tag: str) -> None:
        self._tags.discard(tag)

    def allow(self, request_type: type[Message], size: int) -> None:
        """Let the peer send ``request_type`` messages of up to ``size`` bytes on this
        connection (a raise of its cap only; see ``Channel.allow``)."""
        self.channel.allow(request_type, size)

    async def wait_closed(self) -> None:
        """Return once the connection is closed (by either side, or failed)."""
        await self._closed.wait()

    # -- requests we make ---------------------------------------------------------

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send ``message`` (a request) and return the peer's response.

        Cancellation (or the timeout) abandons the wait; the connection stays usable
        unless the request was being written at that moment.

        Raises:
            RemoteError: the peer answered ``ERROR`` (its code, message, retry_after).
            RequestTimeout: no response within ``timeout`` (default: the host's).
            PeerUnreachable: the connection is or becomes closed (cause: what closed it).
            UnexpectedMessage: the peer answered with a type that does not fit the request.
            LocalProtocolError: ``message`` is not a request or cannot be encoded.
        """
        if message.KIND != "request":
            raise LocalProtocolError(f"{type(message).__name__} is not a request")
        if not self._open:
            raise PeerUnreachable(self.address, f"connection {self._closed_reason}", peer_id=self.peer_id)
        if timeout is None:
            timeout = self._default_timeout
        waiter = _Waiter()
        request_id: int | None = None
        # A bare CancelScope rather than fail_after: the same deadline without a
        # generator-based context manager on every request.
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        try:
            with scope:
                await _acquire(self._slots)
                try:
                    await _acquire(self._send_lock)
                    try:
                        self._check_open()
                        # Cancellation is delivered here, before anything is written,
                        # and _write's first checkpoint cannot raise it afterwards
                        # (no scheduling in between): a cancelled request never
                        # half-writes a frame unless the write itself blocks.
                        await trio.lowlevel.checkpoint_if_cancelled()
                        request_id, payload = self.channel.send_request(message, waiter)
                        self.last_request = trio.current_time()
                        await self._write(await self._seal(payload))
                    finally:
                        self._send_lock.release()
                finally:
                    if request_id is None:
                        self._slots.release()
                await waiter.event.wait()
        finally:
            if request_id is not None and not waiter.event.is_set():
                self.channel.abandon(request_id)  # the reader releases the slot when the late answer comes
        if scope.cancelled_caught and not waiter.event.is_set():
            raise RequestTimeout(type(message).__name__, self.address, timeout, peer_id=self.peer_id)
        return self._result(waiter)

    def _result(self, waiter: _Waiter) -> Message:
        outcome = waiter.outcome
        if isinstance(outcome, ResponseReceived):
            if outcome.error is None:
                assert outcome.response is not None
                return outcome.response
            if isinstance(outcome.error, UnexpectedMessage):
                raise UnexpectedMessage(f"peer {self.peer_id.hex()[:12]} {outcome.error}",
                                        code=outcome.error.code) from None
            raise outcome.error
        raise PeerUnreachable(self.address, f"connection {self._closed_reason}", peer_id=self.peer_id) from outcome

    def _check_open(self) -> None:
        if not self._open:
            raise PeerUnreachable(self.address, f"connection {self._closed_reason}", peer_id=self.peer_id)

    async def _write(self, data: bytes) -> None:
        """Write under the send lock; a write that does not finish breaks the stream."""
        self._writing_since = trio.current_time()
        try:
            await self._stream.send_all(data)
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                self._close("closed: a write was interrupted half-way")
            else:
                self._close(f"lost while sending ({exc!r})")
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                raise PeerUnreachable(self.address, f"connection {self._closed_reason}",
                                      peer_id=self.peer_id) from exc
            raise
        finally:
            self._writing_since = None
        self._last_activity = trio.current_time()

    async def _send_payload(self, payload: bytes) -> None:
        await _acquire(self._send_lock)
        try:
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()  # see request()
            await self._write(await self._seal(payload))
        finally:
            self._send_lock.release()

    async def _seal(self, payload: bytes) -> bytes:
        """``payload`` encrypted and framed, under the send lock: a big one in a bulk
        thread. That consumes a nonce whatever happens next, so the thread is waited
        for even when cancelled; a cancellation that came meanwhile then stops the
        write before its first byte, and the connection closes (its next message could
        not be decrypted), as for any write that is interrupted."""
        if len(payload) < OFFTHREAD_CRYPTO:
            return self._conn.send(payload)
        with trio.CancelScope(shield=True):
            sealed = await run_bulk(self._conn.send, payload)
        return sealed

    # -- the reader -----------------------------------------------------------------

    async def run(self) -> None:
        """Read and dispatch until the peer leaves, the connection fails or is closed.

        Run it once, in the owner's nursery (the connection outlives whoever dialled
        it). Every failure is handled inside (handlers catch their own), so nothing but
        cancellation leaves it and no exception group needs unwrapping.
        """
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._idle_watchdog)
                    try:
                        with self._read_scope:
                            await self._read_loop()
                        if self._read_scope.cancelled_caught:
                            pending = self._conn.incomplete_message
                            log.warning("dropping connection %s: a message of %d bytes was not complete in time",
                                        self, pending)
                            self._close(f"dropped: a message of {pending} bytes was not complete within "
                                        f"{self._resources.message_deadline_for(pending):g} s")
                    except RemoteProtocolError as exc:
                        log.warning("dropping connection %s: %s: %s", self, type(exc).__name__, exc)
                        await self._tell_why(exc)
                        self._close(f"dropped ({type(exc).__name__}: {exc})", exc)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        log.info("connection %s lost: %r", self, exc)
                        self._close(f"lost ({exc!r})", exc)
                    except Exception as exc:  # a bug of ours: keep the peer running, say so loudly
                        log.exception("connection %s failed", self)
                        self._close(f"failed ({type(exc).__name__})", exc)
                    nursery.cancel_scope.cancel()  # handlers cannot answer a closed stream
        finally:
            self._close("closed")
            if self._incomplete is not None:
                self._incomplete.release(self)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            self._finished.set()

    async def _tell_why(self, exc: RemoteProtocolError) -> None:
        """Best effort, before closing for the peer's violation: the connection-level
        ERROR (id 0) saying why (spec section 6), when the channel has one for it and
        our direction still works (it does not after a transport failure)."""
        payload = self.channel.abort_payload(exc)
        if payload is None or not self._open:
            return
        with trio.move_on_after(1.0):
            try:
                await self._send_payload(payload)
            except (SwarmError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _idle_watchdog(self) -> None:
        """Close the connection after ``limits.idle_timeout`` without traffic or work,
        or when one write has made no progress for that long.

        A separate task rather than a deadline on every read: one sleep per idle
        period instead of a cancel scope per received chunk. The stalled-write check
        matters because a connection with an unanswered request is never idle: a
        peer that sends requests and stops reading would otherwise pin the handler
        tasks and the connection for good.
        """
        idle = self._limits.idle_timeout
        while True:
            await trio.sleep_until(self._last_activity + idle)
            now = trio.current_time()
            if self._writing_since is not None and now - self._writing_since >= idle:
                log.warning("peer of %s read nothing for %g s; closing the connection", self, idle)
                self._close("closed: the peer stopped reading")
                return
            if self._busy():
                self._last_activity = now
            elif now >= self._last_activity + idle:
                log.debug("closing idle connection %s", self)
                self._close("closed after being idle")
                return

    def _account(self, pending: int) -> None:
        """A message of ``pending`` declared bytes is incomplete (0: none): reserve its
        bytes from the host's budget and set its deadline (spec section 15)."""
        self._tracked = (self._received, pending)
        if self._incomplete is not None:
            self._incomplete.release(self)
        if not pending:
            self._read_scope.deadline = math.inf
            return
        if pending > UNSERVED_CAP and self._incomplete is not None:
            if not self._incomplete.reserve(self, self.group, pending):
                raise LimitExceeded(f"no room for an incomplete message of {pending} bytes: this host's budget "
                                    f"for incomplete messages (or {self.group}'s share of it) is full")
        self._read_scope.deadline = trio.current_time() + self._resources.message_deadline_for(pending)

    async def _read_loop(self) -> None:
        conn, channel = self._conn, self.channel
        size = RECEIVE_SIZE
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                pending = conn.incomplete_message
                if (self._received, pending) != self._tracked:
                    self._account(pending)
                data = await self._stream.receive_some(size)
                size = min(size * 4, MAX_RECEIVE_SIZE) if len(data) == size else RECEIVE_SIZE
                self._last_activity = trio.current_time()
                conn.receive_data(data)
                if conn.undecrypted_bytes >= OFFTHREAD_CRYPTO:
                    await run_bulk(conn.decrypt_received)  # nothing else receives on conn meanwhile
            elif type(event) is MessageReceived:
                self._received += 1
                payload = event.payload
                if len(payload) > OFFTHREAD_DECODE:
                    decoded = await trio.to_thread.run_sync(channel.decode, payload, limiter=self._decode_limiter)
                    received = channel.accept(decoded)
                else:
                    received = channel.receive(payload)
                if type(received) is ResponseReceived:
                    self._slots.release()
                    waiter = received.token
                    if waiter is not None:
                        waiter.outcome = received
                        waiter.event.set()
                elif isinstance(received, (RequestReceived, RequestRefused)):
                    assert self._nursery is not None  # only the reader, inside run, gets here
                    self.last_request = trio.current_time()
                    self._nursery.start_soon(self._answer, received)
            elif type(event) is ConnectionEnded:
                log.debug("peer closed connection %s", self)
                self._close("closed by the peer")
                return

    def _busy(self) -> bool:
        # An answer being written is work too: its request is no longer counted.
        return self.channel.incoming > 0 or self.channel.awaited > 0 or self._writing_since is not None

    async def _answer(self, event: RequestReceived | RequestRefused) -> None:
        counted = True  # in the channel's count of the peer's requests open on us
        try:
            if isinstance(event, RequestRefused):
                payload = event.payload
            else:
                payload, problem = self.channel.answer(event, await self._serve(event.request))
                if problem is not None:
                    log.error("answering %s from %s: %s", type(event.request).__name__, self, problem)
            # Uncounted before the answer is written: the peer may send its next request
            # as soon as it reads this one's answer, and the reader may take it before
            # this task runs again; counted until then, it would make an honest peer
            # exceed max_concurrent_requests (and lose the connection) after a burst.
            counted = False
            self.channel.answered()
            await self._send_payload(payload)
        except PeerUnreachable:
            pass  # the connection closed while the handler ran; nobody to answer
        except Exception:  # a bug of ours (the handler's own errors are answered by _serve)
            log.exception("answering a request from %s failed; closing the connection", self)
            self._close("failed while answering a request")
        finally:
            if counted:
                self.channel.answered()

    async def _serve(self, request: Message) -> Message | BaseException:
        """The handler's response, or the exception it raised (answered as ``ERROR``)."""
        try:
            return await self._handlers[type(request)](self, request)
        except SwarmError as exc:
            return exc
        except Exception as exc:
            log.exception("handler for %s from %s failed", type(request).__name__, self)
            return exc

    # -- closing --------------------------------------------------------------------

    def _close(self, reason: str, cause: BaseException | None = None) -> None:
        """Mark closed, fail every waiting requester, tell the owner, and stop the
        reader (idempotent)."""
        if not self._open:
            return
        self._open = False
        self._closed_reason = reason
        error = cause if cause is not None else trio.ClosedResourceError(reason)
        for waiter in self.channel.close():
            waiter.outcome = error
            waiter.event.set()
        self._cancel_scope.cancel()
        self._closed.set()
        try:
            self._on_close(self)
        except Exception:
            log.exception("close callback of %s failed", self)

    def drop(self, reason: str) -> None:
        """Close at once, without waiting for the reader to finish (the owner trimming
        connections); outstanding requests on both sides fail. Idempotent."""
        self._close(f"closed: {reason}")

    async def aclose(self) -> None:
        """Close the connection: outstanding requests on both sides fail. Idempotent."""
        self._close("closed by us")
        await self._finished.wait()
