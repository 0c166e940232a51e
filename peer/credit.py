"""A peer's tit-for-tat credit, wired to the network (spec section 12; DESIGN.md "Credit").

Theory of operation. The pure core lives in ``swarm.credit`` (ledger, receipts,
max-flow credit). ``CreditService`` is the thin trio shell around it, shared by the
serving and the generating side of one peer:

- as a server it counts work served per client (``served``), answers RECEIPT by
  checking and countersigning (``ReceiptDesk``), and tells the compute scheduler
  (``peer.scheduler``) each requester's credit (``credit_total``) and whether it is
  delinquent (``delinquent``);
- as a client it counts work received per server (``received``, which never waits)
  and has ``run``'s sender task send a cumulative receipt every ``receipt_every``
  steps, or once half the server's grace is unreceipted; the relay sends a last one
  when a generation ends (``send_receipt``);
- it answers CREDIT_QUERY with its latest records, asks every new requester for its
  records on first contact (so work a peer did for us while we generated from another
  process counts at once: that peer holds the receipts we signed) and periodically
  asks connected peers, so transitive credit (at most 2 hops) can be computed;
- it saves the ledger atomically when it changed, every ``save_interval`` seconds
  and on exit.

Errors (spec section 12, "Error codes"): a RECEIPT, or a RECEIPT_ACK, whose signature
does not verify (BAD_SIGNATURE, 105; MALFORMED, 100 for a missing countersignature) is
a protocol violation of the peer that sent it: the connection to it is closed (no
answer is sent on it). Refusals honest peers also meet (INVALID_REQUEST 200: wrong
server, connection or over-claim; STALE_RECORD 208) are answered with ERROR and the
connection stays open. A bad record in a CREDIT_REPORT is dropped alone (the reporter
may only have relayed it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from pathlib import Path

import trio

from protocol import CreditQuery, CreditReport, Receipt, ReceiptAck
from protocol.errors import RemoteProtocolError, SwarmError
from swarm.credit import DEFAULT_GRACE_UNITS, Credit, Ledger, ReceiptDesk, ReceiptWallet
from swarm.transport import Host, PeerConnection

__all__ = ["CreditService", "ledger_path_for", "neighbour_rows"]

log = logging.getLogger("swarm.credit")


def ledger_path_for(identity_path: str | os.PathLike[str]) -> Path:
    """The ledger file kept beside an identity key file."""
    path = Path(identity_path)
    return path.with_name(path.name + ".ledger")


def neighbour_rows(ledger: Ledger) -> list[tuple[bytes, Credit, int, int]]:
    """(public key, its credit here, work it did for us, work we did for it) per peer
    the ledger's owner has receipts with, in work units (blocks x tokens)."""
    me = ledger.owner
    peers = {r.server for r in ledger.received()} | {r.client for r in ledger.given()}
    rows = []
    for key in sorted(peers - {me}):
        for_us, for_them = ledger.latest(me, key), ledger.latest(key, me)
        rows.append((key, ledger.credit(key), for_us.work if for_us else 0, for_them.work if for_them else 0))
    return rows


