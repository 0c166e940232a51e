"""Kademlia DHT: routing table (the ``kademlia`` package's), lookups over disjoint
paths, signed records, bounded storage (spec/SPEC.md, "DHT")."""

from ._groups import address_group, host_group
from ._lookup import DisjointLookup, Lookup, PeerState, Termination
from ._node import ALPHA, BETA, K, PATHS, BootstrapFailed, DhtNode, LookupResult, key_target
from ._records import (
    MAX_TTL,
    TOMBSTONE_MAX_TTL,
    RecordKind,
    RecordRejected,
    CheckedRecords,
    check_record,
    is_tombstone,
    latest_records,
    merge_records,
    record_size,
)
from ._routing import Contact, ContactState, RoutingTable, distance
from ._storage import GENERAL_LIMITS, LOCAL_GROUP, RESERVED_LIMITS, RecordStore, StorageLimits

__all__ = [
    "ALPHA",
    "BETA",
    "K",
    "PATHS",
    "MAX_TTL",
    "TOMBSTONE_MAX_TTL",
    "GENERAL_LIMITS",
    "RESERVED_LIMITS",
    "LOCAL_GROUP",
    "BootstrapFailed",
    "Contact",
    "ContactState",
    "DhtNode",
    "DisjointLookup",
    "Lookup",
    "LookupResult",
    "PeerState",
    "RecordKind",
    "RecordRejected",
    "RecordStore",
    "RoutingTable",
    "StorageLimits",
    "Termination",
    "address_group",
    "CheckedRecords",
    "check_record",
    "distance",
    "host_group",
    "is_tombstone",
    "key_target",
    "latest_records",
    "merge_records",
    "record_size",
]
