"""The ledger of double-signed receipts (spec "Credit", "Ledger" and "Exchange").

Theory of operation. A ledger belongs to one peer (``owner``, an Ed25519 public key)
and holds, per (client, server) pair, only the latest double-signed ReceiptRecord:
receipts are cumulative, so the newest one (highest ``seq``; ``work`` never lower)
supersedes every earlier one. Records the owner is a party to are "given" (owner is
the server: work it did) or "received" (owner is the client: work done for it);
other records are third-party records learned from CREDIT_REPORTs and used only for
transitive credit. Every record is verified (both signatures) before it is stored;
an older or equal-seq record for a stored pair is a ``StaleReceipt``.

A ``WorkGraph`` is kept in step with the records so that credit queries cost
O(min(out-degree, in-degree)), not a scan. Each record's increase over the one it
supersedes enters the graph at the time this ledger stored it and then decays
(``half_life``, spec section 12 "Credit computation"): old work fades.

Third-party records are kept only when they can carry flow to the owner, i.e. when
their beneficiary has itself done work for the owner (the middle hop of a 2-hop
path), and only up to ``max_records`` in all: a Sybil flood of mutual receipts is
dropped on arrival instead of filling memory (it would carry no flow anyway).

Persistence: the whole ledger is one deterministic-CBOR file written with
``atomic_write`` (readers see the old or the new file, never half of one), with the
decayed value of every edge as of when it was last raised (``recent``); a version 1
file (no ``recent``) loads with all its work counted as of the load. The file
is this peer's own output, mode 0600; loading checks structure, not signatures, so
that a restart with a large ledger stays fast. A file that does not decode is a
``LedgerError``, never a crash.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    DEFAULT_LIMITS,
    PUBLIC_KEY_SIZE,
    ReceiptRecord,
    atomic_write,
    cbor_decode,
    cbor_encode,
    peer_id_of,
)
from protocol.errors import ErrorCode, ProtocolError, SwarmError

from ._flow import DEFAULT_HALF_LIFE, Credit, WorkGraph, credit_of

__all__ = [
    "Ledger",
    "LedgerError",
    "ReceiptError",
    "StaleReceipt",
    "InvalidReceipt",
    "MergeResult",
    "LEDGER_FORMAT",
    "MAX_EXCHANGE_RECORDS",
]

LEDGER_FORMAT = "swarm-peer ledger v2"
_LEDGER_FORMATS = ("swarm-peer ledger v1", LEDGER_FORMAT)
#: Records in one CREDIT_REPORT (the message's list limit).
MAX_EXCHANGE_RECORDS = 1024
_MAX_FILE_SIZE = 256 * 1024 * 1024


class LedgerError(SwarmError):
    """The ledger file cannot be read or is corrupt (it is left untouched)."""

    code = ErrorCode.INTERNAL


class ReceiptError(SwarmError):
    """A receipt that is well-formed and correctly signed but cannot be accepted.

    Not a ``RemoteProtocolError``: a lost acknowledgement or a restart makes honest
    peers send these, so the connection is kept and the error is answered.
    """

    code = ErrorCode.INVALID_REQUEST


class StaleReceipt(ReceiptError):
    """A receipt whose seq is not above the stored one, or whose work decreases (replay)."""

    code = ErrorCode.STALE_RECORD


class InvalidReceipt(ReceiptError):
    """A receipt for another server or connection, or claiming more work than was served."""

    code = ErrorCode.INVALID_REQUEST


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeResult:
    """What ``Ledger.merge_remote`` did with a batch of remote records."""

    accepted: int = 0  # new or newer records stored
    unchanged: int = 0  # records equal to or older than what we hold
    ignored: int = 0  # valid but irrelevant third-party records, or over the cap
    rejected: tuple[SwarmError, ...] = ()  # forged, malformed or unsigned records


class Ledger:
    """Latest double-signed receipt per (client, server) pair, owned by one peer.

    Args:
        owner: the owning peer's Ed25519 public key.
        path: where ``save()`` writes (None: memory only).
        max_records: cap on stored third-party records (own records are always kept).
        half_life: seconds over which recorded work halves in credit (None: never).

    Methods that change or read credit take ``now`` (unix seconds; default the clock).
    """

    def __init__(self, owner: bytes, *, path: str | os.PathLike[str] | None = None, max_records: int = 65536,
                 half_life: float | None = DEFAULT_HALF_LIFE) -> None:
        if len(owner) != PUBLIC_KEY_SIZE:
            raise ValueError("owner must be a 32-byte Ed25519 public key")
        if max_records <= 0:
            raise ValueError("max_records must be positive")
        self.owner = owner
        self.path = Path(path) if path is not None else None
        self.max_records = max_records
        self._records: dict[tuple[bytes, bytes], ReceiptRecord] = {}  # (client, server) -> latest
        self._third_party = 0
        self._graph = WorkGraph(half_life=half_life)
        self._raised: dict[tuple[bytes, bytes], float] = {}  # (client, server) -> when its edge last grew
        self._keys: dict[bytes, bytes] = {peer_id_of(owner): owner}  # peer id -> public key
        self._dirty = False

    # -- reading ------------------------------------------------------------------

    def latest(self, client: bytes, server: bytes) -> ReceiptRecord | None:
        """The latest record for the pair, or None."""
        return self._records.get((client, server))

    def given(self) -> tuple[ReceiptRecord, ...]:
        """Records of work the owner did (owner is the server)."""
        return tuple(r for r in self._records.values() if r.server == self.owner)

    def received(self) -> tuple[ReceiptRecord, ...]:
        """Records of work done for the owner (owner is the client)."""
        return tuple(r for r in self._records.values() if r.client == self.owner)

    def records(self) -> tuple[ReceiptRecord, ...]:
        return tuple(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    @property
    def graph(self) -> WorkGraph:
        """The work graph of the stored records (read it, do not modify it)."""
        return self._graph

    @property
    def dirty(self) -> bool:
        """True when records changed since the last ``save()`` or load."""
        return self._dirty

    def public_key_of(self, peer_id: bytes) -> bytes | None:
        """The public key of a peer id seen in any stored record."""
        return self._keys.get(peer_id)

    def credit(self, requester: bytes, now: float | None = None) -> Credit:
        """Credit of ``requester`` (public key) at the owner: direct + conserved 2-hop
        transitive, decayed to ``now``."""
        return credit_of(self._graph, requester, self.owner, _now(now))

    def credit_of_peer(self, peer_id: bytes, now: float | None = None) -> Credit:
        """``credit`` by peer id; a peer id never seen in a record has no credit."""
        key = self._keys.get(peer_id)
        return self.credit(key, now) if key is not None else Credit(direct=0, transitive=0)

    # -- writing ------------------------------------------------------------------

    def store(self, record: ReceiptRecord, now: float | None = None) -> bool:
        """Verify and store a double-signed record if it is newer than the stored one.

        Returns False if the very same record is already stored.

        Raises:
            BadSignature: a signature does not verify (forged or tampered).
            DecodeError: the server's countersignature is missing.
            StaleReceipt: a different record with seq <= the stored one, or lower work.
        """
        existing = self._records.get((record.client, record.server))
        if existing == record:
            return False
        self._check_newer(record, existing)
        record.verify(require_countersignature=True)
        self._put(record, existing, _now(now))
        return True

    def merge_remote(self, records: Iterable[ReceiptRecord], now: float | None = None) -> MergeResult:
        """Merge records from a peer's CREDIT_REPORT, verifying each before use.

        A bad record never aborts the batch; it is counted in ``rejected``. Records the
        owner is a party to are taken first, so that a report naming a new neighbour of
        the owner makes that neighbour's own records relevant in the same merge.
        """
        batch = sorted(records, key=lambda r: not self._is_own(r))
        now = _now(now)
        accepted = unchanged = ignored = 0
        rejected: list[SwarmError] = []
        for record in batch:
            existing = self._records.get((record.client, record.server))
            if existing == record or (existing is not None and record.seq <= existing.seq):
                unchanged += 1
                continue
            if not self._is_own(record) and not self._relevant(record, existing):
                ignored += 1
                continue
            try:
                self._check_newer(record, existing)
                record.verify(require_countersignature=True)
            except (ProtocolError, ReceiptError) as exc:
                rejected.append(exc)
                continue
            self._put(record, existing, now)
            accepted += 1
        return MergeResult(accepted=accepted, unchanged=unchanged, ignored=ignored, rejected=tuple(rejected))

    def records_for_exchange(self, limit: int = MAX_EXCHANGE_RECORDS) -> tuple[ReceiptRecord, ...]:
        """The latest records to send in a CREDIT_REPORT: own records first, largest work first."""
        ranked = sorted(self._records.values(), key=lambda r: (not self._is_own(r), -r.work, r.client, r.server))
        return tuple(ranked[:limit])

    def _is_own(self, record: ReceiptRecord) -> bool:
        return record.client == self.owner or record.server == self.owner

    def _relevant(self, record: ReceiptRecord, existing: ReceiptRecord | None) -> bool:
        # A third-party edge server -> client carries flow to the owner only if the
        # client has done work for the owner (it is then the middle of a 2-hop path).
        if self._graph.capacity(record.client, self.owner) <= 0:
            return False
        return existing is not None or self._third_party < self.max_records

    @staticmethod
    def _check_newer(record: ReceiptRecord, existing: ReceiptRecord | None) -> None:
        if existing is None:
            return
        if record.seq <= existing.seq:
            raise StaleReceipt(f"receipt seq {record.seq} is not above the stored seq {existing.seq} (replay?)")
        if record.work < existing.work:
            raise StaleReceipt(f"receipt work {record.work} is below the stored {existing.work}; work never decreases")

    def _put(self, record: ReceiptRecord, existing: ReceiptRecord | None, now: float) -> None:
        if existing is None and not self._is_own(record):
            self._third_party += 1
        self._records[(record.client, record.server)] = record
        # only the increase is new work; it counts from now and decays from here
        self._graph.add_work(record.server, record.client, record.work - (existing.work if existing else 0), now)
        self._raised[(record.client, record.server)] = now
        self._keys.setdefault(peer_id_of(record.client), record.client)
        self._keys.setdefault(peer_id_of(record.server), record.server)
        self._dirty = True

    # -- persistence --------------------------------------------------------------

    def to_bytes(self) -> bytes:
        records = sorted(self._records.values(), key=lambda r: (r.client, r.server))
        return cbor_encode(
            {
                "format": LEDGER_FORMAT,
                "owner": self.owner,
                "records": [r.to_cbor() for r in records],
                # [client, server, decayed work at t, t]: the credit the record still carries
                "recent": [[r.client, r.server, float(self._graph.capacity(r.server, r.client,
                                                                            self._raised[(r.client, r.server)])),
                            float(self._raised[(r.client, r.server)])] for r in records],
            }
        )

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        """Write the ledger atomically (mode 0600) to ``path`` or ``self.path``."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("this ledger has no path to save to")
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, self.to_bytes(), mode=0o600)
        self._dirty = False

    @classmethod
    def from_bytes(
        cls, data: bytes, owner: bytes, *, path: str | os.PathLike[str] | None = None, max_records: int = 65536,
        half_life: float | None = DEFAULT_HALF_LIFE, now: float | None = None
    ) -> Ledger:
        """Rebuild a ledger from ``to_bytes`` output. Raises LedgerError if corrupt or not ``owner``'s."""
        try:
            obj = cbor_decode(data, max_size=_MAX_FILE_SIZE)
        except ProtocolError as exc:
            raise LedgerError(f"ledger file is corrupt: {exc}") from None
        if type(obj) is not dict or obj.get("format") not in _LEDGER_FORMATS:
            raise LedgerError("not a swarm-peer ledger file (bad format header)")
        if obj.get("owner") != owner:
            raise LedgerError("the ledger file belongs to another identity")
        raw = obj.get("records")
        if type(raw) is not list:
            raise LedgerError("ledger file is corrupt: records are not a list")
        now = _now(now)
        ledger = cls(owner, path=path, max_records=max_records, half_life=half_life)
        for i, item in enumerate(raw):
            try:
                record = ReceiptRecord.from_cbor(item, limits=DEFAULT_LIMITS)
            except ProtocolError as exc:
                raise LedgerError(f"ledger file is corrupt: record {i}: {exc}") from None
            if record.server_signature is None:
                raise LedgerError(f"ledger file is corrupt: record {i} is not countersigned")
            existing = ledger._records.get((record.client, record.server))
            if existing is None or record.seq > existing.seq:
                ledger._put(record, existing, now)
        recent = obj.get("recent", [])
        if type(recent) is not list:
            raise LedgerError("ledger file is corrupt: recent is not a list")
        for item in recent:
            try:
                client, server, value, at = item
                value, at = float(value), float(at)
            except (TypeError, ValueError):
                raise LedgerError("ledger file is corrupt: a recent entry is not [client, server, work, time]") \
                    from None
            record = ledger._records.get((client, server))
            if record is None or not (0 <= value <= record.work) or not at <= now + 86400:
                continue  # nothing to decay, or an impossible entry: keep the full count
            ledger._graph.set_work(server, client, value, at)
            ledger._raised[(client, server)] = at
        ledger._dirty = False
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str], owner: bytes, *, max_records: int = 65536,
             half_life: float | None = DEFAULT_HALF_LIFE) -> Ledger:
        """Load the ledger at ``path`` (an empty one if the file does not exist).

        Raises:
            LedgerError: the file exists but cannot be read, is corrupt, or is another peer's.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(owner, path=path, max_records=max_records, half_life=half_life)
        except OSError as exc:
            raise LedgerError(f"cannot read ledger file {path}: {exc}") from None
        return cls.from_bytes(data, owner, path=path, max_records=max_records, half_life=half_life)


def _now(now: float | None) -> float:
    return time.time() if now is None else now
