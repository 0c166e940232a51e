"""Block selection for servers and route planning for clients: pure functions
(spec "Routing"; DESIGN.md "DHT and announcements", "Routing and sessions").

Inputs are announcements (anything with ``peer_id``, ``addrs``, ``span``,
``throughput``, ``free_sessions``); spans are clipped to the model's ``[0, L)``.
``throughput`` is what a server announces: tokens/s through its whole span, so each
block of the span gets that many tokens/s of capacity and one block costs
``1 / (throughput * span length)`` seconds per token.

Block selection (Petals' rule). The swarm's throughput at block b is the sum of the
throughputs of the servers covering b. A joining server of capacity n blocks takes
the window [s, s+n) whose per-block throughputs, sorted ascending, are smallest
lexicographically: the window holding the weakest block, ties broken by the next
weakest, then by the lowest start. Rebalancing: a server removes its own
contribution, finds the best window as if joining, and moves only if the swarm's
minimum per-block throughput after the move exceeds the current minimum by more
than ``1 / balance_quality`` (0.75, as in Petals: a move must raise the bottleneck
by a third), and never if it would leave a block unserved. Unlike Petals we do
not simulate the other servers' moves; each server decides for itself.

Route planning (spec section 10, "Routing"). Servers accept any sub-range [a, b) of
their announced span in OPEN_SESSION, so a route is a chain of hops (server, [a, b))
whose ranges tile the requested blocks. The planner works on ``Candidate``s: a
server, the blocks it may be routed for (those it published records for itself, not
what its record under another block claims), its compute per block per token (the
announced throughput clamped by what the client measured and by a sane maximum,
``RouteCosts.min_block_seconds``), the client's RTT to it (``default_rtt`` if never
measured), its load (``load_weight / free_sessions``, ``busy_penalty`` with no free
slot) plus any reputation penalty, and the RTTs it measured to servers of the
following blocks (``next_pings``). A route costs its latency plus, per hop, compute
``(b - a) * block_seconds`` and load:

- star relay (the client sends every hop its input): the sum of the client's RTTs to
  the hops;
- push relay (each hop forwards to the next): client -> first hop, each server ->
  next server, last hop -> client, one way each (half an RTT; a server -> server
  link nobody measured counts as going through the client).

The cheapest chain is a shortest path over states (block boundary, last candidate),
computed in boundary order (edges only go forward, so Dijkstra without a heap): for a
hop on candidate c ending at j the best entry boundary i minimizes ``cost(i, prev) +
latency(prev, c) - i * block_seconds(c)``, kept as a running minimum per candidate,
so the work is O(blocks x covering candidates^2). Ties go to fewer hops. Banned and
excluded peers are skipped; a block nobody usable covers raises ``NoRoute`` naming
the first such gap.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from .errors import NoRoute

__all__ = [
    "Candidate",
    "Hop",
    "Route",
    "RouteCosts",
    "ServerInfo",
    "block_throughputs",
    "choose_blocks",
    "announced_block_seconds",
    "hop_cost",
    "make_candidates",
    "plan_candidates",
    "plan_route",
    "should_rebalance",
]

BALANCE_QUALITY = 0.75
_ROUND = 9  # digits kept when comparing throughput sums (float sums differ by order)


class ServerInfo(Protocol):
    peer_id: bytes
    addrs: tuple[str, ...]
    span: tuple[int, int]
    throughput: float
    free_sessions: int


S = TypeVar("S", bound=ServerInfo)  # one kind of server record, passed through to a callback


def _clip(span: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    return max(span[0], 0), min(span[1], num_blocks)


# --- block selection ----------------------------------------------------------------


def block_throughputs(
    servers: Iterable[ServerInfo], num_blocks: int, *, exclude: bytes | None = None
) -> list[float]:
    """Per block, the sum of the throughputs of the servers covering it."""
    totals = [0.0] * num_blocks
    for server in servers:
        if server.peer_id == exclude:
            continue
        start, end = _clip(server.span, num_blocks)
        for b in range(start, end):
            totals[b] += server.throughput
    return totals


def _best_start(totals: Sequence[float], length: int, prefer: int | None = None) -> int:
    """Petals' window rule; on a tie ``prefer`` wins, then the lowest start."""
    def key(start: int) -> tuple[list[float], int, int]:
        window = sorted(round(t, _ROUND) for t in totals[start : start + length])
        return window, 0 if start == prefer else 1, start

    return min(range(len(totals) - length + 1), key=key)


