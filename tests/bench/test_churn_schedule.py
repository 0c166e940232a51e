"""bench/churn.py's fault schedule: reproducible from its seed, and a churn or stop
fault never leaves a block without a live replica (restarts count as down while they
load); an outage takes down exactly the servers of one block."""

from __future__ import annotations

import random

import pytest

from bench.churn import LAYERS, LAYOUTS, RESTART, SPANS, covered, schedule


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", range(20))
def test_churn_and_stop_keep_every_block_served(seed, layout):
    spans = LAYOUTS[layout]
    for kind in ("churn", "stop"):
        faults = schedule(kind, random.Random(seed), 120.0, spans)
        assert faults == schedule(kind, random.Random(seed), 120.0, spans)
        assert faults
        assert all(0 < f.at < 120.0 for f in faults)
        if kind == "churn":  # both kinds of kill in every run, whatever the seed
            assert {f.kind for f in faults} == {"kill", "term"}
        for f in faults:
            margin = RESTART if f.kind != "stop" else 0.0
            down = {i for g in faults if g.at <= f.at < g.at + g.duration + margin for i in g.servers}
            assert covered(spans, set(range(len(spans))) - down)


def test_a_lone_widest_span_is_stopped_first():
    """mixed: every client routes through its one 0:6 server, so the stop scenario hits a
    server in use at once; tiles has no such server and stops them in a seeded order."""
    mixed = LAYOUTS["mixed"]
    for seed in range(20):
        assert schedule("stop", random.Random(seed), 120.0, mixed)[0].servers == (mixed.index((0, 6)),)
    firsts = {schedule("stop", random.Random(seed), 120.0, SPANS)[0].servers for seed in range(20)}
    assert len(firsts) > 1


def test_an_outage_takes_one_block_down_and_unknown_scenarios_are_refused():
    (fault,) = schedule("outage", random.Random(3), 60.0)
    assert not covered(SPANS, set(range(len(SPANS))) - set(fault.servers), LAYERS)
    assert covered(SPANS, set(range(len(SPANS))) - set(fault.servers[:-1]), LAYERS)
    assert schedule("baseline", random.Random(3), 60.0) == []
    with pytest.raises(ValueError, match="unknown scenario 'meteor'"):
        schedule("meteor", random.Random(3), 60.0)


@pytest.mark.parametrize("seed", range(5))
def test_loads_start_a_server_where_churn_restarts_one(seed):
    """The loads control: churn's draw, a server of the faulted one's span started at
    each restart time, and no fault at all."""
    churn = schedule("churn", random.Random(seed), 120.0)
    loads = schedule("loads", random.Random(seed), 120.0)
    assert [(f.at, f.kind, f.servers) for f in loads] == [(c.at + c.duration, "load", c.servers) for c in churn]
