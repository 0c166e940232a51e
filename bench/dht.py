"""DHT lookup cost against swarm size: latency, hops and messages per lookup.

For each swarm size n (32, 64, 128 by default) the bench starts n peers in this one
trio process on loopback, each its own Host and DhtNode, each bootstrapped through
one random earlier peer, as the tests do. Eight peers publish one block record
each. Then, after an untimed warm-up (connections open), it times sequential
lookups from random peers: FIND_VALUE for the published keys (``DhtNode.get``) and
FIND_NODE for random targets. Reported per n: median and p95 latency, median and
max hops, mean messages (queries sent) per lookup, and each figure's ratio to the
smallest swarm's, next to log2(n) / log2(n0), the growth O(log n) predicts.

Latency on loopback is CPU time (Noise, CBOR, Ed25519 verification in one Python
process), so it grows with messages, not with network distance.

Run: ``.venv/bin/python bench/dht.py [--sizes 32 64 128] [--lookups 60] [--seed N]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time

import trio

from protocol import Announcement
from swarm.announce import RECORD_KINDS, announcement_records
from swarm.dht._local import start_local_swarm


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


async def measure(n: int, lookups: int, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        peers = await start_local_swarm(nursery, n, kinds=RECORD_KINDS, rng=rng)
        keys = []
        for block, peer in enumerate(rng.sample(peers, 8)):
            ann = Announcement(peer_id=peer.peer_id, addrs=(peer.addr,), model="bench", span=(block, block + 1),
                               throughput=10.0, free_sessions=1, expires=int(time.time()) + 600)
            (record,) = announcement_records(peer.identity, ann, seq=1)
            await peer.dht.publish(record)
            keys.append(record.key)
        setup = time.perf_counter() - started
        for _ in range(lookups // 2):  # warm-up: open connections as a running swarm has them
            await rng.choice(peers).dht.lookup_value(rng.choice(keys))
        out: dict[str, dict[str, float]] = {}
        for kind in ("find_value", "find_node"):
            seconds, hops, messages, found = [], [], [], 0
            for _ in range(lookups):
                peer = rng.choice(peers)
                if kind == "find_value":
                    result = await peer.dht.lookup_value(rng.choice(keys))
                    found += bool(result.records)
                else:
                    result = await peer.dht.lookup_node(rng.randbytes(20))
                    found += bool(result.closest)
                seconds.append(result.seconds)
                hops.append(result.hops)
                messages.append(result.messages)
            out[kind] = {
                "median_ms": 1000 * statistics.median(seconds),
                "p95_ms": 1000 * p95(seconds),
                "hops_median": statistics.median(hops),
                "hops_max": max(hops),
                "messages": statistics.mean(messages),
                "found": found / lookups,
            }
        routing = statistics.mean(len(p.dht.routing) for p in peers)
        print(f"n={n:4d}: set-up {setup:5.1f} s, mean routing table {routing:5.1f} contacts", flush=True)
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--lookups", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # abandoned dials at lookup ends log a line each
    results = {n: trio.run(measure, n, args.lookups, args.seed + n) for n in args.sizes}
    base = args.sizes[0]
    for kind in ("find_value", "find_node"):
        print(f"\n{kind} ({args.lookups} lookups per size; ratios against n={base})")
        print(f"{'n':>5} {'median ms':>10} {'p95 ms':>8} {'hops med':>9} {'hops max':>9} {'msgs':>6} "
              f"{'found':>6} | {'x msgs':>7} {'x median':>8} {'x log2 n':>8}")
        for n in args.sizes:
            r, b = results[n][kind], results[base][kind]
            print(f"{n:5d} {r['median_ms']:10.1f} {r['p95_ms']:8.1f} {r['hops_median']:9.1f} {r['hops_max']:9d} "
                  f"{r['messages']:6.1f} {r['found']:6.0%} | {r['messages'] / b['messages']:7.2f} "
                  f"{r['median_ms'] / b['median_ms']:8.2f} {math.log2(n) / math.log2(base):8.2f}")


if __name__ == "__main__":
    main()
