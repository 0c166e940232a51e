"""Iterative lookup bookkeeping as pure data (spec "DHT", "Lookups"; Kademlia paper 2.3).

Theory of operation, after go-libp2p-kad-dht's query state. A ``Lookup`` knows
every peer it has heard of for one target, in the package's ``NodeHeap`` ordered by
XOR distance, and one state per peer:

    HEARD --next_queries--> WAITING --on_response--> QUERIED
                                    --on_failure---> UNREACHABLE (leaves the heap)

``next_queries`` hands out HEARD peers among the ``k`` closest known, closest
first, so that at most ``alpha`` are WAITING at once. A response's contacts
enter as HEARD, one hop further than the peer that named them. The lookup is
over (``termination``) when the ``beta`` closest peers not known unreachable
have all answered (CONVERGED), or when nothing is left to ask (EXHAUSTED). The
trio loop that drives it (``DhtNode``) only moves messages; every decision is
here and tested without trio.

``beta`` trades messages for accuracy: ``beta = k`` makes the result the true
k closest reachable peers (what STORE needs); a smaller beta (3, kad-dht's
default) suffices to reach the nodes that hold a value.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from kademlia.node import NodeHeap

from ._routing import Contact, target_node

__all__ = ["Lookup", "PeerState", "Termination"]


class PeerState(enum.Enum):
    HEARD = "heard"  # named by someone, not asked yet
    WAITING = "waiting"  # asked, no answer yet
    QUERIED = "queried"  # answered
    UNREACHABLE = "unreachable"  # failed, timed out or answered ERROR


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
    ) -> None:
        if not 1 <= beta <= k or alpha < 1:
            raise ValueError("a lookup needs alpha >= 1 and 1 <= beta <= k")
        self.target = target
        self.k, self.alpha, self.beta = k, alpha, beta
        self._self_id = self_id
        self._heap = NodeHeap(target_node(target), k)
        self._state: dict[bytes, PeerState] = {}
        self._hop: dict[bytes, int] = {}
        self.messages = 0  # queries handed out
        self.failures = 0
        self._add(seeds, hop=1)

    # -- events ---------------------------------------------------------------------

    def next_queries(self) -> list[Contact]:
        """HEARD peers to ask now (closest first), marked WAITING; empty when the
        alpha slots are busy, nothing useful is left, or the lookup is over."""
        if self.termination() is not None:
            return []
        free = self.alpha - self.waiting
        chosen: list[Contact] = []
        for contact in self._heap:  # the k closest not unreachable, nearest first
            if free <= 0:
                break
            if self._state[contact.id] is PeerState.HEARD:
                self._state[contact.id] = PeerState.WAITING
                chosen.append(contact)
                free -= 1
        self.messages += len(chosen)
        return chosen

    def on_response(self, peer_id: bytes, contacts: Iterable[Contact]) -> None:
        """``peer_id`` answered and named ``contacts``."""
        if self._state.get(peer_id) is not PeerState.WAITING:
            return
        self._state[peer_id] = PeerState.QUERIED
        self._add(contacts, hop=self._hop[peer_id] + 1)

    def on_failure(self, peer_id: bytes) -> None:
        """``peer_id`` could not be asked or gave no usable answer."""
        if self._state.get(peer_id) is not PeerState.WAITING:
            return
        self._state[peer_id] = PeerState.UNREACHABLE
        self._heap.remove([peer_id])
        self.failures += 1

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
            fresh.append(contact)
        if fresh:
            self._heap.push(fresh)
