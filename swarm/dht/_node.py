"""The DHT node: Kademlia RPCs over our connections, lookups, storage, republishing
(spec "DHT"; Kademlia paper sections 2.3-2.5; S/Kademlia section 4.4).

Theory of operation. ``DhtNode`` is a trio service on top of a running ``Host``. It
answers PING, FIND_NODE, FIND_VALUE and STORE with handlers registered on the host.
Its routing table is kept by ``_contacts.ContactKeeper``: a peer becomes a contact
only after answering us at the address the contact carries, never because it
connected or sent something; ids heard in FIND_NODE/FIND_VALUE answers feed lookups
only. Records are held by ``_storage.RecordStore``, each charged to the address
group of the connection that sent it.

A lookup is a ``_lookup.DisjointLookup`` (pure data: ``paths`` disjoint Kademlia
lookups) driven by ``_drive``: its queries run in a nursery, each under
``trio.fail_after(query_timeout)``; one that has not been answered after
``stall_timeout`` is reported STALLED, which frees its slot (a peer that accepts and
never answers costs a lookup that long, not the query timeout). Everything reports
back over a memory channel to the one loop that owns the lookup; the loop ends when
the lookup terminates and cancels queries still in flight.

Reads are consistent (``get``): a value lookup ends only when the beta closest
peers of every path answered, so the records come from the ``paths * beta``
closest holders; the newest record of each publisher wins, and is written back
(STORE, in the background, ``_write_back_loop``) to those of them that returned an
older one or none, as libp2p's GET does, so replicas converge and successive reads
agree.

Background tasks, all in ``run``'s nursery: the contact keeper's verification and
liveness tasks, write-backs, and maintenance (drops expired records, refreshes
buckets without a lookup for ``refresh_interval``, republishes our own records every
``republish_interval`` so that replication recovers from churn), and rejoining
through the bootstrap addresses when the routing table runs low (``_rejoin``:
libp2p's fixLowPeers; a client in DHT client mode is told of no restarted peer, so
under churn its table would only shrink). Renewing a record
before it expires (new expiry, higher seq) is its publisher's business
(``swarm.announce.Announcer``); ``withdraw`` replaces a published record by its
tombstone (``_records``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import trio

from protocol import (
    MAX_RECORDS,
    FindNode,
    FindValue,
    Message,
    NodeInfo,
    Nodes,
    Ping,
    Pong,
    SignedRecord,
    Store,
    Stored,
    Value,
    satisfies_puzzle,
)
from protocol.errors import ErrorCode, RemoteError, SwarmError

from ..errors import PeerUnreachable
from ..transport import Handler, Host, PeerConnection
from ._contacts import MAX_ADDRS, ContactKeeper
from ._groups import address_group
from ._lookup import DisjointLookup, Termination
from ._records import (
    TOMBSTONE_MAX_TTL,
    CheckedRecords,
    RecordKind,
    RecordRejected,
    latest_records,
    merge_records,
)
from ._routing import MAX_PER_GROUP, Contact, distance
from ._storage import GENERAL_LIMITS, LOCAL_GROUP, RESERVED_LIMITS, RecordStore, StorageLimits

__all__ = ["DhtNode", "LookupResult", "BootstrapFailed", "K", "ALPHA", "BETA", "PATHS", "key_target"]

log = logging.getLogger("swarm.dht")

K = 20
ALPHA = 3
BETA = 3
#: Disjoint lookup paths (S/Kademlia's d).
PATHS = 3
#: Seconds for one query (connect plus request), and before a query is STALLED.
QUERY_TIMEOUT = 2.0
STALL_TIMEOUT = 0.5
#: Write-backs a node has queued at most, and per read.
WRITE_BACK_QUEUE = 256
#: Below this many contacts a lookup first rejoins through the bootstrap addresses
#: (libp2p's minRTRefreshThreshold), at most once per REJOIN_INTERVAL seconds; with
#: no contact at all it waits for that.
LOW_CONTACTS = 10
REJOIN_INTERVAL = 10.0
MAX_WRITE_BACKS_PER_GET = 64


def key_target(key: bytes) -> bytes:
    """The 160-bit lookup target of a 32-byte record key: its first 20 bytes."""
    return key[:20]


class BootstrapFailed(SwarmError):
    """None of the bootstrap addresses could be reached."""

    code = ErrorCode.CONNECTION_CLOSED


@dataclass(slots=True, kw_only=True)
class LookupResult:
    """The outcome of one iterative lookup."""

    closest: list[NodeInfo]  # the k closest peers that answered, nearest first
    records: list[SignedRecord] = field(default_factory=list)  # FIND_VALUE: valid records received
    answers: dict[bytes, list[SignedRecord]] = field(default_factory=dict)  # FIND_VALUE: per answering peer
    termination: Termination | None = None
    messages: int = 0  # queries sent
    failures: int = 0
    stalls: int = 0
    hops: int = 0
    seconds: float = 0.0


class DhtNode:
    """A Kademlia node on ``host``.

    Args:
        host: the transport; must be running (``await nursery.start(host.run)``)
            before ``run``.
        kinds: the record kinds this node stores (``swarm.announce.RECORD_KINDS``).
        k, alpha, beta: bucket size and replication, queries in flight per lookup, and
            how many of the closest peers of each path must answer before a value
            lookup ends (STORE placement always asks for the k closest).
        paths: disjoint paths per lookup (S/Kademlia's d; 1 is plain Kademlia).
        query_timeout: seconds for one query (connect plus request).
        stall_timeout: seconds after which an unanswered query no longer holds a slot.
        refresh_interval: a bucket without a lookup for this long is refreshed.
        republish_interval: seconds between re-stores of our own records.
        storage, reserved_storage: bounds of the general and fraud-proof storage classes.
        max_per_group: routing-table contacts of one address group per bucket.
        clock: unix time, for record expiry (tests pass a fake one).
    """

    def __init__(
        self,
        host: Host,
        *,
        kinds: Mapping[str, RecordKind],
        k: int = K,
        alpha: int = ALPHA,
        beta: int = BETA,
        paths: int = PATHS,
        query_timeout: float = QUERY_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        refresh_interval: float = 3600.0,
        republish_interval: float = 120.0,
        storage: StorageLimits = GENERAL_LIMITS,
        reserved_storage: StorageLimits = RESERVED_LIMITS,
        max_per_group: int = MAX_PER_GROUP,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.k, self.alpha, self.beta, self.paths = k, alpha, beta, paths
        self.query_timeout = query_timeout
        self.stall_timeout = stall_timeout
        self.refresh_interval = refresh_interval
        self.republish_interval = republish_interval
        self.clock = clock
        self.contacts = ContactKeeper(host, k=k, query_timeout=query_timeout, max_per_group=max_per_group)
        self.contacts.on_new_contact = self._hand_off
        self.routing = self.contacts.table
        self.records = RecordStore(kinds, host.limits, general=storage, reserved=reserved_storage)
        self._checked = CheckedRecords(kinds, host.limits)
        self.published: dict[bytes, SignedRecord] = {}
        self._rng = rng or random.Random()
        self._bootstrap_addrs: tuple[str, ...] = ()
        self._last_rejoin = -math.inf
        self._write_send, self._write_receive = trio.open_memory_channel[tuple[NodeInfo, SignedRecord]](
            WRITE_BACK_QUEUE)
        self._writes_pending = 0
        self._writes_idle = trio.Event()
        self._writes_idle.set()
        self._nursery: trio.Nursery | None = None  # run()'s: queries that outlive their lookup
        self._handlers: dict[type[Message], Handler] = {
            Ping: self._on_ping,
            FindNode: self._on_find_node,
            FindValue: self._on_find_value,
            Store: self._on_store,
        }

    @property
    def peer_id(self) -> bytes:
        return self.host.peer_id

    @property
    def node_info(self) -> NodeInfo:
        return NodeInfo(peer_id=self.host.peer_id, public_key=self.host.identity.public_key,
                        addrs=tuple(self.host.listen_addrs[:MAX_ADDRS]))

    # -- service --------------------------------------------------------------------

    async def run(
        self, *, bootstrap: Sequence[str] = (), task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the DHT until cancelled; ``started`` once handlers are registered and
        (if ``bootstrap`` addresses are given) the bootstrap lookup is done.

        Raises:
            BootstrapFailed: no bootstrap address could be reached.
        """
        for request_type, handler in self._handlers.items():
            self.host.add_handler(request_type, handler)
        self.host.on_connection.append(self.contacts.on_connection)
        for conn in list(self.host.connections.values()):
            self.contacts.on_connection(conn)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.contacts.run)
                nursery.start_soon(self._write_back_loop)
                nursery.start_soon(self._maintenance_loop)
                if bootstrap:
                    await self.bootstrap(bootstrap)
                    self._bootstrap_addrs = tuple(bootstrap)
                    self._last_rejoin = trio.current_time()
                task_status.started()
        finally:
            self._nursery = None
            self.host.on_connection.remove(self.contacts.on_connection)

    async def bootstrap(self, addrs: Sequence[str]) -> int:
        """Join through any of ``addrs``: connect to them (each that answers a PING
        there becomes a contact), then look up our own id (which fills our buckets and
        tells our neighbours about us). Returns the routing table size.

        Raises:
            BootstrapFailed: none of ``addrs`` answered.
        """
        errors: list[str] = []

        async def dial(addr: str) -> None:
            try:
                conn = await self.host.connect(addr, timeout=self.query_timeout)
                if conn.peer_id == self.peer_id:
                    await self._join_through_twin(conn)
                elif not await self.contacts.verify_now(conn):
                    errors.append(f"{addr}: no answer to PING")
            except SwarmError as exc:
                errors.append(f"{addr}: {exc}")

        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(dial, addr)
        if len(errors) == len(addrs):
            raise BootstrapFailed(
                "could not reach any bootstrap peer (" + "; ".join(errors) + "); check the --bootstrap addresses"
            )
        await self.lookup_node(self.peer_id)
        return len(self.routing)

    async def _rejoin(self) -> None:
        """Bootstrap again when the routing table holds fewer than ``LOW_CONTACTS``
        (at most once per ``REJOIN_INTERVAL``; in the background, unless the table is
        empty and a lookup could only come back empty-handed)."""
        now = trio.current_time()
        if (len(self.routing) >= LOW_CONTACTS or not self._bootstrap_addrs
                or now - self._last_rejoin < REJOIN_INTERVAL):
            return
        self._last_rejoin = now
        log.debug("%d routing-table contacts: rejoining through %s", len(self.routing), ", ".join(self._bootstrap_addrs))
        if not len(self.routing):
            with trio.move_on_after(2 * self.query_timeout):
                await self._bootstrap_again()
        elif self._nursery is not None:
            try:
                self._nursery.start_soon(self._bootstrap_again)
            except RuntimeError:  # the node is stopping: nothing to rejoin for
                pass

    async def _bootstrap_again(self) -> None:
        await self._quietly(self.bootstrap(self._bootstrap_addrs))

    async def _join_through_twin(self, conn: PeerConnection) -> None:
        """A bootstrap peer with our own id (this identity's server, when its owner
        generates from another process) is never a contact: ask it for its
        neighbours and dial them, so that they become our contacts."""
        # The channel answers a FIND_NODE with NODES or raises (RESPONSES in protocol/).
        answer = cast(Nodes, await conn.request(FindNode(target=self.peer_id), timeout=self.query_timeout))
        async with trio.open_nursery() as nursery:
            for info in answer.nodes:
                if info.peer_id != self.peer_id:
                    nursery.start_soon(self._quietly, self._request(info, Ping()))

    # -- public operations ----------------------------------------------------------

    async def find_node(self, target: bytes) -> list[NodeInfo]:
        """The (up to) k closest peers to ``target`` that answered, nearest first."""
        return (await self.lookup_node(target)).closest

    async def get(self, key: bytes) -> list[SignedRecord]:
        """The live records under ``key``: the latest of each publisher, from our store
        and from the closest holders a FIND_VALUE lookup reached, tombstones removed.
        Holders among them that returned an older record or none are sent the newest
        in the background (``flush_write_backs`` waits for that)."""
        result = await self.lookup_value(key)
        now = self.clock()
        latest = latest_records([*self.records.get(key, now=now), *result.records])
        self._write_back(latest, result, now)
        return merge_records(latest.values(), now=now)

    async def store(self, record: SignedRecord) -> int:
        """Store ``record`` on the k closest nodes to its key (us included if we are
        one of them). Returns how many nodes hold it now."""
        target = key_target(record.key)
        result = await self.lookup_node(target, beta=self.k)
        ranked = sorted([*(c.peer_id for c in result.closest if c.peer_id != self.peer_id), self.peer_id],
                        key=lambda peer_id: distance(peer_id, target))[: self.k]
        targets = [c for c in result.closest if c.peer_id in ranked and c.peer_id != self.peer_id]
        held = 0
        if self.peer_id in ranked:
            try:
                self.records.put(record, now=self.clock(), group=LOCAL_GROUP)
                held += 1
            except RecordRejected as exc:
                log.debug("not storing our own record locally: %s", exc)
        outcomes: list[bool] = []

        async def one(info: NodeInfo) -> None:
            try:
                with trio.fail_after(self.query_timeout):
                    await self._request(info, Store(record=record))
                outcomes.append(True)
            except RemoteError as exc:
                log.debug("%s refused STORE: %s", info.peer_id.hex()[:12], exc)
            except (SwarmError, trio.TooSlowError):
                self.contacts.failed(info.peer_id)

        async with trio.open_nursery() as nursery:
            for info in targets:
                nursery.start_soon(one, info)
        return held + len(outcomes)

    async def publish(self, record: SignedRecord) -> int:
        """``store`` a record of ours and keep republishing it until it expires or is
        withdrawn. Returns how many nodes hold it."""
        if record.publisher != self.host.identity.public_key:
            raise ValueError("publish() is for records this node signed")
        self.published[record.key] = record
        return await self.store(record)

    async def withdraw(self, key: bytes) -> int:
        """Replace our record under ``key`` by a tombstone (empty value, next seq, the
        record's expiry or ``TOMBSTONE_MAX_TTL`` if sooner) on the k closest nodes.
        Returns how many took it (0: nothing to withdraw)."""
        record = self.published.pop(key, None)
        now = self.clock()
        if record is None or record.expires <= now:
            return 0
        tombstone = SignedRecord.create(self.host.identity, key=key, seq=max(record.seq + 1, int(now * 1000)),
                                        expires=min(record.expires, int(now + TOMBSTONE_MAX_TTL)), value=b"")
        return await self.store(tombstone)

    async def republish(self) -> dict[bytes, int]:
        """Re-store every live record of ours now; per key, how many nodes hold it."""
        now = self.clock()
        for key in [k for k, r in self.published.items() if r.expires <= now]:
            del self.published[key]
        out: dict[bytes, int] = {}

        async def one(record: SignedRecord) -> None:
            out[record.key] = await self.store(record)

        async with trio.open_nursery() as nursery:
            for record in list(self.published.values()):
                nursery.start_soon(one, record)
        return out

    async def lookup_node(self, target: bytes, *, beta: int | None = None, paths: int | None = None
                          ) -> LookupResult:
        """An iterative FIND_NODE lookup for ``target`` (20 bytes). ``beta`` is how many
        closest peers must answer in all; each of the ``paths`` disjoint paths gets its share."""
        paths = paths or self.paths
        per_path = math.ceil((beta or self.beta * paths) / paths)
        return await self._drive(target, lambda: FindNode(target=target), beta=per_path, paths=paths)

    async def lookup_value(self, key: bytes, *, paths: int | None = None) -> LookupResult:
        """An iterative FIND_VALUE lookup for ``key`` over ``paths`` disjoint paths that
        ends when the beta closest peers of each path answered; ``records`` holds
        every valid record the queried nodes returned (not merged)."""
        return await self._drive(key_target(key), lambda: FindValue(key=key), beta=self.beta,
                                 paths=paths or self.paths, key=key)

    async def flush_write_backs(self) -> None:
        """Wait until every queued write-back has been sent (tests, shutdown)."""
        await self._writes_idle.wait()

    # -- lookups --------------------------------------------------------------------

    async def _drive(self, target: bytes, make_request: Callable[[], Message], *, beta: int, paths: int,
                     key: bytes | None = None) -> LookupResult:
        await self._rejoin()
        started = trio.current_time()
        lookup = DisjointLookup(target, self.routing.closest(target, self.k), k=self.k, alpha=self.alpha,
                                beta=min(beta, self.k), paths=paths, self_id=self.peer_id)
        self.routing.note_lookup(target)
        records: list[SignedRecord] = []
        answers: dict[bytes, list[SignedRecord]] = {}
        send, receive = trio.open_memory_channel[tuple[int, Contact, str, Message | None]](math.inf)

        def report(*event: object) -> None:
            try:
                send.send_nowait(event)  # type: ignore[arg-type]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the lookup is over; the outcome went to the contact keeper

        async def stall(index: int, contact: Contact) -> None:
            await trio.sleep(self.stall_timeout)
            report(index, contact, "stall", None)

        async def query(index: int, contact: Contact) -> None:
            response: Message | None = None
            async with trio.open_nursery() as timer:
                timer.start_soon(stall, index, contact)
                started = trio.current_time()
                try:
                    with trio.fail_after(self.query_timeout):
                        response = await self._request(contact.info, make_request())
                except RemoteError as exc:
                    log.debug("lookup query to %r answered ERROR: %s", contact, exc)
                except (SwarmError, trio.TooSlowError) as exc:
                    log.debug("lookup query to %r failed: %s", contact, exc)
                    self.contacts.failed(contact.id)
                    conn = self.host.connections.get(contact.id)
                    if conn is None or not conn.is_open:  # never connected (a tarpit) or lost: not a slow peer
                        self.contacts.mark_bad(contact.addrs[0], took=trio.current_time() - started)
                timer.cancel_scope.cancel()
            report(index, contact, "done", response)

        # Queries run in the service's nursery: one still out when the lookup ends runs
        # on to its own timeout, so that a peer that never answers is remembered
        # (``is_bad_address``) and costs the next lookups nothing.
        # One address is one listener, so one peer: a second contact claiming an address
        # this lookup already asked, or one that timed out lately, is not dialled.
        asked: set[str] = set()
        async with trio.open_nursery() as local:
            spawn = self._nursery or local
            with receive:
                while lookup.termination() is None:
                    while batch := lookup.next_queries():
                        for index, contact in batch:
                            addr = contact.addrs[0]
                            if addr in asked or self.contacts.is_bad_address(addr):
                                lookup.on_failure(index, contact.id)
                                if addr not in asked:  # dead lately: a failed request for the contact too
                                    self.contacts.failed(contact.id)
                            else:
                                asked.add(addr)
                                try:
                                    spawn.start_soon(query, index, contact)
                                except RuntimeError:  # the service has stopped (a shutdown's withdraw)
                                    spawn = local
                                    spawn.start_soon(query, index, contact)
                    if lookup.termination() is not None:  # handing out may drop peers another path asked
                        break
                    index, contact, what, response = await receive.receive()
                    if what == "stall":
                        lookup.on_stall(index, contact.id)
                    elif response is None:
                        lookup.on_failure(index, contact.id)
                    else:
                        if key is not None and isinstance(response, Value):
                            answers[contact.id] = self._valid_records(response.records, key, contact)
                            records.extend(answers[contact.id])
                        lookup.on_response(index, contact.id, self._contacts_in(response))
            local.cancel_scope.cancel()
        return LookupResult(closest=[c.info for c in lookup.closest()], records=records, answers=answers,
                            termination=lookup.termination(), messages=lookup.messages, failures=lookup.failures,
                            stalls=lookup.stalls, hops=lookup.hops, seconds=trio.current_time() - started)

    def _contacts_in(self, response: Message) -> list[Contact]:
        nodes = response.nodes if isinstance(response, (Nodes, Value)) else ()
        return [Contact(info) for info in nodes if info.addrs and satisfies_puzzle(info.peer_id)
                and not self.contacts.is_bad_address(info.addrs[0])]

    def _valid_records(self, records: Sequence[SignedRecord], key: bytes, source: Contact) -> list[SignedRecord]:
        now = self.clock()
        valid = []
        for record in records:
            try:
                if record.key != key:
                    raise RecordRejected("record for another key", code=ErrorCode.INVALID_REQUEST)
                self._checked.check(record, now=now)
            except RecordRejected as exc:
                log.info("dropping a record from %r: %s", source, exc)
                continue
            valid.append(record)
        return valid

    async def _request(self, info: NodeInfo, message: Message) -> Message:
        """``message`` to the peer ``info``, trying its addresses in order. An answer
        (even ERROR) proves the peer live to the contact keeper."""
        last: SwarmError | None = None
        for addr in info.addrs:
            try:
                conn = await self.host.connect(addr, peer_id=info.peer_id, timeout=self.query_timeout)
            except PeerUnreachable as exc:
                last = exc
                continue
            try:
                response = await conn.request(message, timeout=self.query_timeout)
            except RemoteError:
                self.contacts.answered(conn)
                raise
            self.contacts.answered(conn)
            return response
        raise last or PeerUnreachable("-", "no address", peer_id=info.peer_id)

    # -- write-back -----------------------------------------------------------------

    def _write_back(self, latest: Mapping[bytes, SignedRecord], result: LookupResult, now: float) -> None:
        for record in latest.values():  # our own stale copy, if we hold one
            held = {r.publisher: r for r in self.records.get(record.key, now=now)}.get(record.publisher)
            if held is not None and held.seq < record.seq:
                try:
                    self.records.put(record, now=now, group=LOCAL_GROUP)
                except RecordRejected as exc:
                    log.debug("not refreshing our copy: %s", exc)
        budget = MAX_WRITE_BACKS_PER_GET
        for info in result.closest[: self.beta * self.paths]:
            if info.peer_id == self.peer_id or info.peer_id not in result.answers:
                continue
            theirs = {r.publisher: r.seq for r in result.answers[info.peer_id]}
            for publisher, record in latest.items():
                if record.expires <= now or theirs.get(publisher, -1) >= record.seq:
                    continue
                if budget <= 0 or not self._queue_write(info, record):
                    return
                budget -= 1

    def _hand_off(self, info: NodeInfo) -> None:
        """A new contact among the k closest we know to a key of ours gets our record
        there now (Kademlia's join rule, paper section 2.5, for the records we publish),
        not at the next republish: the first server of a young swarm stored its records
        on itself alone, and a lookup that missed it saw none."""
        now = self.clock()
        for record in list(self.published.values()):
            if record.expires <= now:
                continue
            target = key_target(record.key)
            closer = self.routing.closest(target, self.k, exclude=info.peer_id)
            if len(closer) >= self.k and distance(closer[-1].id, target) < distance(info.peer_id, target):
                continue
            if not self._queue_write(info, record):
                return

    def _queue_write(self, info: NodeInfo, record: SignedRecord) -> bool:
        try:
            self._write_send.send_nowait((info, record))
        except trio.WouldBlock:
            return False
        self._writes_pending += 1
        if self._writes_idle.is_set():
            self._writes_idle = trio.Event()
        return True

    async def _write_back_loop(self) -> None:
        async for info, record in self._write_receive:
            try:
                with trio.fail_after(self.query_timeout):
                    await self._request(info, Store(record=record))
            except RemoteError as exc:
                log.debug("%s refused a write-back: %s", info.peer_id.hex()[:12], exc)
            except (SwarmError, trio.TooSlowError):
                self.contacts.failed(info.peer_id)
            finally:
                self._writes_pending -= 1
                if not self._writes_pending:
                    self._writes_idle.set()

    # -- maintenance ----------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        period = min(self.refresh_interval, self.republish_interval) / 4
        last_republish = trio.current_time()
        while True:
            await trio.sleep(period)
            self.records.expire(now=self.clock())
            for bucket in self.routing.stale_buckets(now=time.monotonic(), interval=self.refresh_interval):
                await self._quietly(self.lookup_node(self.routing.random_id_in(bucket, self._rng)))
            if trio.current_time() - last_republish >= self.republish_interval:
                last_republish = trio.current_time()
                await self._quietly(self.republish())

    @staticmethod
    async def _quietly(operation: Awaitable[object]) -> None:
        try:
            await operation
        except SwarmError as exc:
            log.info("DHT maintenance step failed: %s", exc)  # stale contacts are routine, not a user's problem

    # -- handlers -------------------------------------------------------------------

    async def _on_ping(self, conn: PeerConnection, msg: Ping) -> Pong:
        self.contacts.queried(conn.peer_id)
        return Pong()

    async def _on_find_node(self, conn: PeerConnection, msg: FindNode) -> Nodes:
        self.contacts.queried(conn.peer_id)
        return Nodes(nodes=tuple(c.info for c in self.routing.closest(msg.target, self.k,
                                                                                   exclude=conn.peer_id)))

    async def _on_find_value(self, conn: PeerConnection, msg: FindValue) -> Value:
        self.contacts.queried(conn.peer_id)
        records = self.records.get(msg.key, now=self.clock())[:MAX_RECORDS]
        nodes = self.routing.closest(key_target(msg.key), self.k, exclude=conn.peer_id)
        return Value(records=tuple(records), nodes=tuple(c.info for c in nodes))

    async def _on_store(self, conn: PeerConnection, msg: Store) -> Stored:
        self.contacts.queried(conn.peer_id)
        now = trio.current_time()
        # RecordRejected is answered as ERROR with its code.
        self.records.put(msg.record, now=self.clock(), group=address_group(conn.address),
                         proven=lambda peer_id: self.routing.is_good(peer_id, now=now))
        return Stored()
