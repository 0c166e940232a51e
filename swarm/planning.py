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

Route planning. Servers accept any sub-range [a, b) of their announced span in
OPEN_SESSION, so a route is a chain of hops (server, [a, b)) whose ranges tile the
requested blocks. A hop costs ``rtt + (b - a) / (throughput * span length) +
load``, with the measured RTT if known (else ``default_rtt``), and ``load`` =
``load_weight / free_sessions``, or ``busy_penalty`` for a server with no free
slot. The cheapest chain is the shortest path from boundary ``start`` to ``end``
in the DAG of block boundaries, computed by dynamic programming in boundary order
(edges only go forward, so this is Dijkstra without a heap) in O(blocks x
servers): for a hop on server s ending at j the best entry boundary i minimizes
``dist[i] - i * per_block_s``, kept as a running minimum per server. Banned and
excluded peers are skipped; a block nobody usable covers raises ``NoRoute``
naming the first such gap.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import NoRoute

__all__ = [
    "Hop",
    "Route",
    "RouteCosts",
    "ServerInfo",
    "block_throughputs",
    "choose_blocks",
    "hop_cost",
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
    """Parameters of the hop cost, in seconds."""

    default_rtt: float = 0.05  # for a server whose RTT was never measured
    load_weight: float = 0.01  # load = load_weight / free_sessions
    busy_penalty: float = 1.0  # a server with no free session slot (it would answer BUSY)
    min_throughput: float = 1e-3  # an unmeasured (0) throughput is treated as this

    def __post_init__(self) -> None:
        if min(self.default_rtt, self.load_weight, self.busy_penalty) < 0 or self.min_throughput <= 0:
            raise ValueError("route costs must be non-negative and min_throughput positive")


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


def _per_block(server: ServerInfo, costs: RouteCosts) -> float:
    length = max(server.span[1] - server.span[0], 1)
    return 1.0 / (max(server.throughput, costs.min_throughput) * length)


def _fixed(server: ServerInfo, rtt: float, costs: RouteCosts) -> float:
    load = costs.busy_penalty if server.free_sessions == 0 else costs.load_weight / server.free_sessions
    return rtt + load


def hop_cost(server: ServerInfo, start: int, end: int, *, rtt: float | None = None,
             costs: RouteCosts = RouteCosts()) -> float:
    """The cost in seconds of serving blocks [start, end) on ``server``."""
    rtt = costs.default_rtt if rtt is None else rtt
    return _fixed(server, rtt, costs) + (end - start) * _per_block(server, costs)


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
    """The cheapest chain of hops covering blocks [start, end) (default: the whole model).

    Raises:
        NoRoute: some block in [start, end) is served by no usable server; the error
            names the first maximal run of such blocks.
        ValueError: an empty or out-of-range block range.
    """
    end = num_blocks if end is None else end
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"cannot route blocks [{start}, {end}) of a model with {num_blocks} blocks")
    rtts = rtts or {}
    usable = []
    for server in servers:
        if server.peer_id in banned or server.peer_id in exclude:
            continue
        lo, hi = max(server.span[0], start), min(server.span[1], end)
        if lo < hi:
            usable.append((server, lo, hi, _fixed(server, rtts.get(server.peer_id, costs.default_rtt), costs),
                           _per_block(server, costs)))
    _raise_on_gap(usable, start, end, model)

    inf = float("inf")
    # dist[i]: (cost, hops) of the best chain from `start` to boundary i; back[i]: its last hop.
    dist: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    back: dict[int, tuple[int, int]] = {}  # boundary -> (entry boundary, server index)
    running: list[tuple[float, int, int]] = [(inf, 0, -1)] * len(usable)  # (dist - i*rate, hops, i)
    for i in range(start, end):
        here = dist.get(i)
        best: tuple[float, int, int, int] | None = None  # (cost, hops, server index, entry)
        for index, (server, lo, hi, fixed, rate) in enumerate(usable):
            if not lo <= i < hi:
                continue
            if here is not None:
                candidate = (here[0] - i * rate, here[1], i)
                if candidate < running[index]:
                    running[index] = candidate
            value, hop_count, entry = running[index]
            if entry < 0:
                continue
            option = (value + fixed + (i + 1) * rate, hop_count + 1, index, entry)
            if best is None or option[:2] < best[:2]:
                best = option
        if best is not None:
            dist[i + 1] = best[:2]
            back[i + 1] = (best[3], best[2])

    hops: list[Hop] = []
    j = end
    while j != start:
        i, index = back[j]
        server, _, _, fixed, rate = usable[index]
        hops.append(Hop(peer_id=server.peer_id, addrs=tuple(server.addrs), start=i, end=j,
                        cost=fixed + (j - i) * rate))
        j = i
    hops.reverse()
    return Route(hops=tuple(hops), cost=dist[end][0])


def _raise_on_gap(usable: list, start: int, end: int, model: str | None) -> None:
    covered = [False] * (end - start)
    for _, lo, hi, _, _ in usable:
        for b in range(lo, hi):
            covered[b - start] = True
    if all(covered):
        return
    gap_start = start + covered.index(False)
    gap_end = gap_start
    while gap_end < end and not covered[gap_end - start]:
        gap_end += 1
    raise NoRoute(gap_start, gap_end, model=model)
