"""The routing table: the ``kademlia`` package's, with verified contacts and no
unsupervised tasks (spec "DHT", "Routing table"; Kademlia paper sections 2.2, 2.4, 4.1).

Theory of operation. ``kademlia.routing.RoutingTable`` keeps k-buckets of ``Node``
objects, splits the bucket holding our own id (and, per section 4.2, buckets whose
depth is not 0 mod 5) and keeps a replacement cache per bucket. When a bucket is full
and may not split, the package schedules ``asyncio.ensure_future(ping(head))``: a task
nobody owns, on an event loop this program does not run. ``RoutingTable.add_contact``
below takes that path instead by recording the bucket's least-recently-seen node
in ``pending_checks``; the DHT node's supervised trio task drains it, pings that node
and calls ``contact_alive`` (moved to the tail, the candidate stays in the
replacement cache) or ``contact_failed`` (evicted, the most recent replacement takes
its place), which is the paper's section 2.2 rule.

Contacts are ``Contact`` nodes made from a ``NodeInfo``, whose constructor already
refuses an id that is not the hash of the public key. The DHT node adds a contact
only once a handshake with it has completed, so an id in the table is always one
the transport verified; ids heard in FIND_NODE answers feed lookups only.
"""

from __future__ import annotations

import random
from collections import deque

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable as _PackageRoutingTable

from protocol import PEER_ID_SIZE, NodeInfo

__all__ = ["Contact", "RoutingTable", "target_node", "distance"]

ID_BITS = PEER_ID_SIZE * 8


class Contact(Node):
    """A DHT contact: a package ``Node`` that carries its verified ``NodeInfo``."""

    def __init__(self, info: NodeInfo) -> None:
        super().__init__(info.peer_id)
        self.info = info

    @property
    def addrs(self) -> tuple[str, ...]:
        return self.info.addrs

    def same_home_as(self, node: Node) -> bool:  # the package compares ip/port, which we do not have
        return node.id == self.id

    def __repr__(self) -> str:
        return f"Contact({self.id.hex()[:12]}, {list(self.addrs)})"

    def __str__(self) -> str:
        return self.addrs[0] if self.addrs else self.id.hex()[:12]


def target_node(target: bytes) -> Node:
    """A bare package ``Node`` for a 20-byte lookup target."""
    if len(target) != PEER_ID_SIZE:
        raise ValueError(f"a lookup target has {PEER_ID_SIZE} bytes, not {len(target)}")
    return Node(target)


def distance(a: bytes, b: bytes) -> int:
    """The XOR metric between two 20-byte ids."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


class RoutingTable(_PackageRoutingTable):
    """The package's routing table with the bucket-full ping turned into data.

    ``pending_checks`` holds the least-recently-seen contacts of full buckets that
    a newcomer is waiting on; the owner pings them (``take_pending_check``) and
    reports with ``contact_alive`` or ``contact_failed``.
    """

    def __init__(self, own_id: bytes, *, k: int = 20) -> None:
        self.pending_checks: deque[Contact] = deque()
        super().__init__(protocol=None, ksize=k, node=Node(own_id))

    @property
    def own_id(self) -> bytes:
        return self.node.id

    def add_contact(self, node: Contact) -> bool:  # overrides the package's asyncio path
        """Add or refresh ``node``. Returns False when it went to a replacement cache."""
        if node.id == self.node.id:
            return False
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return True
        # The package's split rule (paper section 4.2), then its full-bucket case.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            return self.add_contact(node)
        head = bucket.head()
        if head not in self.pending_checks:
            self.pending_checks.append(head)
        return False

    def take_pending_check(self) -> Contact | None:
        """The next contact whose liveness a newcomer waits on, if it is still in the table."""
        while self.pending_checks:
            contact = self.pending_checks.popleft()
            if self.get(contact.id) is not None:
                return contact
        return None

    def contact_alive(self, contact: Contact) -> None:
        """``contact`` answered: it becomes the most recently seen of its bucket."""
        bucket = self.buckets[self.get_bucket_for(contact)]
        if contact.id in bucket.nodes:
            bucket.add_node(contact)

    def contact_failed(self, contact_id: bytes) -> None:
        """``contact_id`` did not answer: evict it (a replacement, if any, takes its place)."""
        self.remove_contact(Node(contact_id))

    def get(self, contact_id: bytes) -> Contact | None:
        return self.buckets[self.get_bucket_for(Node(contact_id))][contact_id]

    def contacts(self) -> list[Contact]:
        return [c for bucket in self.buckets for c in bucket.get_nodes()]

    def closest(self, target: bytes, k: int | None = None, *, exclude: bytes | None = None) -> list[Contact]:
        """The ``k`` contacts closest to ``target`` (20 bytes) by XOR, never ``exclude``.

        Exact, unlike the package's ``find_neighbors``, which walks buckets outwards,
        stops at the first k and skips a contact whose id is the target itself (a
        FIND_NODE for a known peer must return that peer).
        """
        goal = target_node(target).long_id
        ranked = sorted((c for c in self.contacts() if c.id != exclude), key=lambda c: c.long_id ^ goal)
        return ranked[: k or self.ksize]

    def note_lookup(self, target: bytes) -> None:
        """A lookup for ``target`` went through its bucket (it need not be refreshed)."""
        self.buckets[self.get_bucket_for(target_node(target))].touch_last_updated()

    def stale_buckets(self, *, now: float, interval: float) -> list[KBucket]:
        """Buckets without a lookup through them for ``interval`` seconds. ``now`` is on
        the package's clock (``time.monotonic``), which stamps ``last_updated``."""
        return [b for b in self.buckets if b.last_updated < now - interval]

    @staticmethod
    def random_id_in(bucket: KBucket, rng: random.Random) -> bytes:
        """A random id inside ``bucket``'s range, the target of its refresh lookup."""
        low, high = bucket.range
        value = rng.randint(low, min(high, 2**ID_BITS - 1))
        return value.to_bytes(PEER_ID_SIZE, "big")

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)
