"""One open, authenticated connection to a peer: request multiplexing over a
``protocol.Connection`` (spec/SPEC.md, "Transport" and "Requests and responses").

Theory of operation. A ``PeerConnection`` is created by ``Host`` after a completed
handshake and lives in the host's nursery (``_run``). Its one reader task pulls
events from the sans-IO connection and dispatches each message by kind:

* a response is matched by id with one of *our* outstanding requests (ids are
  per direction: each side numbers its own requests) and handed to the waiting
  requester through its ``_Waiter`` (an Event plus a slot), with no task spawned;
* a request starts a handler task in the connection's nursery; the handler's
  return value, or the ``ERROR`` its exception maps to, is sent back.

Sends are serialised by a ``StrictFIFOLock`` held across encrypt-and-write, so the
Noise nonce order is the write order. A write interrupted half-way (cancelled or
failed) leaves a partial frame on the stream, so it closes the connection.

Outgoing requests take a slot of a semaphore sized ``limits.max_concurrent_requests``,
so this side never trips the peer's limit; a slot is released when the response
arrives, not when the requester gives up (a timed-out request still occupies the
peer until it answers). Incoming requests beyond the limit drop the connection.

A watchdog task closes the connection after ``limits.idle_timeout`` without traffic
while nothing is outstanding either way, or when one write has been stuck that long
(the peer stopped reading).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from protocol import (
    NEED_DATA,
    RESPONSES,
    Connection,
    ConnectionEnded,
    Error,
    HandshakeComplete,
    Limits,
    Message,
    MessageReceived,
    cbor_decode,
    decode_message,
    encode_message,
)
from protocol.errors import (
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    SwarmError,
    UnexpectedMessage,
)

from ..errors import PeerUnreachable, RequestTimeout

if TYPE_CHECKING:
    from ..transport import Host

__all__ = ["PeerConnection", "Handler", "RECEIVE_SIZE"]

log = logging.getLogger("swarm.transport")

Handler = Callable[["PeerConnection", Message], Awaitable[Message]]

#: Bytes asked of the socket per read. CPython's recv allocates the whole size up
#: front: asking 256 KiB for a 100-byte message costs ~70 us against ~10 us for 64 KiB
#: (measured), so reads start small and grow only while they come back full.
RECEIVE_SIZE = 64 * 1024
MAX_RECEIVE_SIZE = 1024 * 1024
_MAX_ERROR_TEXT = 1024  # bytes; Error.message's limit


async def _acquire(lock: trio.StrictFIFOLock | trio.Semaphore) -> None:
    """Acquire without a scheduler round trip when free (the write that follows
    checkpoints anyway); wait in FIFO order otherwise."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class _Waiter:
    """The rendezvous of one outstanding request with the reader task."""

    __slots__ = ("event", "response", "error", "orphan")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Message | None = None
        self.error: BaseException | None = None
        self.orphan = False  # the requester gave up; only the peer's slot is still held


def error_response(request_id: int, exc: BaseException) -> Error:
    """The ``ERROR`` a handler's exception becomes (RemoteError keeps code and retry_after)."""
    if isinstance(exc, SwarmError):
        code, text = int(exc.code), str(exc)
    else:
        code, text = int(ErrorCode.INTERNAL), "internal error"
    retry_after = getattr(exc, "retry_after", None) if isinstance(exc, RemoteError) else None
    if retry_after is not None and not (isinstance(retry_after, (int, float)) and math.isfinite(retry_after)
                                        and retry_after >= 0):
        retry_after = None
    text = text.encode("utf-8", "replace")[:_MAX_ERROR_TEXT].decode("utf-8", "ignore")
    return Error(id=request_id, code=code if 0 <= code <= 65535 else int(ErrorCode.INTERNAL), message=text,
                 retry_after=None if retry_after is None else float(retry_after))


