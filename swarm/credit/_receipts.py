"""Issuing and accepting receipts (spec "Credit", "Receipt flow").

Theory of operation. After each served step the client sends RECEIPT with a record
it signed: cumulative ``work`` it has received from that server, a ``seq`` one above
any it issued before for the pair, and the Noise handshake hash of the connection it
was sent on. The server checks the record against what it actually served, signs the
countersignature and answers RECEIPT_ACK with the double-signed record; both store it.

Both sides count per pair, across connections, in memory:

- ``ReceiptWallet`` (client): ``received(server, units)`` after each step, ``issue``
  to make the next receipt, ``acknowledged`` for the RECEIPT_ACK.
- ``ReceiptDesk`` (server): ``served(client, units)`` after each step, ``accept`` for
  a RECEIPT. It also tracks work served but not yet receipted: past ``grace_units``
  the requester is ``delinquent`` and the scheduler serves it only with idle capacity.

Both counters start from the latest stored record, so they agree after a restart of
either side except for work that was served but never acknowledged. Recovery
(spec "Resynchronization"): a client whose receipt is refused as over-claimed (the
server restarted and lost unreceipted work) calls ``rebase`` and re-sends its latest
double-signed record, which the server adopts (it carries the server's own valid
countersignature, so nothing can be forged that way); a client refused as stale
(its own file is older than the server's) merges the server's CREDIT_REPORT, which
holds the newer record of the pair, and continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protocol import Identity, ReceiptRecord, receipt_statement

from ._ledger import InvalidReceipt, Ledger, StaleReceipt

__all__ = ["make_receipt", "countersign", "ReceiptDesk", "ReceiptWallet", "DEFAULT_GRACE_UNITS"]

#: Unreceipted work units a server tolerates before deprioritizing a requester. A
#: well-behaved client is at most one or two steps behind (its receipt is in flight).
DEFAULT_GRACE_UNITS = 4096


def make_receipt(
    identity: Identity, server_public_key: bytes, handshake_hash: bytes, seq: int, work: int
) -> ReceiptRecord:
    """A receipt signed by the client ``identity``: ``work`` units received in all from the server."""
    statement = receipt_statement(
        client=identity.public_key, server=server_public_key, handshake_hash=handshake_hash, seq=seq, work=work
    )
    return ReceiptRecord(
        client=identity.public_key,
        server=server_public_key,
        handshake_hash=handshake_hash,
        seq=seq,
        work=work,
        client_signature=identity.sign(statement),
    )


def countersign(identity: Identity, receipt: ReceiptRecord) -> ReceiptRecord:
    """``receipt`` with the server ``identity``'s countersignature (no checks: see ReceiptDesk)."""
    return replace(receipt, server_signature=identity.sign(receipt.statement(countersign=True)))


@dataclass(slots=True)
class _Account:
    served: int  # cumulative units served to this client, as far as this process knows


class ReceiptDesk:
    """The server side: counts work served per client and countersigns valid receipts.

    Args:
        identity: the server's identity (countersigns).
        ledger: where accepted records go (the server's own ledger).
        grace_units: unreceipted units tolerated before ``delinquent`` says True.
    """

    def __init__(self, identity: Identity, ledger: Ledger, *, grace_units: int = DEFAULT_GRACE_UNITS) -> None:
        if ledger.owner != identity.public_key:
            raise ValueError("the ledger belongs to another identity")
        if grace_units < 0:
            raise ValueError("grace_units must be non-negative")
        self.identity = identity
        self.ledger = ledger
        self.grace_units = grace_units
        self._accounts: dict[bytes, _Account] = {}

    def _account(self, client: bytes) -> _Account:
        account = self._accounts.get(client)
        if account is None:
            latest = self.ledger.latest(client, self.identity.public_key)
            account = self._accounts[client] = _Account(served=latest.work if latest else 0)
        return account

    def served(self, client: bytes, units: int) -> None:
        """Count ``units`` (blocks x tokens) just served to ``client`` (public key)."""
        if units < 0:
            raise ValueError("units must be non-negative")
        self._account(client).served += units

    def receipted(self, client: bytes) -> int:
        """Work covered by the latest accepted receipt from ``client``."""
        latest = self.ledger.latest(client, self.identity.public_key)
        return latest.work if latest else 0

    def unreceipted(self, client: bytes) -> int:
        """Work served to ``client`` that no accepted receipt covers yet."""
        return max(0, self._account(client).served - self.receipted(client)) if client in self._accounts else 0

    def delinquent(self, client: bytes) -> bool:
        """True when ``client`` owes receipts for more than ``grace_units``."""
        return self.unreceipted(client) > self.grace_units

    def accept(self, receipt: ReceiptRecord, *, handshake_hash: bytes) -> ReceiptRecord:
        """Check a RECEIPT received on the connection with ``handshake_hash``; countersign and store it.

        A receipt that already carries this server's valid countersignature is a
        resynchronization: it is stored if newer and raises the served counter to it.
        The receipt this server already countersigned, sent again (its RECEIPT_ACK was
        lost), is answered with the same record: it is not an error (spec rule 1).

        Returns the double-signed record to send back in RECEIPT_ACK.

        Raises:
            InvalidReceipt: addressed to another server, bound to another connection,
                or claiming more work than this server served to the client.
            BadSignature: a signature does not verify (forged or tampered).
            StaleReceipt: seq not above the stored one, or work below it (replay).
        """
        me = self.identity.public_key
        if receipt.server != me:
            raise InvalidReceipt("receipt is addressed to another server")
        if receipt.server_signature is not None:
            return self._resync(receipt)
        latest = self.ledger.latest(receipt.client, me)
        if latest is not None and replace(latest, server_signature=None) == receipt:
            return latest  # a retry after a lost RECEIPT_ACK: the same acknowledgement again (rule 1)
        if receipt.handshake_hash != handshake_hash:
            raise InvalidReceipt("receipt is bound to another connection (handshake hash differs)")
        receipt.verify(require_countersignature=False)
        Ledger._check_newer(receipt, latest)
        account = self._account(receipt.client)
        if receipt.work > account.served:
            raise InvalidReceipt(
                f"receipt claims {receipt.work} work units but {account.served} were served; "
                "re-send the latest acknowledged receipt to resynchronize"
            )
        record = countersign(self.identity, receipt)
        self.ledger.store(record)
        return record

    def _resync(self, record: ReceiptRecord) -> ReceiptRecord:
        latest = self.ledger.latest(record.client, record.server)
        if latest is not None and record.seq <= latest.seq:
            if record == latest:
                return latest
            raise StaleReceipt(f"resynchronization record seq {record.seq} is not above the stored {latest.seq}")
        self.ledger.store(record)  # verifies both signatures
        account = self._account(record.client)
        account.served = max(account.served, record.work)
        return record


