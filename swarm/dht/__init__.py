"""Kademlia DHT: routing table (the ``kademlia`` package's), lookups, signed records
(spec/SPEC.md, "DHT")."""

from ._lookup import Lookup, PeerState, Termination
from ._node import ALPHA, BETA, K, BootstrapFailed, DhtNode, LookupResult, key_target
from ._records import (
    DEFAULT_MAX_TTL,
    RecordKind,
    RecordRejected,
    RecordStore,
    check_record,
    is_tombstone,
    merge_records,
    record_size,
)
from ._routing import Contact, RoutingTable, distance

__all__ = [
    "ALPHA",
    "BETA",
    "K",
    "DEFAULT_MAX_TTL",
    "BootstrapFailed",
    "Contact",
    "DhtNode",
    "Lookup",
    "LookupResult",
    "PeerState",
    "RecordKind",
    "RecordRejected",
    "RecordStore",
    "RoutingTable",
    "Termination",
    "check_record",
    "distance",
    "is_tombstone",
    "key_target",
    "merge_records",
    "record_size",
]
