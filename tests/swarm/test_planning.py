"""Block selection and route planning (swarm/planning.py): pure, no trio."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from protocol import Announcement, NextPing
from swarm.errors import NoRoute
from swarm.planning import (
    Candidate,
    RouteCosts,
    announced_block_seconds,
    make_candidates,
    plan_candidates,
    block_throughputs,
    choose_blocks,
    hop_cost,
    plan_route,
    should_rebalance,
)


def pid(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=20).digest()


def server(name, start, end, throughput=10.0, free=4):
    return Announcement(peer_id=pid(name), addrs=(f"10.0.0.1:{1000 + len(name)}",), model="m", span=(start, end),
                        throughput=throughput, free_sessions=free, expires=2_000_000_000)


# --- block selection ------------------------------------------------------------------


def test_throughputs_sum_covering_servers_and_clip():
    servers = [server("a", 0, 4, 5.0), server("b", 2, 6, 1.0), server("c", 5, 99, 2.0)]
    assert block_throughputs(servers, 8) == [5, 5, 6, 6, 1, 3, 2, 2]
    assert block_throughputs(servers, 8, exclude=pid("a")) == [0, 0, 1, 1, 1, 3, 2, 2]


def test_empty_swarm_starts_at_zero_and_big_server_takes_all():
    assert choose_blocks([], num_blocks=10, span_length=4) == (0, 4)
    assert choose_blocks([server("a", 0, 3)], num_blocks=10, span_length=12) == (0, 10)


def test_joiner_takes_the_gap():
    servers = [server("a", 0, 4), server("b", 7, 10)]
    assert choose_blocks(servers, num_blocks=10, span_length=3) == (4, 7)
    # a window of 2 fits inside the gap: the lowest start wins the tie
    assert choose_blocks(servers, num_blocks=10, span_length=2) == (4, 6)


def test_joiner_covers_the_weakest_blocks_with_uneven_throughputs():
    # everything covered, but blocks 6..7 only by a slow server
    servers = [server("fast", 0, 6, 100.0), server("slow", 6, 8, 1.0), server("mid", 5, 8, 20.0)]
    # per block: [100]*5 + [120, 21, 21]
    assert choose_blocks(servers, num_blocks=8, span_length=2) == (6, 8)
    # a span of 4 must hold blocks 6 and 7; among [4,8) the sorted window is smallest
    assert choose_blocks(servers, num_blocks=8, span_length=4) == (4, 8)


def test_rebalance_when_a_move_raises_the_bottleneck():
    # two servers on [0, 4), nobody on [4, 8): the second should move
    servers = [server("a", 0, 4), server("b", 0, 4)]
    assert should_rebalance(servers, peer_id=pid("b"), num_blocks=8)
    assert choose_blocks(servers, num_blocks=8, span_length=4, exclude=pid("b")) == (4, 8)


def test_no_rebalance_when_balanced_or_when_it_would_open_a_gap():
    balanced = [server("a", 0, 4), server("b", 4, 8)]
    assert not should_rebalance(balanced, peer_id=pid("a"), num_blocks=8)
    # b alone covers [4, 8): moving it anywhere leaves blocks unserved
    gap = [server("a", 0, 4), server("a2", 0, 4), server("b", 4, 8)]
    assert not should_rebalance(gap, peer_id=pid("b"), num_blocks=8)
    assert should_rebalance(gap, peer_id=pid("a2"), num_blocks=8) is False  # [4,8) would get 2x, [0,4) 1x: same min


def test_rebalance_threshold_is_a_ratio():
    # blocks 4..8 at 10 (c), 0..4 at 10 (a) + 4 (b, the mover): current min 10
    servers = [server("a", 0, 4, 10.0), server("b", 0, 4, 4.0), server("c", 4, 8, 10.0)]
    # moving b to [4,8): min becomes 10 (block 0..3 keep a): no gain
    assert not should_rebalance(servers, peer_id=pid("b"), num_blocks=8)
    weak = [server("a", 0, 4, 10.0), server("b", 0, 4, 10.0), server("c", 4, 8, 1.0)]
    # moving b gives min 10 vs 1 now: move
    assert should_rebalance(weak, peer_id=pid("b"), num_blocks=8)
    slight = [server("a", 0, 4, 10.0), server("b", 0, 4, 2.0), server("c", 4, 8, 9.0)]
    # moving b: min(10, 11) = 10 vs 9 now, a gain of 1.11x < 1/0.75: stay
    assert not should_rebalance(slight, peer_id=pid("b"), num_blocks=8)
    assert should_rebalance(slight, peer_id=pid("b"), num_blocks=8, balance_quality=0.95)


def test_rebalance_requires_the_server_itself():
    with pytest.raises(ValueError):
        should_rebalance([server("a", 0, 2)], peer_id=pid("zz"), num_blocks=4)


# --- route planning -------------------------------------------------------------------


def test_single_server_route():
    route = plan_route([server("a", 0, 8)], num_blocks=8)
    assert route.spans == [(0, 8)] and route.hops[0].peer_id == pid("a")
    assert route.cost == pytest.approx(hop_cost(server("a", 0, 8), 0, 8))


def test_chain_over_adjacent_servers_and_sub_spans():
    servers = [server("a", 0, 5), server("b", 3, 8)]
    route = plan_route(servers, num_blocks=8)
    assert [h.peer_id for h in route.hops] == [pid("a"), pid("b")]
    assert route.spans[0][0] == 0 and route.spans[-1][1] == 8 and route.spans[0][1] == route.spans[1][0]
    assert 3 <= route.spans[0][1] <= 5


def test_fewer_hops_win_when_rtt_dominates():
    servers = [server("x", 0, 4), server("y", 4, 8), server("all", 0, 8, throughput=10.0)]
    route = plan_route(servers, num_blocks=8, rtts={pid("x"): 0.05, pid("y"): 0.05, pid("all"): 0.05})
    assert route.spans == [(0, 8)]


def test_fast_servers_beat_a_slow_whole_model_server():
    servers = [server("x", 0, 4, 1000.0), server("y", 4, 8, 1000.0), server("slow", 0, 8, throughput=0.5)]
    route = plan_route(servers, num_blocks=8, rtts={pid("x"): 0.001, pid("y"): 0.001})
    assert [h.peer_id for h in route.hops] == [pid("x"), pid("y")]
    # the cost is the sum of the hops' costs
    assert route.cost == pytest.approx(sum(h.cost for h in route.hops))


def test_measured_rtt_and_load_steer_the_choice():
    a, b = server("a", 0, 8), server("b", 0, 8)
    assert plan_route([a, b], num_blocks=8, rtts={pid("a"): 0.2, pid("b"): 0.01}).hops[0].peer_id == pid("b")
    busy, idle = server("busy", 0, 8, free=0), server("idle", 0, 8, free=1)
    assert plan_route([busy, idle], num_blocks=8).hops[0].peer_id == pid("idle")
    # a full server is still used when it is the only one
    assert plan_route([busy], num_blocks=8).hops[0].peer_id == pid("busy")
    assert hop_cost(busy, 0, 8) - hop_cost(idle, 0, 8) == pytest.approx(RouteCosts().busy_penalty - 0.01)


def test_route_is_optimal_against_brute_force():
    import itertools
    import random

    rng = random.Random(5)
    for _ in range(30):
        n = rng.randint(2, 7)
        servers = []
        for i in range(rng.randint(1, 5)):
            s = rng.randrange(n)
            servers.append(server(f"s{i}", s, rng.randint(s + 1, n), rng.uniform(0.5, 50), rng.randint(0, 3)))
        rtts = {s.peer_id: rng.uniform(0.001, 0.1) for s in servers if rng.random() < 0.7}
        try:
            route = plan_route(servers, num_blocks=n, rtts=rtts)
        except NoRoute:
            assert any(not any(s.span[0] <= b < s.span[1] for s in servers) for b in range(n))
            continue
        # brute force: every tiling of [0, n) into hops, each hop on its cheapest server
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            total = 0.0
            for lo, hi in zip(bounds, bounds[1:]):
                options = [hop_cost(s, lo, hi, rtt=rtts.get(s.peer_id)) for s in servers
                           if s.span[0] <= lo and hi <= s.span[1]]
                if not options:
                    total = float("inf")
                    break
                total += min(options)
            best = min(best, total)
        assert route.cost == pytest.approx(best)


def test_banned_and_excluded_peers_are_skipped():
    servers = [server("a", 0, 8, 1000.0), server("b", 0, 4), server("c", 4, 8)]
    assert plan_route(servers, num_blocks=8).spans == [(0, 8)]
    for kwargs in ({"banned": {pid("a")}}, {"exclude": {pid("a")}}):
        route = plan_route(servers, num_blocks=8, **kwargs)
        assert [h.peer_id for h in route.hops] == [pid("b"), pid("c")]


def test_no_route_names_the_first_gap():
    servers = [server("a", 0, 3), server("b", 5, 6), server("c", 8, 10)]
    with pytest.raises(NoRoute) as info:
        plan_route(servers, num_blocks=10, model="m")
    assert (info.value.start, info.value.end) == (3, 5)
    assert "no route: blocks 3..4" in str(info.value)
    # excluding the only server of a span opens a gap there
    with pytest.raises(NoRoute, match="blocks 0..3"):
        plan_route([server("a", 0, 4), server("b", 4, 8)], num_blocks=8, exclude={pid("a")})
    with pytest.raises(NoRoute, match="blocks 0..7"):
        plan_route([], num_blocks=8)


def test_partial_range_for_failover():
    servers = [server("a", 0, 4), server("b", 2, 8), server("c", 4, 8)]
    route = plan_route(servers, num_blocks=8, start=4, end=8, exclude={pid("b")})
    assert route.spans == [(4, 8)] and route.hops[0].peer_id == pid("c")
    with pytest.raises(ValueError):
        plan_route(servers, num_blocks=8, start=5, end=5)


# --- measured facts and latency (issue 10 item 7, issue 14 section 2) ------------------


def cand(name, start, end, *, rtt=0.01, block_seconds=0.001, extra=0.0, next_rtts=None):
    return Candidate(peer_id=pid(name), addrs=(f"10.0.0.1:{len(name)}",), start=start, end=end,
                     block_seconds=block_seconds, rtt=rtt, extra=extra, next_rtts=next_rtts or {})


def test_claimed_throughput_is_clamped_by_a_sane_maximum_and_by_measurement():
    honest = server("honest", 0, 4, throughput=50.0)
    liar = server("liar", 0, 4, throughput=1e300, free=2**32)
    costs = RouteCosts()
    assert announced_block_seconds(liar, costs) == costs.min_block_seconds
    # unmeasured, the liar is still attractive (it is probed before use, see peer.client) ...
    assert plan_route([honest, liar], num_blocks=4).hops[0].peer_id == pid("liar")
    # ... measured, it is as slow as it really is
    measured = {pid("liar"): 10.0, pid("honest"): 0.001}
    candidates = make_candidates([honest, liar], measured=measured)
    assert plan_candidates(candidates, num_blocks=4).hops[0].peer_id == pid("honest")
    # a measurement never makes a server faster than it claims
    slow_claim = server("modest", 0, 4, throughput=1.0)
    (c,) = make_candidates([slow_claim], measured={pid("modest"): 1e-6})
    assert c.block_seconds == pytest.approx(1 / 4)


def test_a_server_is_routed_only_for_the_blocks_it_published():
    """A record under block 0 claiming span 0:4 does not make the client route 1:4 through it."""
    claimer = server("claimer", 0, 4, throughput=1e6)
    others = [server("b", 0, 4)]
    routable = {pid("claimer"): [(0, 1)], pid("b"): [(0, 4)]}
    candidates = make_candidates([claimer, *others], routable=lambda a: routable[a.peer_id])
    route = plan_candidates(candidates, num_blocks=4)
    assert all(h.peer_id != pid("claimer") or h.span == (0, 1) for h in route.hops)
    with pytest.raises(NoRoute, match="blocks 1..3"):
        plan_candidates(candidates, num_blocks=4, exclude={pid("b")})


def test_star_cost_sums_the_clients_round_trips():
    """A client in Tokyo: near replicas win although the far ones compute faster."""
    near = [cand("t0", 0, 2, rtt=0.003, block_seconds=0.01), cand("t1", 2, 4, rtt=0.003, block_seconds=0.01)]
    far = [cand("v0", 0, 2, rtt=0.150, block_seconds=0.001), cand("v1", 2, 4, rtt=0.150, block_seconds=0.001)]
    route = plan_candidates(near + far, num_blocks=4)
    assert [h.peer_id for h in route.hops] == [pid("t0"), pid("t1")]
    assert route.cost == pytest.approx(2 * 0.003 + 4 * 0.01)
    # blind to latency (every server at the default RTT), the faster far servers win
    blind = [dataclasses.replace(c, rtt=RouteCosts().default_rtt) for c in near + far]
    assert [h.peer_id for h in plan_candidates(blind, num_blocks=4).hops] == [pid("v0"), pid("v1")]


def test_push_cost_uses_the_servers_next_pings():
    """Push relay: client -> first, server -> server (announced next_pings), last -> client."""
    push = RouteCosts(relay="push")
    a = cand("a", 0, 2, rtt=0.100, next_rtts={pid("b"): 0.002, pid("c"): 0.300})
    b = cand("b", 2, 4, rtt=0.100)
    c = cand("c", 2, 4, rtt=0.050)
    route = plan_candidates([a, b, c], num_blocks=4, costs=push)
    # via c: 0.05 + 0.15 + 0.025 (one way each) ; via b: 0.05 + 0.001 + 0.05
    assert [h.peer_id for h in route.hops] == [pid("a"), pid("b")]
    assert route.cost == pytest.approx(0.050 + 0.001 + 0.050 + 4 * 0.001)
    # star ignores server -> server links: the client's nearer c wins
    assert [h.peer_id for h in plan_candidates([a, b, c], num_blocks=4).hops] == [pid("a"), pid("c")]
    # an unmeasured link counts as going through the client
    d = cand("d", 2, 4, rtt=0.010)
    route = plan_candidates([a, d], num_blocks=4, costs=push)
    assert route.cost == pytest.approx(0.050 + (0.100 + 0.010) / 2 + 0.005 + 4 * 0.001)


def test_push_route_is_optimal_against_brute_force():
    import itertools
    import random

    rng = random.Random(7)
    push = RouteCosts(relay="push")
    for _ in range(40):
        n = rng.randint(2, 6)
        names = [f"s{i}" for i in range(rng.randint(1, 5))]
        cands = []
        for name in names:
            s = rng.randrange(n)
            nxt = {pid(o): rng.uniform(0.001, 0.2) for o in names if o != name and rng.random() < 0.6}
            cands.append(cand(name, s, rng.randint(s + 1, n), rtt=rng.uniform(0.001, 0.2),
                              block_seconds=rng.uniform(0.001, 0.05), extra=rng.uniform(0, 0.01), next_rtts=nxt))
        try:
            route = plan_candidates(cands, num_blocks=n, costs=push)
        except NoRoute:
            continue
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            pieces = list(zip(bounds, bounds[1:]))
            options = [[c for c in cands if c.start <= lo and hi <= c.end] for lo, hi in pieces]
            for chosen in itertools.product(*options):
                if any(x.peer_id == y.peer_id for x, y in zip(chosen, chosen[1:])):
                    continue
                total = chosen[0].rtt / 2 + chosen[-1].rtt / 2
                for (lo, hi), c in zip(pieces, chosen):
                    total += (hi - lo) * c.block_seconds + c.extra
                for x, y in zip(chosen, chosen[1:]):
                    link = x.next_rtts.get(y.peer_id)
                    total += (link if link is not None else x.rtt + y.rtt) / 2
                best = min(best, total)
        assert route.cost == pytest.approx(best)


def test_next_pings_reach_candidates_from_announcements():
    ann = dataclasses.replace(server("a", 0, 2), next_pings=(NextPing(peer_id=pid("b"), rtt=0.004),))
    (c,) = make_candidates([ann])
    assert c.next_rtts == {pid("b"): 0.004}
