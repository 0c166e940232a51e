"""Block selection and route planning (swarm/planning.py): pure, no trio."""

from __future__ import annotations

import hashlib

import pytest

from protocol import Announcement
from swarm.errors import NoRoute
from swarm.planning import (
    RouteCosts,
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
    with pytest.raises(ValueError, match="must be among the announcements"):
        should_rebalance([server("a", 0, 2)], peer_id=pid("zz"), num_blocks=4)


# --- route planning -------------------------------------------------------------------


def test_single_server_route():
    route = plan_route([server("a", 0, 8)], num_blocks=8)
    assert route.spans == [(0, 8)]
    assert route.hops[0].peer_id == pid("a")
    assert route.cost == pytest.approx(hop_cost(server("a", 0, 8), 0, 8))


def test_chain_over_adjacent_servers_and_sub_spans():
    servers = [server("a", 0, 5), server("b", 3, 8)]
    route = plan_route(servers, num_blocks=8)
    assert [h.peer_id for h in route.hops] == [pid("a"), pid("b")]
    assert route.spans[0][0] == 0
    assert route.spans[-1][1] == 8
    assert route.spans[0][1] == route.spans[1][0]
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
    assert route.spans == [(4, 8)]
    assert route.hops[0].peer_id == pid("c")
    with pytest.raises(ValueError, match=r"cannot route blocks \[5, 5\)"):
        plan_route(servers, num_blocks=8, start=5, end=5)