def choose_blocks(
    servers: Iterable[ServerInfo], *, num_blocks: int, span_length: int, exclude: bytes | None = None
) -> tuple[int, int]:
    """The span ``[s, s + span_length)`` a joining server should serve.

    ``exclude`` leaves one server (usually the caller) out of the swarm's throughput.
    A server that can hold the whole model serves all of it.
    """
    if num_blocks < 1 or span_length < 1:
        raise ValueError("a model has at least one block and a server holds at least one")
    if span_length >= num_blocks:
        return 0, num_blocks
    start = _best_start(block_throughputs(servers, num_blocks, exclude=exclude), span_length)
    return start, start + span_length


def should_rebalance(
    servers: Iterable[ServerInfo], *, peer_id: bytes, num_blocks: int, balance_quality: float = BALANCE_QUALITY
) -> bool:
    """Whether the server ``peer_id`` (which must be among ``servers``) should move its span.

    True when moving it to the best window for its span length would raise the swarm's
    weakest per-block throughput by more than a factor ``1 / balance_quality``.
    """
    servers = list(servers)
    own = next((s for s in servers if s.peer_id == peer_id), None)
    if own is None:
        raise ValueError("the rebalancing server must be among the announcements")
    start, end = _clip(own.span, num_blocks)
    length = end - start
    if length <= 0 or length >= num_blocks:
        return False
    current = block_throughputs(servers, num_blocks)
    others = block_throughputs(servers, num_blocks, exclude=peer_id)
    new_start = _best_start(others, length, prefer=start)
    if new_start == start:
        return False
    moved = list(others)
    for b in range(new_start, new_start + length):
        moved[b] += own.throughput
    before, after = min(current), min(moved)
    if round(after, _ROUND) <= 0:
        return False
    return before < after * balance_quality