class CreditService:
    """See the module docstring.

    Args:
        host: the peer's transport (handlers for RECEIPT and CREDIT_QUERY are added).
        ledger_path: where the ledger persists (None: in memory only).
        receipt_every: steps between receipts a client sends each server.
    """

    def __init__(self, host: Host, *, ledger_path: str | os.PathLike[str] | None = None, receipt_every: int = 8,
                 save_interval: float = 10.0, exchange_interval: float = 30.0) -> None:
        self.host = host
        self.identity = host.identity
        owner = self.identity.public_key
        self.ledger = Ledger.open(ledger_path, owner) if ledger_path is not None else Ledger(owner)
        self.ledger_path = ledger_path
        self.desk = ReceiptDesk(self.identity, self.ledger)
        self.wallet = ReceiptWallet(self.identity, self.ledger)
        self._keys: dict[Hashable, bytes] = {}  # peer id -> public key of requesters seen
        self.receipt_every = receipt_every
        self.save_interval = save_interval
        self.exchange_interval = exchange_interval
        self._steps: dict[bytes, int] = {}  # server public key -> steps since the last receipt
        self._due: dict[bytes, PeerConnection] = {}  # server public key -> where a receipt is due
        self._receipts_due = trio.Event()  # set when _due gains an entry; the sender waits on it
        self._asked: set[bytes] = set()  # requesters whose records we fetched
        self._nursery: trio.Nursery | None = None
        host.add_handler(Receipt, self._on_receipt)
        host.add_handler(CreditQuery, self._on_credit_query)

    # -- what the scheduler asks ------------------------------------------------------------

    def credit_of(self, peer_id: bytes) -> Credit:
        """Credit of ``peer_id`` as this peer sees it (direct + transitive, work units)."""
        return self.ledger.credit_of_peer(peer_id)

    def credit_total(self, peer_id: Hashable) -> float:
        return float(self.ledger.credit_of_peer(peer_id).total) if isinstance(peer_id, bytes) else 0.0

    def delinquent(self, peer_id: Hashable) -> bool:
        """Whether ``peer_id`` owes receipts beyond the grace (served only with idle capacity)."""
        key = self._keys.get(peer_id)
        return key is not None and self.desk.delinquent(key)

    def neighbours(self) -> list[tuple[bytes, Credit, int, int]]:
        """See ``neighbour_rows``."""
        return neighbour_rows(self.ledger)

    # -- server side ----------------------------------------------------------------------

    def served(self, client: PeerConnection, units: int) -> None:
        self._keys[client.peer_id] = client.public_key
        self.desk.served(client.public_key, units)
        if client.peer_id not in self._asked and self._nursery is not None:
            self._asked.add(client.peer_id)
            self._nursery.start_soon(self._exchange_quietly, client)

    async def _on_receipt(self, conn: PeerConnection, msg: Receipt) -> ReceiptAck:
        if msg.receipt.client != conn.public_key:
            from swarm.credit import InvalidReceipt

            raise InvalidReceipt("a receipt must be signed by the peer that sends it")
        record = self.desk.accept(msg.receipt, handshake_hash=conn.handshake_hash)
        return ReceiptAck(receipt=record)

    async def _on_credit_query(self, conn: PeerConnection, msg: CreditQuery) -> CreditReport:
        return CreditReport(records=self.ledger.records_for_exchange())

    # -- client side ----------------------------------------------------------------------

    def received(self, server: PeerConnection, units: int) -> None:
        """Count work received from ``server``. A receipt is due every ``receipt_every``
        steps, or once half the server's grace is unreceipted (well within it: spec
        section 12, rule 6); ``run`` sends it in the background, so the relay never
        waits for a receipt. A failed receipt is logged, never fatal."""
        key = server.public_key
        self.wallet.received(key, units)
        steps = self._steps.get(key, 0) + 1
        self._steps[key] = steps
        if steps >= self.receipt_every or self.wallet.pending(key) >= DEFAULT_GRACE_UNITS // 2:
            self._steps[key] = 0
            self._due[key] = server
            self._receipts_due.set()

    async def send_receipt(self, server: PeerConnection) -> bool:
        """Send ``server`` a receipt for everything received and not yet receipted
        (nothing if that is nothing); True if it was countersigned."""
        key = server.public_key
        if self.wallet.pending(key) <= 0:
            return False
        self._steps[key] = 0
        receipt = self.wallet.issue(key, server.handshake_hash)
        try:
            ack = await server.request(Receipt(receipt=receipt), timeout=10.0)
            return self.wallet.acknowledged(ack.receipt)
        except RemoteProtocolError as exc:  # a forged countersignature: the server broke the protocol
            log.warning("closing the connection to %s: its RECEIPT_ACK %s", server.peer_id.hex()[:12], exc)
            await server.aclose()
            return False
        except SwarmError as exc:
            log.info("receipt to %s not acknowledged: %s", server.peer_id.hex()[:12], exc)
            return False

    # -- maintenance ----------------------------------------------------------------------

    async def exchange(self, conn: PeerConnection) -> None:
        """Fetch ``conn``'s records (for transitive credit) and merge the valid ones."""
        report = await conn.request(CreditQuery(), timeout=10.0)
        self.ledger.merge_remote(report.records)

    async def _exchange_quietly(self, conn: PeerConnection) -> None:
        try:
            await self.exchange(conn)
        except SwarmError as exc:
            log.debug("credit exchange with %s failed: %s", conn.peer_id.hex()[:12], exc)

    def save(self) -> None:
        if self.ledger_path is not None and self.ledger.dirty:
            self.ledger.save()

    async def _send_due_receipts(self) -> None:
        assert self._nursery is not None
        while True:
            await self._receipts_due.wait()
            self._receipts_due = trio.Event()
            due, self._due = self._due, {}
            for server in due.values():
                if server.is_open:
                    self._nursery.start_soon(self.send_receipt, server)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send due receipts, save the ledger when it changed and exchange records with
        connected peers, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_due_receipts)
                task_status.started()
                since_exchange = 0.0
                while True:
                    await trio.sleep(self.save_interval)
                    self.save()
                    since_exchange += self.save_interval
                    if since_exchange >= self.exchange_interval:
                        since_exchange = 0.0
                        for conn in list(self.host.connections.values()):
                            nursery.start_soon(self._exchange_quietly, conn)
        finally:
            self._nursery = None
            self.save()
