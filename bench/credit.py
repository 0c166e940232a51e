"""Simulated swarm under bursty load: does credit buy contributors shorter waits?

Pure code, no sockets, simulated time. 56 peers:

- 20 contributors: each serves (one compute slot, 50 ms per step) and also generates;
- 20 free-riders: generate only;
- a Sybil cluster: 10 fake identities signing huge receipts for each other and for an
  attacker (11 requesters in all), none of which ever served an honest peer;
- 5 newcomers that join a third of the way into the run, with no history.

History: before the run the contributors have served each other and the free-riders
and the attacker have consumed from them, all as real double-signed receipts. Each
contributor builds its ledger from its own records and the CREDIT_REPORTs of every
peer (the Sybils' included), verified and filtered by ``Ledger.merge_remote``.

Load: sessions of 32 sequential steps at one server, started as a Poisson process
whose rate alternates between bursts (20 s at 1.6x the swarm's capacity) and lulls
(40 s at 0.3x). During the run every served step raises the server's edge in its own
and the client's view (serving earns credit), as RECEIPTs would.

The same arrival stream is replayed with credit disabled (every requester has credit
0; the scheduler is otherwise identical). Reported: median and p95 wait per step by
class, and the ratios free-rider / contributor and credit on / off.

Run: ``.venv/bin/python bench/credit.py [--seed N] [--duration S]``.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import time
from dataclasses import dataclass

from peer.scheduler import SchedulerConfig, SchedulingPolicy
from protocol import Identity, ReceiptRecord
from swarm.credit import Ledger, WorkGraph, countersign, credit_of, make_receipt

STEP_SECONDS = 0.05
STEP_UNITS = 8  # blocks x tokens per step
SESSION_STEPS = 32
BURST, LULL = (20.0, 1.6), (40.0, 0.3)  # (seconds, load as a multiple of capacity)
CLASSES = ("contributor", "free-rider", "sybil", "newcomer")


@dataclass(slots=True)
class Peer:
    name: str
    cls: str
    identity: Identity
    joins: float = 0.0

    @property
    def key(self) -> bytes:
        return self.identity.public_key


@dataclass(slots=True)
class Swarm:
    peers: list[Peer]
    servers: list[Peer]
    views: dict[bytes, WorkGraph]  # each server's work graph, from its verified ledger
    sybil_edges_seen: int = 0
    rejected: int = 0


def build_swarm(seed: int, newcomers_join: float) -> Swarm:
    rng = random.Random(seed)
    counter = iter(range(1, 10**6))

    def new(cls: str, name: str, joins: float = 0.0) -> Peer:
        return Peer(name, cls, Identity.from_seed(next(counter).to_bytes(32, "big")), joins)

    contributors = [new("contributor", f"c{i}") for i in range(20)]
    free = [new("free-rider", f"f{i}") for i in range(20)]
    attacker = new("sybil", "attacker")
    sybils = [new("sybil", f"s{i}") for i in range(10)]
    newcomers = [new("newcomer", f"n{i}", joins=newcomers_join) for i in range(5)]
    hh = bytes(32)

    def record(client: Peer, server: Peer, work: int) -> ReceiptRecord:
        return countersign(server.identity, make_receipt(client.identity, server.key, hh, 1, work))

    reports: dict[bytes, list] = {}  # peer -> the records it would send in CREDIT_REPORT

    def add(r: ReceiptRecord) -> None:
        reports.setdefault(r.client, []).append(r)
        reports.setdefault(r.server, []).append(r)

    for a in contributors:
        for b in contributors:
            if a is not b and rng.random() < 0.5:
                add(record(a, b, rng.randint(100, 3000)))  # b served a
        for f in free + [attacker]:
            add(record(f, a, rng.randint(100, 3000)))  # a served the free-rider
    for a in sybils + [attacker]:
        for b in sybils + [attacker]:
            if a is not b:
                add(record(a, b, 10**12))  # the cluster's mutual fake receipts
    for c in contributors:
        # The attacker also forges records "signed" by each contributor, claiming that
        # it worked for them: its own key signs where the contributor's should.
        forged = make_receipt(attacker.identity, attacker.key, hh, 1, 10**9)
        forged = countersign(attacker.identity, type(forged)(
            client=c.key, server=attacker.key, handshake_hash=hh, seq=1, work=10**9,
            client_signature=forged.client_signature))
        reports[attacker.key].insert(0, forged)
    views = {}
    rejected = sybil_seen = 0
    sybil_keys = {p.key for p in sybils + [attacker]}
    for s in contributors:
        ledger = Ledger(s.key)
        ledger.merge_remote(reports.get(s.key, []))
        for reporter in contributors + free + sybils + [attacker]:
            if reporter is not s:
                result = ledger.merge_remote(reports.get(reporter.key, [])[:1024])
                rejected += len(result.rejected)
        sybil_seen += sum(1 for r in ledger.records() if r.client in sybil_keys and r.server in sybil_keys)
        views[s.key] = ledger.graph.copy()
    peers = contributors + free + [attacker] + sybils + newcomers
    return Swarm(peers=peers, servers=contributors, views=views, sybil_edges_seen=sybil_seen, rejected=rejected)


def arrivals(swarm: Swarm, seed: int, duration: float) -> list[tuple[float, int, int]]:
    """(time, requester index, server index) of every session start, credit-independent."""
    rng = random.Random(seed + 1)
    capacity_steps = len(swarm.servers) / STEP_SECONDS
    out = []
    t = 0.0
    while t < duration:
        phase = t % (BURST[0] + LULL[0])
        load = BURST[1] if phase < BURST[0] else LULL[1]
        rate = load * capacity_steps / SESSION_STEPS  # sessions per second, whole swarm
        t += rng.expovariate(rate)
        while True:
            r = rng.randrange(len(swarm.peers))
            if swarm.peers[r].joins <= t:
                break
        server_choices = [i for i, s in enumerate(swarm.servers) if s is not swarm.peers[r]]
        out.append((t, r, rng.choice(server_choices)))
    return out


def simulate(swarm: Swarm, starts: list[tuple[float, int, int]], *, credit: bool,
             duration: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    views = {k: g.copy() for k, g in swarm.views.items()}
    policies = [SchedulingPolicy(SchedulerConfig(capacity=1, seed=i)) for i in range(len(swarm.servers))]
    waits: dict[str, list[float]] = {c: [] for c in CLASSES}
    credits_seen: dict[str, list[float]] = {c: [] for c in CLASSES}
    events: list = []
    seq = 0
    for t, r, s in starts:
        heapq.heappush(events, (t, seq := seq + 1, "start", (r, s, SESSION_STEPS)))
    tickets: dict[tuple[int, int], tuple[int, float, int]] = {}  # (server, ticket) -> (requester, t0, left)

    def submit(now: float, r: int, s: int, left: int) -> None:
        peer, server = swarm.peers[r], swarm.servers[s]
        value = credit_of(views[server.key], peer.key, server.key).total if credit else 0.0
        credits_seen[peer.cls].append(value)
        ticket = policies[s].submit(peer.key, now=now, credit=value)
        tickets[(s, ticket)] = (r, now, left)
        dispatch(now, s)

    def dispatch(now: float, s: int) -> None:
        nonlocal seq
        for ticket in policies[s].grant(now=now):
            r, t0, left = tickets[(s, ticket)]
            if t0 <= duration:
                waits[swarm.peers[r].cls].append(now - t0)
            heapq.heappush(events, (now + STEP_SECONDS, seq := seq + 1, "done", (s, ticket)))

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "start":
            submit(now, *data)
            continue
        s, ticket = data
        r, _, left = tickets.pop((s, ticket))
        policies[s].release(ticket, now=now)
        server, peer = swarm.servers[s], swarm.peers[r]
        # The receipt for this step: the server did STEP_UNITS for the requester, in
        # the server's view and (if the requester serves too) in the requester's.
        views[server.key].add_work(server.key, peer.key, STEP_UNITS)
        if peer.key in views:
            views[peer.key].add_work(server.key, peer.key, STEP_UNITS)
        dispatch(now, s)
        if left > 1 and now <= duration:
            submit(now, r, s, left - 1)
    return waits, credits_seen


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=300.0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    swarm = build_swarm(args.seed, newcomers_join=args.duration / 3)
    built = time.perf_counter() - t0
    starts = arrivals(swarm, args.seed, args.duration)
    counts = {c: sum(1 for p in swarm.peers if p.cls == c) for c in CLASSES}
    print(f"swarm: {len(swarm.peers)} peers {counts}, {len(swarm.servers)} servers x 1 slot, "
          f"{STEP_SECONDS * 1000:.0f} ms/step, {len(starts)} sessions x {SESSION_STEPS} steps in "
          f"{args.duration:.0f} s (bursts {BURST[1]}x capacity for {BURST[0]:.0f} s, lulls {LULL[1]}x "
          f"for {LULL[0]:.0f} s)")
    print(f"history: ledgers built and verified in {built:.1f} s; Sybil-to-Sybil records kept by honest "
          f"servers: {swarm.sybil_edges_seen}; forged records rejected: {swarm.rejected}")

    results = {}
    for enabled in (True, False):
        t1 = time.perf_counter()
        results[enabled] = simulate(swarm, starts, credit=enabled, duration=args.duration)
        print(f"simulated credit={'on' if enabled else 'off'} in {time.perf_counter() - t1:.1f} s")

    print()
    print(f"{'class':<12} {'steps':>7} {'credit':>9} | {'median on':>9} {'p95 on':>8} | "
          f"{'median off':>10} {'p95 off':>8}   (wait per step, seconds)")
    stats = {}
    for c in CLASSES:
        w_on, cr = results[True][0][c], results[True][1][c]
        w_off = results[False][0][c]
        stats[c] = (median(w_on), pct(w_on, 0.95), median(w_off), pct(w_off, 0.95))
        print(f"{c:<12} {len(w_on):>7} {median(cr):>9.0f} | {stats[c][0]:>9.3f} {stats[c][1]:>8.3f} | "
              f"{stats[c][2]:>10.3f} {stats[c][3]:>8.3f}")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:6.2f}" if b > 0 else "   inf" if a > 0 else "   n/a"

    print()
    base = stats["contributor"]
    for c in ("free-rider", "sybil", "newcomer"):
        s = stats[c]
        print(f"{c} / contributor wait:   credit on: median {ratio(s[0], base[0])}  p95 {ratio(s[1], base[1])}"
              f"   | credit off: median {ratio(s[2], base[2])}  p95 {ratio(s[3], base[3])}")
    for c in CLASSES:
        s = stats[c]
        print(f"{c}: credit on / off:   median {ratio(s[0], s[2])}  p95 {ratio(s[1], s[3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
