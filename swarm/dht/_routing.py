"""The routing table: the ``kademlia`` package's, holding only contacts that proved
their address, kept diverse and fresh by BEP 5's node states (spec "DHT", "Routing
table"; Kademlia paper sections 2.2, 2.4, 4.1; BEP 5 and BEP 42).

Theory of operation. ``kademlia.routing.RoutingTable`` keeps k-buckets of ``Node``
objects, splits the bucket holding our own id (and, per section 4.2, buckets whose
depth is not 0 mod 5) and keeps a replacement cache per bucket. This subclass changes
what may enter and what leaves:

- **Admission.** The DHT node calls ``add_contact`` only for a peer that answered
  one of our requests at the address the contact will carry (a connection we dialled
  to it), never because the peer sent us something: an inbound peer's claimed
  address is PINGed first (``DhtNode``). So a peer that claims a tarpit as its
  address never enters.
- **States** (BEP 5). A contact is GOOD if it answered one of our requests within
  ``GOOD_FOR`` (15 minutes), or answered once and sent us a request within that
  time; BAD after ``BAD_AFTER`` (2) failed requests in a row; QUESTIONABLE otherwise.
- **Full bucket.** A newcomer replaces a BAD contact at once. Otherwise, if a
  contact is QUESTIONABLE, the least recently seen one is queued in
  ``pending_checks`` for the owner to ping (the package would fire an unsupervised
  asyncio task here) and the newcomer waits in the replacement cache; if all are
  GOOD it waits there too. A contact that turns BAD is evicted and the most recently
  verified replacement (that the diversity rule admits) takes its place.
- **Diversity** (BEP 42, libp2p's peer diversity filter). A bucket holds at most
  ``max_per_group`` contacts of one address group (``_groups``: /24, /64), except
  for the groups of our own addresses (``exempt_groups``): peers on our own subnet
  are not a remote operator's Sybils, and a swarm on one LAN or on loopback must
  still have full tables.

Contacts are ``Contact`` nodes made from a ``NodeInfo``, whose constructor already
refuses an id that is not the hash of the public key. Times are the caller's clock
(``now``), so the table is tested without trio.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterable

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable as _PackageRoutingTable

from protocol import PEER_ID_SIZE, NodeInfo

from ._groups import address_group

__all__ = ["BAD_AFTER", "Contact", "ContactState", "GOOD_FOR", "MAX_PER_GROUP", "RoutingTable", "distance",
           "target_node"]

ID_BITS = PEER_ID_SIZE * 8
#: Seconds a contact stays GOOD after answering us (BEP 5: 15 minutes).
GOOD_FOR = 15 * 60.0
#: Failed requests in a row that make a contact BAD.
BAD_AFTER = 2
#: Contacts of one address group per bucket (BEP 42 allows one per /24; libp2p two per group).
MAX_PER_GROUP = 2


class ContactState(enum.Enum):
    GOOD = "good"
    QUESTIONABLE = "questionable"
    BAD = "bad"


class Contact(Node):
    """A DHT contact: a package ``Node`` that carries its verified ``NodeInfo`` and its
    liveness (times on the table owner's clock)."""

    def __init__(self, info: NodeInfo, *, now: float | None = None) -> None:
        super().__init__(info.peer_id)
        self.info = info
        self._group: str | None = None
        self.answered_at: float | None = now  # last answer to one of our requests
        self.queried_at: float | None = None  # last request it sent us
        self.failures = 0  # failed requests in a row

    @property
    def addrs(self) -> tuple[str, ...]:
        return self.info.addrs

    @property
    def group(self) -> str:
        """The address group of the contact's (first) address."""
        if self._group is None:
            self._group = address_group(self.info.addrs[0]) if self.info.addrs else "none"
        return self._group

    def state(self, now: float) -> ContactState:
        if self.failures >= BAD_AFTER:
            return ContactState.BAD
        if self.answered_at is not None and (now - self.answered_at < GOOD_FOR or (
                self.queried_at is not None and now - self.queried_at < GOOD_FOR)):
            return ContactState.GOOD
        return ContactState.QUESTIONABLE

    def last_seen(self) -> float:
        return max(self.answered_at or 0.0, self.queried_at or 0.0)

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
    """The package's routing table with verified, diverse contacts and BEP 5 states.

    ``pending_checks`` holds QUESTIONABLE contacts of full buckets that a newcomer is
    waiting on; the owner pings them (``take_pending_check``) and reports with
    ``contact_alive`` or ``contact_failed``.
    """

    def __init__(self, own_id: bytes, *, k: int = 20, max_per_group: int = MAX_PER_GROUP,
                 exempt_groups: Iterable[str] = ()) -> None:
        self.pending_checks: deque[Contact] = deque()
        self.max_per_group = max_per_group
        self.exempt_groups = set(exempt_groups)
        super().__init__(protocol=None, ksize=k, node=Node(own_id))

    @property
    def own_id(self) -> bytes:
        return self.node.id

    def add_contact(self, node: Contact, *, now: float = 0.0) -> bool:  # overrides the package's asyncio path
        """Add or refresh ``node``, a peer that just answered us at ``node.addrs[0]``.
        Returns False when it is only a replacement candidate or was refused."""
        if node.id == self.node.id:
            return False
        node.answered_at, node.failures = now, 0
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        known = bucket.nodes.get(node.id)
        if known is not None:
            if known.addrs == node.addrs:
                self.contact_alive(node.id, now=now)
                return True
            del bucket.nodes[node.id]  # it moved: the verified new address replaces the old one
        if not self._diverse(bucket, node):
            return False
        if bucket.add_node(node):
            return True
        # The package's split rule (paper section 4.2), then the full-bucket case (BEP 5).
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            return self.add_contact(node, now=now)
        contacts = bucket.get_nodes()
        bad = [c for c in contacts if c.state(now) is ContactState.BAD]
        if bad:
            del bucket.nodes[bad[0].id]
            bucket.replacement_nodes.pop(node.id, None)
            bucket.nodes[node.id] = node
            return True
        questionable = [c for c in contacts if c.state(now) is ContactState.QUESTIONABLE]
        if questionable:
            oldest = min(questionable, key=Contact.last_seen)
            if oldest not in self.pending_checks:
                self.pending_checks.append(oldest)
        return False

    def take_pending_check(self) -> Contact | None:
        """The next contact whose liveness a newcomer waits on, if it is still in the table."""
        while self.pending_checks:
            contact = self.pending_checks.popleft()
            if self.get(contact.id) is contact:
                return contact
        return None

    def contact_alive(self, contact_id: bytes, *, now: float) -> None:
        """``contact_id`` answered one of our requests: GOOD, most recently seen of its bucket."""
        bucket = self.buckets[self.get_bucket_for(Node(contact_id))]
        contact = bucket.nodes.get(contact_id)
        if contact is not None:
            contact.answered_at, contact.failures = now, 0
            bucket.nodes.move_to_end(contact_id)

    def contact_queried(self, contact_id: bytes, *, now: float) -> None:
        """``contact_id`` sent us a request (keeps a once-verified contact GOOD; admits nobody)."""
        contact = self.get(contact_id)
        if contact is not None:
            contact.queried_at = now

    def contact_failed(self, contact_id: bytes, *, now: float) -> None:
        """A request to ``contact_id`` failed; after ``BAD_AFTER`` in a row it is evicted
        and the most recently verified replacement that the diversity rule admits
        takes its place."""
        bucket = self.buckets[self.get_bucket_for(Node(contact_id))]
        bucket.replacement_nodes.pop(contact_id, None)
        contact = bucket.nodes.get(contact_id)
        if contact is None:
            return
        contact.failures += 1
        if contact.state(now) is not ContactState.BAD:
            return
        del bucket.nodes[contact_id]
        for candidate_id in reversed(list(bucket.replacement_nodes)):
            candidate = bucket.replacement_nodes[candidate_id]
            if self._diverse(bucket, candidate):
                del bucket.replacement_nodes[candidate_id]
                bucket.nodes[candidate_id] = candidate
                break

    def state(self, contact_id: bytes, *, now: float) -> ContactState | None:
        contact = self.get(contact_id)
        return None if contact is None else contact.state(now)

    def is_good(self, contact_id: bytes, *, now: float) -> bool:
        """Whether ``contact_id`` is a GOOD contact: this node has proven it live."""
        return self.state(contact_id, now=now) is ContactState.GOOD

    def get(self, contact_id: bytes) -> Contact | None:
        return self.buckets[self.get_bucket_for(Node(contact_id))][contact_id]

    def contacts(self) -> list[Contact]:
        return [c for bucket in self.buckets for c in bucket.get_nodes()]

    def closest(self, target: bytes, k: int | None = None, *, exclude: bytes | None = None) -> list[Contact]:
        """The ``k`` contacts closest to ``target`` (20 bytes) by XOR, never ``exclude``
        and never a BAD one.

        Exact, unlike the package's ``find_neighbors``, which walks buckets outwards,
        stops at the first k and skips a contact whose id is the target itself (a
        FIND_NODE for a known peer must return that peer).
        """
        goal = target_node(target).long_id
        ranked = sorted((c for c in self.contacts() if c.id != exclude and c.failures < BAD_AFTER),
                        key=lambda c: c.long_id ^ goal)
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

    def _diverse(self, bucket: KBucket, node: Contact) -> bool:
        if node.group in self.exempt_groups:
            return True
        same = sum(1 for c in bucket.nodes.values() if c.group == node.group and c.id != node.id)
        return same < self.max_per_group

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)
