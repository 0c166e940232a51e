"""Iterative lookup bookkeeping as pure data (spec "DHT", "Lookups"; Kademlia paper 2.3).

Theory of operation, after go-libp2p-kad-dht's query state. A ``Lookup`` knows
every peer it has heard of for one target, in the package's ``NodeHeap`` ordered by
XOR distance, and one state per peer:

    HEARD --next_queries--> WAITING --on_response--> QUERIED
      |                     |   +--on_failure---> UNREACHABLE (leaves the heap)
      |                     +--on_stall--> STALLED (leaves the heap until it answers or fails)
      +--(another path asked it)--> ELSEWHERE (leaves the heap)

``next_queries`` hands out HEARD peers among the ``k`` closest known, closest
first, so that at most ``alpha`` are WAITING at once. A response's contacts
enter as HEARD, one hop further than the peer that named them. A query that has
not been answered within a short time is STALLED (``on_stall``): it no longer holds
one of the alpha slots nor counts for termination, so a peer that accepts and never
answers (a tarpit) costs a lookup that short time, not the whole query timeout; a
late answer still counts. The lookup is over (``termination``) when the ``beta``
closest peers not known unreachable or stalled have all answered (CONVERGED), or
when nothing is left to ask (EXHAUSTED). The trio loop that drives it
(``DhtNode``) only moves messages; every decision is here and tested without trio.

``DisjointLookup`` is S/Kademlia's lookup over ``d`` disjoint paths (section 4.4):
the seeds are dealt round-robin to ``d`` ``Lookup``s that share one set of
``claimed`` peers, so no peer is asked by two paths; a path that hears of a peer
another path has asked drops it (ELSEWHERE). An adversary on one path can then
steer only that path, and the lookup succeeds if any path reaches honest nodes
near the target. ``bench/dht.py`` measures exactly this code in a 10,000-node
simulation.

``beta`` trades messages for accuracy: ``beta = k`` makes the result the true
k closest reachable peers (what STORE needs); a smaller beta (3, kad-dht's
default) suffices to reach the nodes that hold a value.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from kademlia.node import NodeHeap

from ._routing import Contact, target_node

__all__ = ["DisjointLookup", "Lookup", "PeerState", "Termination"]


class PeerState(enum.Enum):
    HEARD = "heard"  # named by someone, not asked yet
    WAITING = "waiting"  # asked, no answer yet
    QUERIED = "queried"  # answered
    UNREACHABLE = "unreachable"  # failed, timed out or answered ERROR
    STALLED = "stalled"  # asked, no answer within the stall time (may still answer)
    ELSEWHERE = "elsewhere"  # asked by another disjoint path


class Termination(enum.Enum):
    CONVERGED = "the beta closest peers have answered"
    EXHAUSTED = "no peer left to ask"


class Lookup:
    """The peer set of one iterative lookup for ``target`` (20 bytes)."""

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        k: int = 20,
        alpha: int = 3,
        beta: int = 3,
        self_id: bytes | None = None,
        claimed: set[bytes] | None = None,
    ) -> None:
        if not 1 <= beta <= k or alpha < 1:
            raise ValueError("a lookup needs alpha >= 1 and 1 <= beta <= k")
        self.target = target
        self.k, self.alpha, self.beta = k, alpha, beta
        self._self_id = self_id
        self._claimed = claimed if claimed is not None else set()
        self._heap = NodeHeap(target_node(target), k)
        self._state: dict[bytes, PeerState] = {}
        self._hop: dict[bytes, int] = {}
        self._contacts: dict[bytes, Contact] = {}
        self.messages = 0  # queries handed out
        self.failures = 0
        self.stalls = 0
        self._add(seeds, hop=1)

    # -- events ---------------------------------------------------------------------

    def next_queries(self) -> list[Contact]:
        """HEARD peers to ask now (closest first), marked WAITING; empty when the
        alpha slots are busy, nothing useful is left, or the lookup is over."""
        if self.termination() is not None:
            return []
        free = self.alpha - self.waiting
        chosen: list[Contact] = []
        taken: list[bytes] = []
        for contact in self._heap:  # the k closest not unreachable, nearest first
            if free <= 0:
                break
            if self._state[contact.id] is PeerState.HEARD:
                if contact.id in self._claimed:  # another path asked it: not ours to use
                    self._state[contact.id] = PeerState.ELSEWHERE
                    taken.append(contact.id)
                    continue
                self._state[contact.id] = PeerState.WAITING
                self._claimed.add(contact.id)
                chosen.append(contact)
                free -= 1
        if taken:
            self._heap.remove(taken)
            if not chosen:
                return self.next_queries()
        self.messages += len(chosen)
        return chosen

    def on_response(self, peer_id: bytes, contacts: Iterable[Contact]) -> None:
        """``peer_id`` answered and named ``contacts``."""
        state = self._state.get(peer_id)
        if state not in (PeerState.WAITING, PeerState.STALLED):
            return
        self._state[peer_id] = PeerState.QUERIED
        if state is PeerState.STALLED:  # a late answer: back among the ranked peers
            self._heap.push([self._contacts[peer_id]])
        self._add(contacts, hop=self._hop[peer_id] + 1)

    def on_failure(self, peer_id: bytes) -> None:
        """``peer_id`` could not be asked or gave no usable answer."""
        state = self._state.get(peer_id)
        if state not in (PeerState.WAITING, PeerState.STALLED):
            return
        self._state[peer_id] = PeerState.UNREACHABLE
        if state is PeerState.WAITING:
            self._heap.remove([peer_id])
        self.failures += 1

    def on_stall(self, peer_id: bytes) -> None:
        """``peer_id`` has not answered within the stall time: free its slot."""
        if self._state.get(peer_id) is PeerState.WAITING:
            self._state[peer_id] = PeerState.STALLED
            self._heap.remove([peer_id])  # out of the ranking until it answers
            self.stalls += 1

    # -- queries --------------------------------------------------------------------

    def termination(self) -> Termination | None:
        ranked = list(self._heap)
        if ranked[: self.beta] and all(self._state[c.id] is PeerState.QUERIED for c in ranked[: self.beta]):
            return Termination.CONVERGED
        if not any(self._state[c.id] in (PeerState.HEARD, PeerState.WAITING) for c in ranked):
            return Termination.EXHAUSTED
        return None

    @property
    def waiting(self) -> int:
        return sum(1 for s in self._state.values() if s is PeerState.WAITING)

    def state(self, peer_id: bytes) -> PeerState | None:
        return self._state.get(peer_id)

    def closest(self, n: int | None = None) -> list[Contact]:
        """The ``n`` (default k) closest peers that answered, nearest first."""
        answered = [c for c in self._heap if self._state[c.id] is PeerState.QUERIED]
        return answered[: n or self.k]

    @property
    def hops(self) -> int:
        """Hops to the answer: the largest hop among the beta closest answered peers
        (a seed from our own table is hop 1)."""
        return max((self._hop[c.id] for c in self.closest(self.beta)), default=0)

    # -- internals ------------------------------------------------------------------

    def _add(self, contacts: Iterable[Contact], *, hop: int) -> None:
        fresh = []
        for contact in contacts:
            if contact.id == self._self_id or contact.id in self._state:
                continue
            self._state[contact.id] = PeerState.HEARD
            self._hop[contact.id] = hop
            self._contacts[contact.id] = contact
            fresh.append(contact)
        if fresh:
            self._heap.push(fresh)


class DisjointLookup:
    """S/Kademlia's lookup over ``paths`` disjoint paths (module docstring).

    Each path is a ``Lookup`` with ``alpha // paths`` (at least 1) queries in flight
    and its own ``beta``; events name the path (``index``) they belong to. The lookup
    is over when every path is. With ``paths=1`` it is a plain ``Lookup``.
    """

    def __init__(self, target: bytes, seeds: Iterable[Contact], *, k: int = 20, alpha: int = 3, beta: int = 3,
                 paths: int = 1, self_id: bytes | None = None) -> None:
        if paths < 1:
            raise ValueError("a lookup needs at least one path")
        self.target = target
        self.k = k
        self.claimed: set[bytes] = set()
        ranked = sorted((c for c in seeds if c.id != self_id), key=lambda c: c.long_id ^ target_node(target).long_id)
        self.paths = [Lookup(target, ranked[i::paths], k=k, alpha=max(1, alpha // paths), beta=beta,
                             self_id=self_id, claimed=self.claimed) for i in range(paths)]

    def next_queries(self) -> list[tuple[int, Contact]]:
        """``(path, contact)`` pairs to ask now."""
        return [(i, c) for i, path in enumerate(self.paths) for c in path.next_queries()]

    def on_response(self, index: int, peer_id: bytes, contacts: Iterable[Contact]) -> None:
        self.paths[index].on_response(peer_id, contacts)

    def on_failure(self, index: int, peer_id: bytes) -> None:
        self.paths[index].on_failure(peer_id)

    def on_stall(self, index: int, peer_id: bytes) -> None:
        self.paths[index].on_stall(peer_id)

    def termination(self) -> Termination | None:
        """None while any path runs; CONVERGED if any path converged, else EXHAUSTED."""
        ends = [path.termination() for path in self.paths]
        if any(end is None for end in ends):
            return None
        return Termination.CONVERGED if Termination.CONVERGED in ends else Termination.EXHAUSTED

    def closest(self, n: int | None = None) -> list[Contact]:
        """The ``n`` (default k) closest peers that answered on any path, nearest first."""
        goal = target_node(self.target).long_id
        answered = {c.id: c for path in self.paths for c in path.closest()}
        return sorted(answered.values(), key=lambda c: c.long_id ^ goal)[: n or self.k]

    def state(self, peer_id: bytes) -> PeerState | None:
        states = [s for s in (path.state(peer_id) for path in self.paths) if s not in (None, PeerState.ELSEWHERE)]
        return states[0] if states else None

    @property
    def waiting(self) -> int:
        return sum(path.waiting for path in self.paths)

    @property
    def messages(self) -> int:
        return sum(path.messages for path in self.paths)

    @property
    def failures(self) -> int:
        return sum(path.failures for path in self.paths)

    @property
    def stalls(self) -> int:
        return sum(path.stalls for path in self.paths)

    @property
    def hops(self) -> int:
        return max((path.hops for path in self.paths), default=0)
