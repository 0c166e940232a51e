"""Who may vote in an audit, and what the votes decide (spec 13.2, "Voters").

Theory of operation. Colluding holders of a span agree with each other, so an audit
that counts heads among holders picked by reputation order lets a cheater's friends
outvote an honest peer. Three rules here make that expensive:

1. *Distinct operators.* Voters are drawn among holders of pairwise distinct
   operators: the /24 (IPv4) or /64 (IPv6) network of the address a peer was reached
   at, and never the hop's or the client's. A peer reachable only at a loopback,
   private or link-local address (a local swarm, a LAN) is its own operator: its
   address says nothing about who runs it.
2. *Random, weighted by long-lived reputation.* Each draw picks a remaining
   candidate with probability proportional to ``Reputation.weight`` (fresh
   identities weigh ``FRESH_WEIGHT``, established ones up to 1), from an RNG the
   servers cannot predict, so a cheater cannot know or steer who checks it.
3. *Weighted vote.* ``tally`` groups the hop's and the voters' answers into clusters
   that agree (``verify._compare``) and weighs each cluster by its members' weights.
   A side wins only with a strict majority of all the weight and at least two
   members; so a handful of fresh identities cannot outvote one established peer.

A vote never bans anyone (spec 13.6): it only decides which output the client
trusts and whom it routes around. Bans need the client's own recomputation or a
fraud proof that the banning peer recomputed itself.

Pure code: no sockets, no clock.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["Ballot", "Tally", "VoteResult", "draw_voter", "operator_of", "tally"]


def operator_of(peer_id: bytes, address: str | None) -> str:
    """The operator key of ``peer_id`` reached at ``address`` (``host:port``, IPv6 in
    brackets); see rule 1 of the module docstring."""
    host = (address or "").rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "id:" + peer_id.hex()  # a name, or nothing: no network to group by
    if not ip.is_global:  # loopback, private, link-local, documentation, shared address space
        return "id:" + peer_id.hex()
    if ip.version == 4:
        return "v4:" + str(ipaddress.ip_network(f"{ip}/24", strict=False))
    return "v6:" + str(ipaddress.ip_network(f"{ip}/64", strict=False))


def draw_voter(candidates: Sequence[tuple[bytes, str]], weight: Callable[[bytes], float], used: set[str],
               rng: random.Random) -> int | None:
    """The index of a candidate ``(peer id, operator)`` drawn with probability
    proportional to ``weight`` among those whose operator is not in ``used`` (and
    whose weight is positive), or None if there is none."""
    open_ = [(i, weight(p)) for i, (p, op) in enumerate(candidates) if op not in used]
    open_ = [(i, w) for i, w in open_ if w > 0]
    if not open_:
        return None
    total = sum(w for _, w in open_)
    x = rng.random() * total
    for i, w in open_:
        x -= w
        if x < 0:
            return i
    return open_[-1][0]


@dataclass(frozen=True, slots=True)
class Ballot:
    """One answer in a vote: who gave it, its weight, and whether it is the hop's."""

    peer_id: bytes
    weight: float
    is_hop: bool = False


class VoteResult(Enum):
    HOP_WINS = "hop-wins"  # the hop's output is confirmed by a weighted majority
    HOP_LOSES = "hop-loses"  # another output has a weighted majority
    NO_MAJORITY = "no-majority"


@dataclass(frozen=True, slots=True)
class Tally:
    result: VoteResult
    winners: tuple[bytes, ...]  # members of the winning cluster (empty without a majority)
    losers: tuple[bytes, ...]  # everyone else who answered
    weights: tuple[float, ...]  # weight of each cluster, heaviest first
    clusters: tuple[tuple[int, ...], ...] = ()  # ballot indices of each group that agrees


def tally(ballots: Sequence[Ballot], agree: Callable[[int, int], bool]) -> Tally:
    """The weighted vote over ``ballots`` (exactly one is the hop's); ``agree(i, j)``
    says whether answers ``i`` and ``j`` agree. See rule 3 of the module docstring."""
    clusters: list[list[int]] = []
    for i in range(len(ballots)):
        for cluster in clusters:
            if agree(cluster[0], i):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    weights = [sum(ballots[i].weight for i in c) for c in clusters]
    total = sum(weights)
    order = sorted(range(len(clusters)), key=lambda c: -weights[c])
    best = order[0]
    everyone = [b.peer_id for b in ballots]
    groups = tuple(tuple(c) for c in clusters)
    if len(clusters[best]) < 2 or not weights[best] > total / 2:
        return Tally(result=VoteResult.NO_MAJORITY, winners=(), losers=tuple(everyone),
                     weights=tuple(weights[c] for c in order), clusters=groups)
    winners = tuple(ballots[i].peer_id for i in clusters[best])
    losers = tuple(p for p in everyone if p not in winners)
    hop_wins = any(ballots[i].is_hop for i in clusters[best])
    return Tally(result=VoteResult.HOP_WINS if hop_wins else VoteResult.HOP_LOSES, winners=winners, losers=losers,
                 weights=tuple(weights[c] for c in order), clusters=groups)
