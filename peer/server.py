"""The serving side of a peer: inference sessions over the swarm transport.

Theory of operation. ``SpanServer`` registers handlers for OPEN_SESSION, FORWARD,
FORWARD_ONCE and CLOSE_SESSION on a ``swarm.transport.Host``. Every request is
checked before any compute: the session's owner (sessions belong to the connection
that opened them), then the protocol's forward exchange (``protocol.check_forward``:
the input, the session state table, the client's signature over the forward request
statement, spec sections 9 and 11). The compute itself goes to the peer's one
``Scheduler`` (``peer.scheduler``), which grants slots in credit order and runs the
step in one of its worker threads; a session computes one step at a time. Every
result is signed over the forward result statement (``protocol.sign_result``), and
the session's ``SessionState`` keeps the client-signed requests, so a false
accusation can be refuted with the client's own signatures (spec section 13).

PUSH (spec section 11.4) is a step of a chain the client authorized as a whole: the
route names, per hop, the session the client opened there. The first hop takes it
from the client's connection, every other hop from the previous hop of the route
(the only peer it may come from); ``protocol.check_push`` checks the client's
signature over the route and the upstream's signature over the input it handed on.
After computing, the hop sends its signed output on to the next hop of the route
(connecting to it if needed: a server pushes to no one else), or, as the last hop,
every output to the client. A hop that cannot go on (its next hop unreachable,
failing or refusing, or its own input refused) reports it to the client, signed, with
the outputs it holds; the client carries on from there (``peer._push``).

Shutdown (``drain``): new sessions are refused with SHUTTING_DOWN, in-flight steps
finish (up to a grace period), then the caller cancels the server's scope, which
withdraws the announcement (``swarm.announce.Announcer``).

What one requester can take is bounded before the work is done (``ServerLimits``;
spec section 15, "Server limits"): sessions per requester and per address group, a
session that never got a step expires after ``unused_session_timeout``, the KV cache
budget (the executor's) counts sessions and the transient cache of a long
FORWARD_ONCE alike, and one address group's sessions and FORWARD_ONCEs together hold
at most ``group_cache_share`` of it, FORWARD_ONCE tokens are capped per request, per
requester and per address group in flight, and the size caps of FORWARD (per connection: the largest session opened on
it) and FORWARD_ONCE (the per-request token cap) are set on the transport so that an
oversized message is refused from its first bytes. Compute is charged by work
(tokens x blocks), and the scheduler's unit of fairness among requesters without
credit is the address group (``_fair_group``: the identities of one remote /24 share
one turn; in one of the server's own groups each identity is its own): a step is
submitted to the scheduler in pieces of at most
``quantum`` work units (``SpanExecutor.forward_job``: whole blocks for a session,
whose output does not change; chunks of ``chunk_tokens`` tokens too for a long
FORWARD_ONCE or a long prefill, so that no piece's scratch memory grows with the square
of a long prompt), so a decode step waits for at most one piece of someone else's big
request, and a step of at most ``small_step_tokens`` tokens is marked small, which lets
it take the scheduler's small-step slot: it then waits for no big piece at all.

Batching across sessions (issue 16): a step of at most a quantum of work is submitted
with a batch key (the executor, its blocks and its token count), so the scheduler
computes the waiting steps of concurrent sessions over the same blocks as one forward
(``SpanExecutor.forward_batch``: per-row positions and masks, each session's own cache),
continuously: steps that arrive while a batch computes make the next one. The
scheduler decides who enters a batch and in what order (credit, the optimistic share;
``SchedulerConfig.max_batch`` / ``--max-batch``, 1 turns batching off). Each step is
still checked, signed and charged on its own; its output equals the lone step's up to
float rounding. Steps with different token counts are not batched together (a padded
row would cost as much as a real one), nor bigger steps (prefills), which go in pieces.

``answer_loading`` serves the session requests of a peer that is still loading its
span: ``ERROR LOADING`` with a ``retry_after``, so that clients route around it
rather than take "not served" for an answer (spec section 11).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import trio

from protocol import (
    Announcement,
    CloseSession,
    Forward,
    ForwardOnce,
    ForwardOnceResult,
    ForwardResult,
    Identity,
    OpenSession,
    Push,
    Pushed,
    PushResult,
    SessionClosed,
    SessionOpened,
    SessionPhase,
    SessionState,
    WireTensor,
    check_forward,
    check_forward_once,
    check_open_session,
    check_push,
    push_input,
    push_onward,
    sign_push_failure,
    sign_push_output,
    decode_tensor,
    encode_tensor,
    sign_forward_once_result,
    sign_result,
    type_cap,
)
from protocol.errors import ErrorCode, ProtocolError, RemoteError, SwarmError, UnexpectedMessage
from swarm.errors import PeerUnreachable, RequestTimeout
from swarm.transport import Host, PeerConnection

from swarm.bulk import run_bulk
from .runtime import ForwardJob, SessionStep, SpanExecutor
from .scheduler import Scheduler

__all__ = ["SpanServer", "ServerStats", "ServerLimits", "answer_loading"]

log = logging.getLogger("swarm.server")

T = TypeVar("T")
#: Inputs larger than this are hashed, checked and decoded in a worker thread.
OFFTHREAD_BYTES = 1 << 20
SESSION_TAG = "sessions"  # the connection tag that keeps a connection with sessions from being trimmed


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    """What one requester may take of a server (spec section 15, "Server limits")."""

    max_sessions: int = 16  # sessions open at once; beyond, OPEN_SESSION gets BUSY
    max_sessions_per_peer: int = 4  # ... per requesting identity
    max_sessions_per_group: int = 4  # ... per address group of requesters (own groups exempt)
    group_cache_share: float = 0.25  # of the cache budget, what one address group's sessions and FORWARD_ONCEs hold
    unused_session_timeout: float = 15.0  # a session without a step is closed after this many seconds
    max_forward_once_tokens: int = 8192  # tokens of one FORWARD_ONCE (and at most the model's context)
    max_once_tokens_per_peer: int = 8192  # FORWARD_ONCE tokens one requester may have queued or computing
    max_once_tokens_per_group: int = 8192  # ... the requesters of one address group together (own groups exempt)
    quantum: int = 512  # work units (tokens x blocks) of one compute grant
    chunk_tokens: int = 256  # a longer FORWARD_ONCE is computed this many tokens at a time
    small_step_tokens: int = 9  # a step of at most this many tokens may take the scheduler's small-step slot (a token and 8 drafts: speculative decoding's default k_max)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"server limit {name} must be positive")
        if self.group_cache_share > 1:
            raise ValueError("server limit group_cache_share must be at most 1")


@dataclass(slots=True)
class ServerStats:
    """Counters for the live status line and ``swarm-peer status``."""

    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    tokens: int = 0  # tokens through the span (prefill tokens count one each)
    sessions_opened: int = 0
    compute_seconds: float = 0.0
    batched_steps: int = 0  # steps computed in a batch with other sessions' steps
    largest_batch: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.compute_seconds if self.compute_seconds > 0 else 0.0


@dataclass(slots=True)
class _Served:
    """A session as the server keeps it: the connection that owns it, and its protocol
    state (the client-signed transcript included). The KV cache is the executor's."""

    owner: PeerConnection
    state: SessionState
    opened: float  # the server's clock when it opened
    reserved: int = 0  # cache budget bytes the executor reserved for it
    computing: bool = False  # a step is in a worker thread: the cache is not to be touched


