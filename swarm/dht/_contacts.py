"""Who becomes a routing-table contact, and when one leaves (spec "DHT", "Routing
table"; BEP 5's node states).

Theory of operation. ``ContactKeeper`` owns the ``RoutingTable`` and the trio tasks
that feed it. A peer becomes a contact only once it answered one of our requests on
a connection we dialled to the address the contact will carry: that proves both
the id (the handshake) and the address (we reached it there). So:

- ``answered(conn)``, called by the DHT node for every response: if we
  dialled ``conn``, its address is proven and the peer is added (or refreshed);
  if the peer dialled us, the answer refreshes an existing contact only.
- ``on_connection`` (every completed handshake) queues a *verification* for a peer
  with listen addresses that is not a GOOD contact: a worker dials the first of its
  claimed addresses (``MAX_VERIFY_ADDRS``) and PINGs it there; only an answer adds
  it. Sending us something, or connecting to us, never does (BEP 5), so a peer that
  claims a tarpit as its address never enters a table. The queue is bounded
  (``VERIFY_QUEUE``, excess dropped: lookups find live peers on their own). An address
  is one listener, so one peer: an address already being checked is not dialled for a
  second claimant, and one that timed out is not dialled again for
  ``BAD_ADDRESS_FOR`` seconds (``is_bad_address``; lookups use it too), so a flood of
  identities claiming one tarpit costs one dial. One that failed fast (refused, or its
  connection was lost) is skipped only ``REFUSED_ADDRESS_FOR`` seconds: it costs the
  next dial nothing, and under churn a restarted peer is back on it within seconds.
  An address that answered with another peer's id is not marked: a Sybil claiming an
  honest peer's address must not get it skipped.
- ``on_new_contact`` (if set) is called with every peer that enters the table, so
  the DHT node can hand it the records it is now among the closest holders of.
- ``failed(peer_id)`` after a request failed: BAD after two in a row, then evicted
  and replaced (``_routing``).
- the liveness task pings the QUESTIONABLE contact a full bucket's newcomer waits
  on, twice before giving up on it (BEP 5's advice), in place of the package's
  unsupervised asyncio ping.

Times are ``trio.current_time()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from protocol import satisfies_puzzle
from protocol import NodeInfo, Ping
from protocol.errors import ProtocolError, RemoteError, SwarmError

from .._address import PeerAddress
from ..errors import InvalidAddress
from ..transport import Host, PeerConnection
from ._groups import address_group
from ._routing import Contact, ContactState, RoutingTable

__all__ = ["ContactKeeper", "MAX_ADDRS"]

log = logging.getLogger("swarm.dht")

MAX_ADDRS = 8
#: Claimed addresses a verification tries, in order.
MAX_VERIFY_ADDRS = 2
#: Peers waiting for verification at most (more are dropped).
VERIFY_QUEUE = 64
#: Verifications in flight at once.
VERIFY_WORKERS = 4
#: Seconds an address that timed out is not dialled again, and one that failed fast.
BAD_ADDRESS_FOR = 60.0
REFUSED_ADDRESS_FOR = 5.0
_MAX_BAD_ADDRESSES = 4096


@dataclass(frozen=True, slots=True)
class _Candidate:
    peer_id: bytes
    public_key: bytes
    addrs: tuple[str, ...]


class ContactKeeper:
    """The routing table and the tasks that admit, check and evict its contacts."""

    def __init__(self, host: Host, *, k: int, query_timeout: float, max_per_group: int) -> None:
        self.host = host
        self.query_timeout = query_timeout
        self.table = RoutingTable(host.peer_id, k=k, max_per_group=max_per_group)
        self._pending: set[bytes] = set()
        self._checking: set[str] = set()
        self._bad_addrs: dict[str, float] = {}
        self._send, self._receive = trio.open_memory_channel[_Candidate](VERIFY_QUEUE)
        self._check_wakeup = trio.Event()
        self.on_new_contact: Callable[[NodeInfo], None] | None = None

    async def run(self) -> None:
        """The verification workers and the liveness checker, until cancelled."""
        self.table.exempt_groups = {address_group(a) for a in (*self.host.bound_addrs, *self.host.listen_addrs)}
        async with trio.open_nursery() as nursery:
            for _ in range(VERIFY_WORKERS):
                nursery.start_soon(self._verify_loop)
            nursery.start_soon(self._liveness_loop)

    # -- events -----------------------------------------------------------------------

    def answered(self, conn: PeerConnection) -> None:
        """The peer of ``conn`` answered a request we sent on it."""
        now = trio.current_time()
        if not conn.inbound:  # we dialled conn.address: proven
            self._admit(conn.peer_id, conn.public_key, conn.address, now)
        else:
            self.table.contact_alive(conn.peer_id, now=now)

    def failed(self, peer_id: bytes) -> None:
        self.table.contact_failed(peer_id, now=trio.current_time())

    def queried(self, peer_id: bytes) -> None:
        self.table.contact_queried(peer_id, now=trio.current_time())

    def on_connection(self, conn: PeerConnection) -> None:
        """A handshake completed: queue the peer's claimed address for verification."""
        if not conn.listen_addrs or conn.peer_id == self.host.peer_id or not satisfies_puzzle(conn.peer_id):
            return
        if self.table.state(conn.peer_id, now=trio.current_time()) is ContactState.GOOD:
            return
        addrs = conn.listen_addrs[:MAX_ADDRS]
        if not conn.inbound:  # the address we dialled is the one to check first
            addrs = (conn.address, *(a for a in addrs if not _same_address(a, conn.address)))
        self.verify_later(conn.peer_id, conn.public_key, addrs)

    def verify_later(self, peer_id: bytes, public_key: bytes, addrs: Sequence[str]) -> None:
        if peer_id in self._pending:
            return
        try:
            self._send.send_nowait(_Candidate(peer_id, public_key, tuple(addrs)))
        except trio.WouldBlock:
            log.debug("verification queue full; not checking %s now", peer_id.hex()[:12])
            return
        self._pending.add(peer_id)

    async def verify_now(self, conn: PeerConnection) -> bool:
        """PING a peer we dialled, over ``conn``, and add it if it answers (bootstrap)."""
        try:
            with trio.fail_after(self.query_timeout):
                await conn.request(Ping(), timeout=self.query_timeout)
        except (SwarmError, trio.TooSlowError):
            return False
        if not conn.inbound:
            self._admit(conn.peer_id, conn.public_key, conn.address, trio.current_time())
        return True

    # -- tasks ------------------------------------------------------------------------

    async def _verify_loop(self) -> None:
        async for candidate in self._receive:
            try:
                await self._verify(candidate)
            finally:
                self._pending.discard(candidate.peer_id)

    async def _verify(self, candidate: _Candidate) -> None:
        own = set(self.host.listen_addrs) | set(self.host.bound_addrs)
        for addr in candidate.addrs[:MAX_VERIFY_ADDRS]:
            # One address is one listener, so one peer: an address being checked for
            # another claimant, or dead lately, is not this candidate's to try.
            if addr in own or addr in self._checking or self.is_bad_address(addr):
                continue
            self._checking.add(addr)
            conn = None
            started = trio.current_time()
            try:
                with trio.fail_after(self.query_timeout):
                    conn = await self.host.connect(addr, timeout=self.query_timeout)
                    if conn.peer_id != candidate.peer_id:
                        log.debug("%s claims %s, another peer's address", candidate.peer_id.hex()[:12], addr)
                        continue
                    await conn.request(Ping(), timeout=self.query_timeout)
            except (SwarmError, trio.TooSlowError) as exc:
                log.debug("%s did not answer at its claimed address %s: %s", candidate.peer_id.hex()[:12], addr, exc)
                if not isinstance(exc, RemoteError):  # it answered, if with an error: alive, not ours
                    self.mark_bad(addr, took=trio.current_time() - started)
                continue
            finally:
                self._checking.discard(addr)
            self._admit(candidate.peer_id, candidate.public_key, conn.address, trio.current_time())
            if self.host.connections.get(candidate.peer_id) is not conn:
                await conn.aclose()  # the check is done; the peer's own connection stays in use
            return

    async def _liveness_loop(self) -> None:
        while True:
            await self._check_wakeup.wait()
            self._check_wakeup = trio.Event()
            while (contact := self.table.take_pending_check()) is not None:
                for _ in range(2):  # BEP 5: try once more before giving up on it
                    if await self._ping(contact):
                        break
                    self.failed(contact.id)

    async def _ping(self, contact: Contact) -> bool:
        try:
            with trio.fail_after(self.query_timeout):
                conn = await self.host.connect(contact.addrs[0], peer_id=contact.id, timeout=self.query_timeout)
                await conn.request(Ping(), timeout=self.query_timeout)
        except RemoteError:
            pass  # it answered, if only with ERROR
        except (SwarmError, trio.TooSlowError):
            return False
        self.table.contact_alive(contact.id, now=trio.current_time())
        return True

    # -- internals --------------------------------------------------------------------

    def _admit(self, peer_id: bytes, public_key: bytes, addr: str, now: float) -> None:
        if peer_id == self.host.peer_id or not satisfies_puzzle(peer_id):
            return
        try:
            info = NodeInfo(peer_id=peer_id, public_key=public_key, addrs=(addr,))
        except ProtocolError as exc:
            log.info("not adding %s to the routing table: %s", peer_id.hex()[:12], exc)
            return
        known = self.table.get(peer_id) is not None
        if not self.table.add_contact(Contact(info, now=now), now=now):
            if self.table.pending_checks:
                self._check_wakeup.set()
        elif not known and self.on_new_contact is not None:
            self.on_new_contact(info)

    def is_bad_address(self, addr: str) -> bool:
        """Whether a dial or request to ``addr`` timed out or failed lately."""
        return self._bad_addrs.get(addr, -1.0) > trio.current_time()

    def mark_bad(self, addr: str, *, took: float) -> None:
        """``addr`` did not answer, which took ``took`` seconds to find out: skip it
        for ``BAD_ADDRESS_FOR`` seconds if that was slow (a quarter of the query
        timeout or more: a tarpit), else for ``REFUSED_ADDRESS_FOR``."""
        slow = took >= self.query_timeout / 4
        now = trio.current_time()
        if len(self._bad_addrs) >= _MAX_BAD_ADDRESSES:
            for stale in [a for a, until in self._bad_addrs.items() if until <= now] or list(self._bad_addrs)[:1]:
                del self._bad_addrs[stale]
        self._bad_addrs[addr] = now + (BAD_ADDRESS_FOR if slow else REFUSED_ADDRESS_FOR)


def _same_address(a: str, b: str) -> bool:
    try:
        return str(PeerAddress.parse(a)) == str(PeerAddress.parse(b))
    except InvalidAddress:
        return False