class PeerConnection:
    """An open connection to an authenticated peer, shared by everything that talks to it.

    Attributes:
        peer_id, public_key: the peer's proven identity (from the handshake).
        listen_addrs: the addresses the peer says it listens on (unverified claims).
        handshake_hash: the Noise handshake hash, unique to this connection.
        address: the remote socket address, ``host:port``.
        inbound: whether the peer dialled us.
    """

    def __init__(self, host: Host, stream: trio.SocketStream, conn: Connection, info: HandshakeComplete, *,
                 address: str, inbound: bool, limits: Limits, default_timeout: float) -> None:
        self.peer_id = info.peer_id
        self.public_key = info.public_key
        self.listen_addrs = info.listen_addrs
        self.handshake_hash = info.handshake_hash
        self.address = address
        self.inbound = inbound
        self._host = host
        self._stream = stream
        self._conn = conn
        self._limits = limits
        self._default_timeout = default_timeout
        self._send_lock = trio.StrictFIFOLock()
        self._slots = trio.Semaphore(limits.max_concurrent_requests)
        self._pending: dict[int, _Waiter] = {}
        self._next_id = 1
        self._incoming = 0  # unanswered requests the peer has open on us
        self._last_activity = trio.current_time()
        self._writing_since: float | None = None  # when the write in progress started
        self._open = True
        self._closed_reason = "closed"
        self._cancel_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None  # handler tasks; set by _run
        self._finished = trio.Event()

    def __repr__(self) -> str:
        direction = "from" if self.inbound else "to"
        return f"<PeerConnection {direction} {self.peer_id.hex()[:12]} at {self.address}{'' if self._open else ' closed'}>"

    @property
    def is_open(self) -> bool:
        return self._open

    # -- requests we make ---------------------------------------------------------

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send ``message`` (a request) and return the peer's response.

        The message's id is replaced by a fresh one of this connection. Cancellation
        (or the timeout) abandons the wait; the connection stays usable unless the
        request was being written at that moment.

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
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id + 1 < 2**64 else 1
        if message.id != request_id:
            message = dataclasses.replace(message, id=request_id)
        payload = encode_message(message)
        waiter = _Waiter()
        registered = False
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
                        data = self._conn.send(payload)
                        self._pending[request_id] = waiter
                        registered = True
                        await self._write(data)
                    finally:
                        self._send_lock.release()
                finally:
                    if not registered:
                        self._slots.release()
                await waiter.event.wait()
        finally:
            if not waiter.event.is_set():
                waiter.orphan = True  # the reader releases the slot when the late answer comes
        if scope.cancelled_caught and not waiter.event.is_set():
            raise RequestTimeout(type(message).__name__, self.address, timeout, peer_id=self.peer_id)
        return self._result(message, waiter)

    def _result(self, request: Message, waiter: _Waiter) -> Message:
        if isinstance(waiter.error, UnexpectedMessage):
            raise waiter.error
        if waiter.error is not None:
            raise PeerUnreachable(self.address, f"connection {self._closed_reason}",
                                  peer_id=self.peer_id) from waiter.error
        response = waiter.response
        assert response is not None
        if type(response) is Error:
            raise RemoteError(response.message, code=response.code, retry_after=response.retry_after)
        if type(response) is not RESPONSES.get(type(request)):
            raise UnexpectedMessage(f"peer {self.peer_id.hex()[:12]} answered {type(request).__name__} "
                                    f"with {type(response).__name__}")
        return response

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
            await self._write(self._conn.send(payload))
        finally:
            self._send_lock.release()

    # -- the reader -----------------------------------------------------------------

    async def _run(self) -> None:
        """Read and dispatch until the peer leaves, the connection fails or is closed.

        Every failure is handled inside the nursery (handlers catch their own), so
        nothing but cancellation leaves it and no exception group needs unwrapping.
        """
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._idle_watchdog)
                    try:
                        await self._read_loop()
                    except RemoteProtocolError as exc:
                        log.warning("dropping connection %s: %s: %s", self, type(exc).__name__, exc)
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
            self._host._forget(self)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            self._finished.set()

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

    async def _read_loop(self) -> None:
        conn = self._conn
        size = RECEIVE_SIZE
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                data = await self._stream.receive_some(size)
                size = min(size * 4, MAX_RECEIVE_SIZE) if len(data) == size else RECEIVE_SIZE
                self._last_activity = trio.current_time()
                conn.receive_data(data)
            elif type(event) is MessageReceived:
                self._dispatch(event.payload)
            elif type(event) is ConnectionEnded:
                log.debug("peer closed connection %s", self)
                self._close("closed by the peer")
                return

    def _busy(self) -> bool:
        return self._incoming > 0 or any(not w.orphan for w in self._pending.values())

    def _dispatch(self, payload: bytes) -> None:
        try:
            message = decode_message(payload, limits=self._limits)
        except UnexpectedMessage as exc:
            if exc.code != ErrorCode.UNKNOWN_MESSAGE:
                raise
            self._unknown_type(payload, exc.request_id)  # type: ignore[attr-defined]
            return
        if message.KIND == "response":
            waiter = self._pending.pop(message.id, None)
            if waiter is None:
                log.debug("ignoring %s with id %d from %s: no such request outstanding",
                          type(message).__name__, message.id, self)
                return
            self._slots.release()
            waiter.response = message
            waiter.event.set()
        else:
            self._start_handler(message.id, message)

    def _unknown_type(self, payload: bytes, request_id: int) -> None:
        """Request types are even, response types odd (spec "Message registry")."""
        type_number = cbor_decode(payload, max_size=self._limits.max_message_size)[0]
        if type_number % 2 == 0:
            self._start_handler(request_id, None, type_number)
            return
        waiter = self._pending.pop(request_id, None)
        if waiter is None:
            log.debug("ignoring unknown response type %d from %s", type_number, self)
            return
        self._slots.release()
        waiter.error = UnexpectedMessage(f"peer {self.peer_id.hex()[:12]} answered with unknown message type "
                                         f"{type_number}", code=ErrorCode.UNKNOWN_MESSAGE)
        waiter.event.set()

    def _start_handler(self, request_id: int, request: Message | None, type_number: int = 0) -> None:
        if self._incoming >= self._limits.max_concurrent_requests:
            raise LimitExceeded(f"more than {self._limits.max_concurrent_requests} concurrent requests")
        self._incoming += 1
        assert self._nursery is not None  # only the reader, inside _run, gets here
        self._nursery.start_soon(self._handle, request_id, request, type_number)

    async def _handle(self, request_id: int, request: Message | None, type_number: int) -> None:
        try:
            response = await self._respond(request_id, request, type_number)
            try:
                payload = encode_message(response)
                if len(payload) > self._limits.max_message_size:
                    raise LocalProtocolError(f"response of {len(payload)} bytes exceeds the message size limit")
            except SwarmError as exc:
                log.error("cannot send the %s answering %s from %s: %s", type(response).__name__,
                          type(request).__name__, self, exc)
                payload = encode_message(error_response(request_id, Exception()))
            await self._send_payload(payload)
        except PeerUnreachable:
            pass  # the connection closed while the handler ran; nobody to answer
        except Exception:  # a bug of ours (the handler's own errors are answered in _respond)
            log.exception("answering %s from %s failed; closing the connection", type(request).__name__, self)
            self._close("failed while answering a request")
        finally:
            self._incoming -= 1

    async def _respond(self, request_id: int, request: Message | None, type_number: int) -> Message:
        if request is None:
            return Error(id=request_id, code=int(ErrorCode.UNKNOWN_MESSAGE),
                         message=f"unknown message type {type_number}")
        handler = self._host._handlers.get(type(request))
        if handler is None:
            return Error(id=request_id, code=int(ErrorCode.UNKNOWN_MESSAGE),
                         message=f"{type(request).__name__} is not served by this peer")
        try:
            response = await handler(self, request)
        except SwarmError as exc:
            return error_response(request_id, exc)
        except Exception as exc:
            log.exception("handler for %s from %s failed", type(request).__name__, self)
            return error_response(request_id, exc)
        if not isinstance(response, Message) or (type(response) is not Error
                                                 and type(response) is not RESPONSES.get(type(request))):
            log.error("handler for %s returned %r, not a %s", type(request).__name__, type(response).__name__,
                      RESPONSES[type(request)].__name__)
            return error_response(request_id, Exception())
        return response if response.id == request_id else dataclasses.replace(response, id=request_id)

    # -- closing --------------------------------------------------------------------

    def _close(self, reason: str, cause: BaseException | None = None) -> None:
        """Mark closed, fail every waiting requester, and stop the reader (idempotent)."""
        if not self._open:
            return
        self._open = False
        self._closed_reason = reason
        error = cause if cause is not None else trio.ClosedResourceError(reason)
        for waiter in self._pending.values():
            waiter.error = error
            waiter.event.set()
        self._pending.clear()
        self._cancel_scope.cancel()

    async def aclose(self) -> None:
        """Close the connection: outstanding requests on both sides fail. Idempotent."""
        self._close("closed by us")
        await self._finished.wait()