class SpanServer:
    """Serves one span of one model on ``host``.

    Args:
        host: the transport (not yet running, or running: handlers are added at once).
        executor: the loaded span.
        max_sessions: sessions open at once; beyond it OPEN_SESSION gets BUSY
            (overrides ``limits.max_sessions``).
        limits: what one requester may take (``ServerLimits``).
        on_work: called with (requester's connection, work units) after every served
            step; the credit ledger hooks in here.
        compute: the peer's compute scheduler (shared with fraud proof verification);
            default: a one-slot scheduler that knows no credit (first come, first served).
        banned: requesters answered BANNED (a live set: the fraud proof service adds to it).
    """

    def __init__(
        self,
        host: Host,
        executor: SpanExecutor,
        *,
        max_sessions: int | None = None,
        limits: ServerLimits | None = None,
        drain_grace: float = 30.0,
        on_work: Callable[[PeerConnection, int], None] | None = None,
        compute: Scheduler | None = None,
        banned: Collection[bytes] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        limits = limits or ServerLimits()
        if max_sessions is not None:
            if max_sessions < 1:
                raise ValueError("max_sessions must be at least 1")
            limits = ServerLimits(**{**{f: getattr(limits, f) for f in limits.__dataclass_fields__},
                                     "max_sessions": max_sessions})
        self.limits = limits
        self.host = host
        self.identity: Identity = host.identity
        self.executor = executor
        self.model = executor.model_id
        self.span = (executor.start, executor.end)
        self.max_sessions = limits.max_sessions
        self.drain_grace = drain_grace
        self.stats = ServerStats()
        self.draining = False
        self._on_work = on_work
        self.compute = compute or Scheduler(1)
        self.banned = banned  # peers refused with BANNED (verify.Reputation.banned, shared)
        self._clock = clock
        self._sessions: dict[bytes, _Served] = {}
        self._once_tokens: dict[bytes, int] = {}  # requester -> FORWARD_ONCE tokens queued or computing
        self._group_once_tokens: dict[str, int] = {}  # address group -> the same, its requesters together
        self._group_once_bytes: dict[str, int] = {}  # address group -> cache bytes its running FORWARD_ONCEs hold
        # Long FORWARD_ONCEs in progress at once, whoever asks: each holds a cache and
        # scratch memory of its own while its pieces run, so they take turns; decode
        # steps still run between their pieces.
        self._long_jobs = trio.Semaphore(self.compute.capacity)
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        for request_type, handler in (
            (OpenSession, self._open_session),
            (Forward, self._forward),
            (ForwardOnce, self._forward_once),
            (Push, self._push),
            (CloseSession, self._close_session),
        ):
            host.add_handler(request_type, handler)
        self._set_caps()

    def _set_caps(self) -> None:
        """The transport's size caps for this span's requests (spec section 7.5): a
        FORWARD of one token until a session is opened on the connection, a FORWARD_ONCE
        of ``max_once_tokens``."""
        limits, hidden = self.host.limits, self.executor.hidden_size
        self.host.set_request_cap(Forward, type_cap(Forward, limits, hidden))
        self.host.set_request_cap(ForwardOnce, type_cap(ForwardOnce, limits, hidden * self.max_once_tokens))

    @property
    def max_once_tokens(self) -> int:
        """Tokens one FORWARD_ONCE may carry: the limit, and at most the model's context."""
        context = self.executor.context_length
        return min(self.limits.max_forward_once_tokens, context) if context else self.limits.max_forward_once_tokens

    # -- status ---------------------------------------------------------------------------

    @property
    def free_sessions(self) -> int:
        return 0 if self.draining else max(self.max_sessions - len(self._sessions), 0)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def swap_executor(self, executor: SpanExecutor) -> None:
        """Serve another span of the same model (rebalancing); only while no session is open."""
        if self._sessions or self._in_flight:
            raise RuntimeError("cannot change the served span while sessions are open")
        if executor.model_id != self.model:
            raise ValueError(f"{executor.model_id} is not the served model {self.model}")
        self.executor = executor
        self.span = (executor.start, executor.end)
        self._set_caps()

    def make_announcement(self, expires: int, throughput: float) -> Announcement:
        return Announcement(peer_id=self.identity.peer_id, addrs=tuple(self.host.listen_addrs), model=self.model,
                              span=self.span, throughput=throughput, free_sessions=self.free_sessions,
                              expires=expires, num_blocks=self.executor.info.num_blocks,
                              hidden_size=self.executor.hidden_size)

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  sweep_interval: float = 1.0) -> None:
        """Evict sessions of closed connections and idle ones, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(sweep_interval)
            self.sweep()

    def sweep(self) -> list[bytes]:
        """Close sessions whose connection ended, that never got a step within
        ``unused_session_timeout`` (a client that failed half-way through opening its
        route, issue 12), or that idled past the executor's timeout."""
        now = self._clock()
        unused = self.limits.unused_session_timeout
        gone = [sid for sid, s in self._sessions.items() if not s.owner.is_open
                or (s.state.length == 0 and not s.computing and now - s.opened > unused)]
        gone += [sid for sid in self.executor.evict_idle(now) if sid in self._sessions and sid not in gone]
        for sid in gone:
            self._drop(sid)
        return gone

    async def drain(self) -> None:
        """Refuse new sessions and wait (up to ``drain_grace``) for in-flight steps."""
        self.draining = True
        with trio.move_on_after(self.drain_grace):
            await self._idle.wait()

    def _drop(self, sid: bytes) -> None:
        served = self._sessions.pop(sid, None)
        if served is None:
            return
        if served.state.phase is SessionPhase.OPEN:
            served.state.evict()
        try:
            self.executor.close_session(sid)
        except SwarmError:
            pass  # already evicted by the executor itself
        self._untag(served.owner)

    def _untag(self, conn: PeerConnection) -> None:
        if not any(s.owner is conn for s in self._sessions.values()):
            conn.unprotect(SESSION_TAG)

    # -- handlers -------------------------------------------------------------------------

    async def _open_session(self, conn: PeerConnection, msg: OpenSession) -> SessionOpened:
        if conn.peer_id in self.banned:
            raise RemoteError("you are banned by this peer (a verified fraud proof)", code=ErrorCode.BANNED)
        if self.draining:
            raise RemoteError("this server is shutting down; route around it", code=ErrorCode.SHUTTING_DOWN)
        self._check_target(msg.model, msg.span)
        blocksize = check_open_session(msg)
        if len(self._sessions) >= self.max_sessions:
            self.sweep()
            if len(self._sessions) >= self.max_sessions:
                raise RemoteError(f"all {self.max_sessions} session slots are taken", code=ErrorCode.BUSY,
                                  retry_after=1.0)
        mine = sum(1 for s in self._sessions.values() if s.state.client == conn.peer_id)
        if mine >= self.limits.max_sessions_per_peer:
            raise RemoteError(f"you have {mine} sessions open here, the most one peer may have; close one first",
                              code=ErrorCode.BUSY, retry_after=1.0)
        if conn.group not in self.host.manager.exempt_groups:
            near = sum(1 for s in self._sessions.values() if s.owner.group == conn.group)
            if near >= self.limits.max_sessions_per_group:
                raise RemoteError(f"{near} sessions are open from {conn.group}, the most one address group may "
                                  "have; retry later", code=ErrorCode.BUSY, retry_after=1.0)
        need = self.executor.transient_bytes(msg.max_length, start=msg.span[0], end=msg.span[1])
        self._check_group_bytes(conn, need)
        sid = self.executor.open_session(msg.max_length, start=msg.span[0], end=msg.span[1])
        state = SessionState(client=conn.peer_id, server=self.identity.peer_id, session=sid, model=self.model,
                             span=msg.span, max_length=msg.max_length, wire_dtype=msg.wire_dtype,
                             blocksize=blocksize)
        state.open()
        self._sessions[sid] = _Served(owner=conn, state=state, opened=self._clock(), reserved=need)
        # this connection may now send FORWARDs as long as the session (the cap only grows)
        conn.allow(Forward, type_cap(Forward, self.host.limits, self.executor.hidden_size * msg.max_length))
        conn.protect(SESSION_TAG)
        self.stats.sessions_opened += 1
        return SessionOpened(session=sid)

    async def _forward(self, conn: PeerConnection, msg: Forward) -> ForwardResult:
        if conn.peer_id in self.banned:
            raise RemoteError("you are banned by this peer (a verified fraud proof)", code=ErrorCode.BANNED)
        served = self._sessions.get(msg.session)
        if served is None or served.owner is not conn:
            raise RemoteError("unknown session (closed, evicted, or opened on another connection); open a new one",
                              code=ErrorCode.UNKNOWN_SESSION)
        if served.computing:  # one step at a time: the executor runs a session in one thread
            raise UnexpectedMessage("the session's previous step is still being computed; wait for its result")
        state = served.state
        served.computing = True
        try:
            n_tokens, hidden = await self._off_loop(len(msg.hidden.data), self._check_and_decode, state, msg,
                                                    conn.public_key)
            output = await self._session_step(conn, state.span, msg.session, hidden, msg.position, n_tokens)
            if self._sessions.get(msg.session) is not served:  # closed while computing
                raise RemoteError("the session was closed during the step", code=ErrorCode.UNKNOWN_SESSION)
            # Still computing while it is signed (off the loop when big): signing records the step in state.
            return await self._off_loop(output.nbytes, self._sign, sign_result, state, msg, output)
        finally:
            served.computing = False

    def _sign(self, sign: Callable[..., T], state: SessionState, msg: Any, output: torch.Tensor) -> T:
        """``output`` encoded in the session's wire dtype and signed by ``sign``: hashing
        a whole-context tensor takes milliseconds, hence ``_off_loop``."""
        return sign(self.identity, state, msg, encode_tensor(output, state.wire_dtype, blocksize=state.blocksize))

    def _check_and_decode(self, state: SessionState, msg: Forward, public_key: bytes) -> tuple[int, torch.Tensor]:
        n_tokens = check_forward(state, msg, client_public_key=public_key, hidden_size=self.executor.hidden_size)
        return n_tokens, self._decode(msg.hidden)

    async def _forward_once(self, conn: PeerConnection, msg: ForwardOnce) -> ForwardOnceResult:
        if conn.peer_id in self.banned:
            raise RemoteError("you are banned by this peer (a verified fraud proof)", code=ErrorCode.BANNED)
        self._check_target(msg.model, msg.span)
        shape = msg.hidden.shape
        n_tokens = shape[1] if len(shape) == 3 else 0  # a wrong shape is check_forward_once's to refuse
        if n_tokens > self.max_once_tokens:
            raise RemoteError(f"a FORWARD_ONCE of {n_tokens} tokens exceeds this server's limit of "
                              f"{self.max_once_tokens}", code=ErrorCode.MAX_LENGTH_EXCEEDED)
        queued = self._once_tokens.get(conn.peer_id, 0)
        if queued + n_tokens > self.limits.max_once_tokens_per_peer:
            raise RemoteError(f"you have {queued} FORWARD_ONCE tokens queued here; wait for their results",
                              code=ErrorCode.BUSY, retry_after=1.0)
        group = conn.group if conn.group not in self.host.manager.exempt_groups else None
        if group is not None:
            near = self._group_once_tokens.get(group, 0)
            if near + n_tokens > self.limits.max_once_tokens_per_group:
                raise RemoteError(f"{near} FORWARD_ONCE tokens from {group} are queued here, the most one address "
                                  "group may have; retry later", code=ErrorCode.BUSY, retry_after=1.0)
            self._group_once_tokens[group] = near + n_tokens
        self._once_tokens[conn.peer_id] = queued + n_tokens
        try:
            state, hidden = await self._off_loop(len(msg.hidden.data), self._check_and_decode_once, conn, msg)
            start, end = msg.span
            job = self.executor.forward_once_job(hidden, start=start, end=end, quantum=self.limits.quantum,
                                                 chunk_tokens=self.limits.chunk_tokens)
            long = len(job.pieces) > 1
            transient = self.executor.transient_bytes(n_tokens, start=start, end=end) if long else 0
            async with self._long_jobs if long else _NO_LIMIT:
                self._check_group_bytes(conn, transient)
                self.executor.reserve(transient)  # counted against the same budget as sessions
                _add(self._group_once_bytes, group, transient)
                try:
                    output = await self._compute_step(conn, msg.span, n_tokens, job)
                finally:
                    self.executor.release(transient)
                    _add(self._group_once_bytes, group, -transient)
        finally:
            _add(self._once_tokens, conn.peer_id, -n_tokens)
            _add(self._group_once_tokens, group, -n_tokens)
        return await self._off_loop(output.nbytes, self._sign, sign_forward_once_result, state, msg, output)

    def _check_and_decode_once(self, conn: PeerConnection, msg: ForwardOnce) -> tuple[SessionState, torch.Tensor]:
        state = check_forward_once(msg, client=conn.peer_id, client_public_key=conn.public_key,
                                   server=self.identity.peer_id, hidden_size=self.executor.hidden_size)
        return state, self._decode(msg.hidden)

    async def _off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: in a bulk thread for an input over ``OFFTHREAD_BYTES`` (hashing
        and decoding it takes milliseconds other connections would wait for), else here."""
        if size > OFFTHREAD_BYTES:
            return await run_bulk(fn, *args)
        return fn(*args)

    async def _push(self, conn: PeerConnection, msg: Push) -> Pushed:
        index = msg.index
        hop = msg.route[index]
        served = self._sessions.get(hop.session)
        if conn.peer_id in self.banned or (served is not None and served.owner.peer_id in self.banned):
            raise RemoteError("you are banned by this peer (a verified fraud proof)", code=ErrorCode.BANNED)
        if served is None or (index == 0 and served.owner is not conn):
            raise RemoteError("unknown session (closed, evicted, or opened on another connection); open a new one",
                              code=ErrorCode.UNKNOWN_SESSION)
        if served.computing:
            raise UnexpectedMessage("the session's previous step is still being computed; wait for its result")
        state = served.state
        try:
            n_tokens = check_push(state, msg, client_public_key=served.owner.public_key, sender=conn.peer_id,
                                  sender_public_key=conn.public_key, hidden_size=self.executor.hidden_size)
        except SwarmError as exc:
            if index > 0:  # the upstream may be the one at fault: the client hears it from us
                await self._report(served, msg, msg.outputs, failed=conn.peer_id, exc=exc)
            raise
        served.computing = True
        try:
            hidden = await self._off_loop(len(push_input(msg).data), self._decode, push_input(msg))
            output = await self._session_step(served.owner, state.span, hop.session, hidden, msg.position, n_tokens)
            if self._sessions.get(hop.session) is not served:
                raise RemoteError("the session was closed during the step", code=ErrorCode.UNKNOWN_SESSION)
            signed = await self._off_loop(output.nbytes, self._sign, sign_push_output, state, msg, output)
        finally:
            served.computing = False
        onward = push_onward(msg, signed)
        if isinstance(onward, PushResult):
            await self._deliver(served, onward, timeout=msg.timeout)
            return Pushed()
        nxt = msg.route[index + 1]
        # The next hop answers once the rest of the chain has done its part.
        wait = msg.timeout * (len(msg.route) - index)
        try:
            downstream = await self._connect_next(nxt.addrs, nxt.peer_id, msg.timeout)
            await downstream.request(onward, timeout=wait)
        except (PeerUnreachable, RequestTimeout, RemoteError, ProtocolError) as exc:
            await self._report(served, msg, onward.outputs, failed=nxt.peer_id, exc=exc)
        return Pushed()

    async def _connect_next(self, addrs: tuple[str, ...], peer_id: bytes, timeout: float) -> PeerConnection:
        """A connection to the next hop of a route (the client signed its id and addresses)."""
        last: BaseException | None = None
        for addr in addrs:
            try:
                return await self.host.connect(addr, peer_id=peer_id, timeout=timeout)
            except PeerUnreachable as exc:
                last = exc
        raise PeerUnreachable(",".join(addrs) or "?", f"no address answered ({last})", peer_id=peer_id)

    async def _report(self, served: _Served, msg: Push, outputs: tuple, *, failed: bytes, exc: SwarmError) -> None:
        log.info("push step %d of session %s stopped at %s: %s", msg.route[msg.index].step,
                 msg.route[msg.index].session.hex()[:12], failed.hex()[:12], exc)
        report = sign_push_failure(self.identity, msg, outputs=outputs, failed=failed, code=int(exc.code),
                                   message=str(exc))
        await self._deliver(served, report, timeout=msg.timeout)

    async def _deliver(self, served: _Served, result: PushResult, *, timeout: float) -> None:
        """Send ``result`` to the session's client (best effort: a client that left has
        nothing to wait for)."""
        try:
            await served.owner.request(result, timeout=timeout)
        except SwarmError as exc:
            log.info("could not deliver a push result to %s: %s", served.owner.peer_id.hex()[:12], exc)

    async def _close_session(self, conn: PeerConnection, msg: CloseSession) -> SessionClosed:
        served = self._sessions.get(msg.session)
        if served is None or served.owner is not conn:
            raise RemoteError("unknown session", code=ErrorCode.UNKNOWN_SESSION)
        self._sessions.pop(msg.session)
        served.state.close()
        self.executor.close_session(msg.session)
        self._untag(conn)
        return SessionClosed()

    # -- helpers --------------------------------------------------------------------------

    def _fair_group(self, conn: PeerConnection) -> object:
        """The scheduler's fairness group of ``conn``'s requester: its address group, or
        the identity itself in one of this server's own groups (a local swarm)."""
        return conn.peer_id if conn.group in self.host.manager.exempt_groups else conn.group

    def _check_group_bytes(self, conn: PeerConnection, need: int) -> None:
        """BUSY unless ``conn``'s address group may take ``need`` more bytes of the cache
        budget: its sessions and running FORWARD_ONCEs hold at most ``group_cache_share``."""
        budget = self.executor.cache_bytes
        if budget is None or conn.group in self.host.manager.exempt_groups:
            return
        share = int(budget * self.limits.group_cache_share)
        held = self._group_once_bytes.get(conn.group, 0) + sum(
            s.reserved for s in self._sessions.values() if s.owner.group == conn.group)
        if held + need > share:
            raise RemoteError(f"{conn.group} holds {held} bytes of this server's cache, {need} more would pass its "
                              f"share of {share}; retry later or ask for a smaller max_length",
                              code=ErrorCode.BUSY, retry_after=1.0)

    def _check_target(self, model: str, span: tuple[int, int]) -> None:
        if model != self.model:
            raise RemoteError(f"this peer serves {self.model}, not {model}", code=ErrorCode.MODEL_MISMATCH)
        if not self.span[0] <= span[0] < span[1] <= self.span[1]:
            raise RemoteError(f"blocks [{span[0]}, {span[1]}) are not inside the served span "
                              f"[{self.span[0]}, {self.span[1]})", code=ErrorCode.SPAN_NOT_SERVED)

    def _decode(self, wire: WireTensor) -> torch.Tensor:
        """A checked input as the span computes it (its device and dtype)."""
        return decode_tensor(wire, limits=self.host.limits, device=self.executor.device, out_dtype=self.executor.dtype)

    async def _session_step(self, requester: PeerConnection, span: tuple[int, int], session: bytes,
                            hidden: torch.Tensor, position: int, n_tokens: int) -> torch.Tensor:
        """A session's step (star or push), computed: a decode-sized step in a batch with
        other sessions' steps (``_compute_batched``), a larger one in quantum-sized pieces.
        A step stopped half-way drops its session: the cache holds half a step."""
        step = self.executor.check_step(session, hidden, position)
        job = None
        if self.compute.policy.config.max_batch <= 1 or step.work > self.limits.quantum:
            job = self.executor.forward_job(session, hidden, position, quantum=self.limits.quantum,
                                            chunk_tokens=self.limits.chunk_tokens)
        try:
            if job is None:
                return await self._compute_batched(requester, span, step)
            return await self._compute_step(requester, span, n_tokens, job)
        except BaseException:
            if (0 < job.pieces_done < len(job.pieces)) if job is not None else (step.started and not step.finished):
                self._drop(session)
            raise

    async def _compute_step(self, requester: PeerConnection, span: tuple[int, int], n_tokens: int,
                            job: ForwardJob) -> torch.Tensor:
        """Run ``job``'s pieces through the scheduler, each charged its work, and return
        its output; the requester's work is counted for credit once it is done."""
        self._in_flight += 1
        self._idle = trio.Event() if self._in_flight == 1 else self._idle
        seconds = 0.0
        try:
            for work, piece in job.pieces:
                seconds += await self.compute.run(requester.peer_id, functools.partial(_timed, piece), work=work,
                                                  group=self._fair_group(requester),
                                                  small=n_tokens <= self.limits.small_step_tokens)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        output = job.result()
        self._account(requester, span, n_tokens, seconds)
        return output

    async def _compute_batched(self, requester: PeerConnection, span: tuple[int, int],
                               step: SessionStep) -> torch.Tensor:
        """``step`` computed in a batch with other sessions' waiting steps over the same
        blocks (``Scheduler.run_batch``), charged its own work."""
        self._in_flight += 1
        self._idle = trio.Event() if self._in_flight == 1 else self._idle
        executor = self.executor
        try:
            output, seconds, size = await self.compute.run_batch(
                requester.peer_id, step, key=("steps", id(executor), step.session.lo, step.session.hi, step.tokens),
                combine=functools.partial(_batch_timed, executor), work=step.work,
                group=self._fair_group(requester), small=step.tokens <= self.limits.small_step_tokens)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        if size > 1:
            self.stats.batched_steps += 1
            self.stats.largest_batch = max(self.stats.largest_batch, size)
        self._account(requester, span, step.tokens, seconds)
        return output

    def _account(self, requester: PeerConnection, span: tuple[int, int], n_tokens: int, seconds: float) -> None:
        work = n_tokens * (span[1] - span[0])
        self.stats.steps += 1
        self.stats.tokens += n_tokens
        self.stats.compute_seconds += seconds
        if self._on_work is not None:
            self._on_work(requester, work)