@dataclass(slots=True)
class _Claim:
    seq: int  # highest seq issued for the pair by this process
    work: int  # cumulative units received from the server


class ReceiptWallet:
    """The client side: counts work received per server and issues receipts for it.

    Args:
        identity: the client's identity (signs receipts).
        ledger: the client's own ledger (acknowledged records go there).
    """

    def __init__(self, identity: Identity, ledger: Ledger) -> None:
        if ledger.owner != identity.public_key:
            raise ValueError("the ledger belongs to another identity")
        self.identity = identity
        self.ledger = ledger
        self._claims: dict[bytes, _Claim] = {}

    def _claim(self, server: bytes) -> _Claim:
        claim = self._claims.get(server)
        latest = self.ledger.latest(self.identity.public_key, server)
        if claim is None:
            claim = self._claims[server] = _Claim(seq=0, work=0)
        if latest is not None:
            # A record merged from the server's CREDIT_REPORT may be newer than ours.
            claim.seq = max(claim.seq, latest.seq)
            claim.work = max(claim.work, latest.work)
        return claim

    def received(self, server: bytes, units: int) -> None:
        """Count ``units`` (blocks x tokens) just received from ``server`` (public key)."""
        if units < 0:
            raise ValueError("units must be non-negative")
        self._claim(server).work += units

    def issue(self, server: bytes, handshake_hash: bytes) -> ReceiptRecord:
        """The next receipt for ``server``, covering all work received, bound to this connection."""
        claim = self._claim(server)
        claim.seq += 1
        return make_receipt(self.identity, server, handshake_hash, claim.seq, claim.work)

    def acknowledged(self, record: ReceiptRecord) -> bool:
        """Store the double-signed record of a RECEIPT_ACK. Returns False if already stored.

        Raises:
            InvalidReceipt: the record is not one of ours.
            BadSignature / DecodeError: the countersignature is missing or does not verify.
        An ack not newer than the stored record (a late duplicate) is ignored: False.
        """
        if record.client != self.identity.public_key:
            raise InvalidReceipt("acknowledged receipt was issued by another client")
        latest = self.ledger.latest(record.client, record.server)
        if latest is not None and record.seq <= latest.seq:
            return False
        return self.ledger.store(record)

    def rebase(self, server: bytes) -> ReceiptRecord | None:
        """After an over-claim refusal: drop unacknowledged work, return the record to re-send.

        The returned record (None if the pair has none) goes in a RECEIPT as is; the
        server adopts it and later receipts count from it again.
        """
        latest = self.ledger.latest(self.identity.public_key, server)
        claim = self._claim(server)
        claim.work = latest.work if latest else 0
        return latest

    def pending(self, server: bytes) -> int:
        """Units received from ``server`` that no acknowledged record covers yet."""
        latest = self.ledger.latest(self.identity.public_key, server)
        return self._claim(server).work - (latest.work if latest else 0)
