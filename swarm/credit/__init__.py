"""Tit-for-tat credit: double-signed receipts, their ledger, and Sybil-resistant credit.

Pure code (no trio, no clock, no sockets): the network shell sends RECEIPT after each
step with ``ReceiptWallet.issue``, answers it with ``ReceiptDesk.accept``, and serves
CREDIT_QUERY with ``Ledger.records_for_exchange`` / ``Ledger.merge_remote``.
Normative description: spec section "Credit".
"""

from ._flow import DEFAULT_HALF_LIFE, Credit, WorkGraph, credit_of, max_flow_2hop, normalized_credit
from ._ledger import (
    LEDGER_FORMAT,
    MAX_EXCHANGE_RECORDS,
    InvalidReceipt,
    Ledger,
    LedgerError,
    MergeResult,
    ReceiptError,
    StaleReceipt,
)
from ._receipts import DEFAULT_GRACE_UNITS, ReceiptDesk, ReceiptWallet, countersign, make_receipt

__all__ = [
    "DEFAULT_HALF_LIFE",
    "Credit",
    "WorkGraph",
    "credit_of",
    "max_flow_2hop",
    "normalized_credit",
    "Ledger",
    "LedgerError",
    "ReceiptError",
    "StaleReceipt",
    "InvalidReceipt",
    "MergeResult",
    "LEDGER_FORMAT",
    "MAX_EXCHANGE_RECORDS",
    "make_receipt",
    "countersign",
    "ReceiptDesk",
    "ReceiptWallet",
    "DEFAULT_GRACE_UNITS",
]