def _add(counts: dict[Any, int], key: object, delta: int) -> None:
    """``counts[key] += delta``, the key gone at zero (a None key counts nothing)."""
    if key is None:
        return
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)


class _NoLimit:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


def _timed(fn: Callable[[], object]) -> float:
    """Run ``fn()`` (one piece of a forward) and return how long it took: runs in a
    compute worker thread."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _batch_timed(executor: SpanExecutor, steps: list[SessionStep]) -> list[tuple[torch.Tensor, float, int]]:
    """The steps computed as one forward, each with its share of the time it took and the
    batch's size: runs in a compute worker thread."""
    t0 = time.perf_counter()
    outputs = executor.forward_batch(steps)
    share = (time.perf_counter() - t0) / len(steps)
    return [(output, share, len(steps)) for output in outputs]


def answer_loading(host: Host, *, retry_after: Callable[[], float]) -> None:
    """Answer the session requests with ``ERROR LOADING`` until a ``SpanServer``
    replaces the handlers: a peer that listens before its span is loaded (it needs the
    DHT to choose its span) never leaves a client with "not served" for an answer.
    ``retry_after()`` is the estimated wait in seconds."""

    async def loading(conn: PeerConnection, msg: object) -> Any:
        raise RemoteError("this server is still loading its blocks; route around it or retry later",
                          code=ErrorCode.LOADING, retry_after=max(0.0, retry_after()))

    for request_type in (OpenSession, Forward, ForwardOnce, CloseSession):
        host.add_handler(request_type, loading)