# --- route planning -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteCosts:
    """Parameters of the route cost, in seconds.

    ``relay`` is how a token travels: ``"star"`` (the client sends each hop's input
    and receives its output: one client round trip per hop) or ``"push"`` (each hop
    forwards to the next: client -> first hop, server -> server, last hop -> client).
    ``min_block_seconds`` is the sane maximum of any throughput: no server is planned
    faster than one block-token in this many seconds (10,000 tokens/s per block),
    whatever it announces.
    """

    default_rtt: float = 0.05  # for a server whose RTT was never measured
    load_weight: float = 0.01  # load = load_weight / free_sessions
    busy_penalty: float = 1.0  # a server with no free session slot (it would answer BUSY)
    min_throughput: float = 1e-3  # an unmeasured (0) throughput is treated as this
    min_block_seconds: float = 1e-4
    relay: str = "star"

    def __post_init__(self) -> None:
        if min(self.default_rtt, self.load_weight, self.busy_penalty, self.min_block_seconds) < 0 \
                or self.min_throughput <= 0:
            raise ValueError("route costs must be non-negative and min_throughput positive")
        if self.relay not in ("star", "push"):
            raise ValueError(f"relay is 'star' or 'push', not {self.relay!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A server as the planner sees it: the blocks it may be routed for and its costs.

    ``block_seconds`` is compute per block per token (announced, clamped by what the
    client measured and by ``RouteCosts.min_block_seconds``); ``rtt`` the client's
    round trip to it; ``extra`` seconds of load and reputation penalty per hop;
    ``next_rtts`` the round trips it measured to servers of the following blocks.
    """

    peer_id: bytes
    addrs: tuple[str, ...]
    start: int
    end: int
    block_seconds: float
    rtt: float
    extra: float = 0.0
    next_rtts: Mapping[bytes, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hop:
    peer_id: bytes
    addrs: tuple[str, ...]
    start: int
    end: int
    cost: float

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    hops: tuple[Hop, ...]
    cost: float

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [h.span for h in self.hops]


def announced_block_seconds(server: ServerInfo, costs: RouteCosts = RouteCosts()) -> float:
    """Compute per block per token as ``server`` announces it, within the sane maximum."""
    length = max(server.span[1] - server.span[0], 1)
    return max(1.0 / (max(server.throughput, costs.min_throughput) * length), costs.min_block_seconds)


def _load(server: ServerInfo, costs: RouteCosts) -> float:
    return costs.busy_penalty if server.free_sessions == 0 else costs.load_weight / server.free_sessions


def hop_cost(server: ServerInfo, start: int, end: int, *, rtt: float | None = None,
             costs: RouteCosts = RouteCosts()) -> float:
    """The star-relay cost in seconds of serving blocks [start, end) on ``server``."""
    rtt = costs.default_rtt if rtt is None else rtt
    return rtt + _load(server, costs) + (end - start) * announced_block_seconds(server, costs)


def make_candidates(
    servers: Iterable[S],
    *,
    rtts: Mapping[bytes, float] | None = None,
    measured: Mapping[bytes, float] | None = None,
    penalties: Mapping[bytes, float] | None = None,
    routable: Callable[[S], Iterable[tuple[int, int]]] | None = None,
    costs: RouteCosts = RouteCosts(),
) -> list[Candidate]:
    """Candidates from announcements.

    Args:
        rtts: measured client round trips (``costs.default_rtt`` where missing).
        measured: compute per block per token this client measured; the planner takes
            the slower of it and the announced figure.
        penalties: extra seconds per hop (reputation).
        routable: the block ranges each server may be routed for (default its span):
            those it published records for itself.
    """
    rtts, measured, penalties = rtts or {}, measured or {}, penalties or {}
    out = []
    for server in servers:
        seconds = max(announced_block_seconds(server, costs), measured.get(server.peer_id, 0.0))
        next_rtts = {p.peer_id: p.rtt for p in (getattr(server, "next_pings", None) or ())}
        for lo, hi in (routable(server) if routable is not None else [server.span]):
            out.append(Candidate(peer_id=server.peer_id, addrs=tuple(server.addrs), start=lo, end=hi,
                                 block_seconds=seconds, rtt=rtts.get(server.peer_id, costs.default_rtt),
                                 extra=_load(server, costs) + penalties.get(server.peer_id, 0.0),
                                 next_rtts=next_rtts))
    return out


def plan_route(
    servers: Iterable[ServerInfo],
    *,
    num_blocks: int,
    start: int = 0,
    end: int | None = None,
    rtts: Mapping[bytes, float] | None = None,
    banned: Collection[bytes] = (),
    exclude: Collection[bytes] = (),
    costs: RouteCosts = RouteCosts(),
    model: str | None = None,
) -> Route:
    """The cheapest chain of hops covering blocks [start, end) (default: the whole
    model), from announcements alone; see ``plan_candidates``."""
    return plan_candidates(make_candidates(servers, rtts=rtts, costs=costs), num_blocks=num_blocks, start=start,
                           end=end, banned=banned, exclude=exclude, costs=costs, model=model)


def plan_candidates(
    candidates: Iterable[Candidate],
    *,
    num_blocks: int,
    start: int = 0,
    end: int | None = None,
    banned: Collection[bytes] = (),
    exclude: Collection[bytes] = (),
    costs: RouteCosts = RouteCosts(),
    model: str | None = None,
) -> Route:
    """The cheapest chain of hops covering blocks [start, end).

    A route costs its latency (``costs.relay``: star or push, module docstring) plus,
    per hop, compute ``(b - a) * block_seconds`` and ``extra``. Banned and excluded
    peers are skipped.

    Raises:
        NoRoute: some block in [start, end) is covered by no usable candidate; the error
            names the first maximal run of such blocks.
        ValueError: an empty or out-of-range block range.
    """
    end = num_blocks if end is None else end
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"cannot route blocks [{start}, {end}) of a model with {num_blocks} blocks")
    usable = []
    for c in candidates:
        if c.peer_id in banned or c.peer_id in exclude:
            continue
        lo, hi = max(c.start, start), min(c.end, end)
        if lo < hi:
            usable.append((c, lo, hi))
    _raise_on_gap(usable, start, end, model)
    push = costs.relay == "push"

    def entry(prev: Candidate | None, c: Candidate) -> float:
        """Latency of the leg that brings a token to ``c``."""
        if not push:
            return c.rtt  # star: every hop is a round trip from the client
        if prev is None:
            return c.rtt / 2
        link = prev.next_rtts.get(c.peer_id)
        # A link nobody measured is taken as no better than going through the client.
        return (link if link is not None else prev.rtt + c.rtt) / 2

    inf = float("inf")
    # best[i]: {candidate index or -1 (the start): (cost, hops, entry boundary, previous index)}
    # for chains from `start` to boundary i whose last hop is that candidate.
    best: dict[int, dict[int, tuple[float, int, int, int]]] = {start: {-1: (0.0, 0, start, -1)}}
    # running[k]: the best (cost - i * block_seconds, hops, entry i, previous) over entries so far.
    running: list[tuple[float, int, int, int]] = [(inf, 0, -1, -1)] * len(usable)
    for i in range(start, end):
        here = best.get(i, {})
        closing: dict[int, tuple[float, int, int, int]] = {}
        for k, (c, lo, hi) in enumerate(usable):
            if not lo <= i < hi:
                continue
            for p, (cost, hops, _, _) in here.items():
                if p == k or (p >= 0 and usable[p][0].peer_id == c.peer_id):
                    continue
                prev = usable[p][0] if p >= 0 else None
                option = (cost + entry(prev, c) + c.extra - i * c.block_seconds, hops + 1, i, p)
                if option[:2] < running[k][:2]:
                    running[k] = option
            value, hops, entry_i, p = running[k]
            if entry_i >= 0:
                closing[k] = (value + (i + 1) * c.block_seconds, hops, entry_i, p)
        if closing:
            best[i + 1] = closing

    finals = best.get(end, {})
    exit_cost = (lambda c: c.rtt / 2) if push else (lambda c: 0.0)
    k, (cost, _, _, _) = min(((k, v) for k, v in finals.items()),
                             key=lambda kv: (kv[1][0] + exit_cost(usable[kv[0]][0]), kv[1][1]))
    total = cost + exit_cost(usable[k][0])
    chosen: list[Hop] = []
    j = end
    while k >= 0:
        cost_j, _, i, p = best[j][k]
        c = usable[k][0]
        before = best[i][p][0]
        chosen.append(Hop(peer_id=c.peer_id, addrs=c.addrs, start=i, end=j, cost=cost_j - before))
        j, k = i, p
    chosen.reverse()
    return Route(hops=tuple(chosen), cost=total)


def _raise_on_gap(usable: list, start: int, end: int, model: str | None) -> None:
    covered = [False] * (end - start)
    for _, lo, hi in usable:
        for b in range(lo, hi):
            covered[b - start] = True
    if all(covered):
        return
    gap_start = start + covered.index(False)
    gap_end = gap_start
    while gap_end < end and not covered[gap_end - start]:
        gap_end += 1
    raise NoRoute(gap_start, gap_end, model=model)
