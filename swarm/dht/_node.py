"""The DHT node: Kademlia RPCs over our connections, lookups, storage, republishing
(spec "DHT"; Kademlia paper sections 2.3-2.5).

Theory of operation. ``DhtNode`` is a trio service on top of a running ``Host``. It
answers PING, FIND_NODE, FIND_VALUE and STORE with handlers registered on the host;
its routing table (``_routing.RoutingTable``) learns contacts only from completed
handshakes (``Host.on_connection``), so every id in it was proven by its owner's
key. Ids heard in FIND_NODE/FIND_VALUE answers feed lookups and enter the table
when we connect to them.

A lookup is a ``_lookup.Lookup`` (pure data) driven by ``_drive``: up to ``alpha``
queries run at once in a nursery, each under ``trio.fail_after(query_timeout)``,
and report back over a memory channel to the one loop that owns the lookup. The
loop ends when the lookup terminates and cancels queries still in flight.

Background tasks, all in ``run``'s nursery: the liveness checker (pings the
least-recently-seen contact of a full bucket a newcomer waits on, and evicts it if
it is dead: the package's unsupervised asyncio ping, supervised), and maintenance
(drops expired records, refreshes buckets without a lookup for
``refresh_interval``, republishes our own records every ``republish_interval`` so
that replication recovers from churn). Renewing a record before it expires (new
expiry, higher seq) is its publisher's business (``swarm.announce.Announcer``);
``withdraw`` replaces a published record by its tombstone (``_records``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

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
)
from protocol.errors import ErrorCode, ProtocolError, RemoteError, SwarmError

from ..errors import PeerUnreachable
from ..transport import Host, PeerConnection
from ._lookup import Lookup, Termination
from ._records import DEFAULT_MAX_TTL, RecordKind, RecordRejected, RecordStore, check_record, merge_records
from ._routing import Contact, RoutingTable, distance

__all__ = ["DhtNode", "LookupResult", "BootstrapFailed", "K", "ALPHA", "BETA", "key_target"]

log = logging.getLogger("swarm.dht")

K = 20
ALPHA = 3
BETA = 3
MAX_ADDRS = 8


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
    termination: Termination | None = None
    messages: int = 0  # queries sent
    failures: int = 0
    hops: int = 0
    seconds: float = 0.0


class DhtNode:
    """A Kademlia node on ``host``.

    Args:
        host: the transport; must be running (``await nursery.start(host.run)``)
            before ``run``.
        kinds: the record kinds this node stores (``swarm.announce.RECORD_KINDS``).
        k, alpha, beta: bucket size and replication, parallel queries, and how many
            of the closest peers must answer before a value lookup ends (STORE
            placement always uses beta = k).
        query_timeout: seconds for one query (connect plus request).
        refresh_interval: a bucket without a lookup for this long is refreshed.
        republish_interval: seconds between re-stores of our own records.
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
        query_timeout: float = 5.0,
        refresh_interval: float = 3600.0,
        republish_interval: float = 120.0,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.k, self.alpha, self.beta = k, alpha, beta
        self.query_timeout = query_timeout
        self.refresh_interval = refresh_interval
        self.republish_interval = republish_interval
        self.clock = clock
        self.routing = RoutingTable(host.peer_id, k=k)
        self.records = RecordStore(kinds=kinds, limits=host.limits, max_ttl=max_ttl)
        self.published: dict[bytes, SignedRecord] = {}
        self._rng = rng or random.Random()
        self._check_wakeup = trio.Event()
        self._handlers: dict[type[Message], Callable[[PeerConnection, Message], Awaitable[Message]]] = {
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
        self.host.on_connection.append(self._on_connection)
        for conn in list(self.host.connections.values()):
            self._on_connection(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._liveness_loop)
                nursery.start_soon(self._maintenance_loop)
                if bootstrap:
                    await self.bootstrap(bootstrap)
                task_status.started()
        finally:
            self.host.on_connection.remove(self._on_connection)

    async def bootstrap(self, addrs: Sequence[str]) -> int:
        """Join through any of ``addrs``: connect to them, then look up our own id
        (which fills our buckets and tells our neighbours about us). Returns the
        routing table size.

        Raises:
            BootstrapFailed: none of ``addrs`` answered.
        """
        errors: list[str] = []

        async def dial(addr: str) -> None:
            try:
                conn = await self.host.connect(addr, timeout=self.query_timeout)
                if conn.peer_id == self.peer_id:
                    await self._join_through_twin(conn)
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

    async def _join_through_twin(self, conn: PeerConnection) -> None:
        """A bootstrap peer with our own id (this identity's server, when its owner
        generates from another process) is never a contact: ask it for its
        neighbours and dial them, so that they become our contacts."""
        answer = await conn.request(FindNode(target=self.peer_id), timeout=self.query_timeout)
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
        and from every node a FIND_VALUE lookup reached, tombstones removed."""
        now = self.clock()
        result = await self.lookup_value(key)
        return merge_records([*self.records.get(key, now=now), *result.records], now=now)

    async def store(self, record: SignedRecord) -> int:
        """Store ``record`` on the k closest nodes to its key (us included if we are
        one of them). Returns how many nodes hold it now."""
        result = await self.lookup_node(key_target(record.key), beta=self.k)
        target = key_target(record.key)
        ranked = sorted([*(c.peer_id for c in result.closest if c.peer_id != self.peer_id), self.peer_id],
                        key=lambda peer_id: distance(peer_id, target))[: self.k]
        targets = [c for c in result.closest if c.peer_id in ranked and c.peer_id != self.peer_id]
        held = 0
        if self.peer_id in ranked:
            try:
                self.records.put(record, now=self.clock())
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
                self.routing.contact_failed(info.peer_id)

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
        """Replace our record under ``key`` by a tombstone (empty value, next seq, same
        expiry) on the k closest nodes. Returns how many took it (0: nothing to withdraw)."""
        record = self.published.pop(key, None)
        now = self.clock()
        if record is None or record.expires <= now:
            return 0
        tombstone = SignedRecord.create(self.host.identity, key=key, seq=max(record.seq + 1, int(now * 1000)),
                                        expires=record.expires, value=b"")
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

    async def lookup_node(self, target: bytes, *, beta: int | None = None) -> LookupResult:
        """An iterative FIND_NODE lookup for ``target`` (20 bytes)."""
        return await self._drive(target, lambda: FindNode(target=target), beta=beta or self.beta)

    async def lookup_value(self, key: bytes) -> LookupResult:
        """An iterative FIND_VALUE lookup for ``key``; ``records`` holds every valid
        record the queried nodes returned (not merged)."""
        return await self._drive(key_target(key), lambda: FindValue(key=key), beta=self.beta, key=key)

    # -- lookups --------------------------------------------------------------------

    async def _drive(self, target: bytes, make_request: Callable[[], Message], *, beta: int,
                     key: bytes | None = None) -> LookupResult:
        started = trio.current_time()
        lookup = Lookup(target, self.routing.closest(target, self.k), k=self.k, alpha=self.alpha,
                        beta=min(beta, self.k), self_id=self.peer_id)
        self.routing.note_lookup(target)
        infos: dict[bytes, NodeInfo] = {}
        records: list[SignedRecord] = []
        send, receive = trio.open_memory_channel[tuple[Contact, Message | None]](self.alpha)

        async def query(contact: Contact) -> None:
            response: Message | None = None
            try:
                with trio.fail_after(self.query_timeout):
                    response = await self._request(contact.info, make_request())
            except RemoteError as exc:
                log.debug("lookup query to %r answered ERROR: %s", contact, exc)
            except (SwarmError, trio.TooSlowError) as exc:
                log.debug("lookup query to %r failed: %s", contact, exc)
                self.routing.contact_failed(contact.id)
            await send.send((contact, response))

        async with trio.open_nursery() as nursery:
            while lookup.termination() is None:
                for contact in lookup.next_queries():
                    infos[contact.id] = contact.info
                    nursery.start_soon(query, contact)
                contact, response = await receive.receive()
                if response is None:
                    lookup.on_failure(contact.id)
                    continue
                named = self._contacts_in(response)
                if key is not None and isinstance(response, Value):
                    records.extend(self._valid_records(response.records, key, contact))
                lookup.on_response(contact.id, named)
            nursery.cancel_scope.cancel()
        return LookupResult(closest=[c.info for c in lookup.closest()], records=records,
                            termination=lookup.termination(), messages=lookup.messages, failures=lookup.failures,
                            hops=lookup.hops, seconds=trio.current_time() - started)

    def _contacts_in(self, response: Message) -> list[Contact]:
        nodes = response.nodes if isinstance(response, (Nodes, Value)) else ()
        return [Contact(info) for info in nodes if info.addrs]

    def _valid_records(self, records: Sequence[SignedRecord], key: bytes, source: Contact) -> list[SignedRecord]:
        now = self.clock()
        valid = []
        for record in records:
            try:
                if record.key != key:
                    raise RecordRejected("record for another key", code=ErrorCode.INVALID_REQUEST)
                check_record(record, now=now, kinds=self.records.kinds, limits=self.host.limits,
                             max_ttl=self.records.max_ttl)
            except RecordRejected as exc:
                log.info("dropping a record from %r: %s", source, exc)
                continue
            valid.append(record)
        return valid

    async def _request(self, info: NodeInfo, message: Message) -> Message:
        """``message`` to the peer ``info``, trying its addresses in order."""
        last: SwarmError | None = None
        for addr in info.addrs:
            try:
                response = await self.host.request(addr, message, peer_id=info.peer_id, timeout=self.query_timeout)
            except PeerUnreachable as exc:
                last = exc
                continue
            known = self.routing.get(info.peer_id)
            if known is not None:
                self.routing.contact_alive(known)
            return response
        raise last or PeerUnreachable("-", "no address", peer_id=info.peer_id)

    # -- contacts -------------------------------------------------------------------

    def _on_connection(self, conn: PeerConnection) -> None:
        """A handshake completed: the peer's id is proven by its key. Peers that listen
        (not pure clients) become contacts."""
        if not conn.listen_addrs or conn.peer_id == self.peer_id:
            return
        try:
            info = NodeInfo(peer_id=conn.peer_id, public_key=conn.public_key,
                            addrs=tuple(conn.listen_addrs[:MAX_ADDRS]))
        except ProtocolError as exc:
            log.info("not adding %s to the routing table: %s", conn.peer_id.hex()[:12], exc)
            return
        if not self.routing.add_contact(Contact(info)) and self.routing.pending_checks:
            self._check_wakeup.set()

    async def _liveness_loop(self) -> None:
        while True:
            await self._check_wakeup.wait()
            self._check_wakeup = trio.Event()
            while (contact := self.routing.take_pending_check()) is not None:
                try:
                    with trio.fail_after(self.query_timeout):
                        await self._request(contact.info, Ping())
                    self.routing.contact_alive(contact)
                except (SwarmError, trio.TooSlowError):
                    log.debug("evicting unresponsive contact %r", contact)
                    self.routing.contact_failed(contact.id)

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
            log.warning("DHT maintenance step failed: %s", exc)

    # -- handlers -------------------------------------------------------------------

    def _seen(self, conn: PeerConnection) -> None:
        known = self.routing.get(conn.peer_id)
        if known is not None:
            self.routing.contact_alive(known)

    async def _on_ping(self, conn: PeerConnection, msg: Ping) -> Pong:
        self._seen(conn)
        return Pong()

    async def _on_find_node(self, conn: PeerConnection, msg: FindNode) -> Nodes:
        self._seen(conn)
        return Nodes(nodes=tuple(c.info for c in self.routing.closest(msg.target, self.k,
                                                                                   exclude=conn.peer_id)))

    async def _on_find_value(self, conn: PeerConnection, msg: FindValue) -> Value:
        self._seen(conn)
        records = self.records.get(msg.key, now=self.clock())[:MAX_RECORDS]
        nodes = self.routing.closest(key_target(msg.key), self.k, exclude=conn.peer_id)
        return Value(records=tuple(records), nodes=tuple(c.info for c in nodes))

    async def _on_store(self, conn: PeerConnection, msg: Store) -> Stored:
        self._seen(conn)
        self.records.put(msg.record, now=self.clock())  # RecordRejected is answered as ERROR
        return Stored()
