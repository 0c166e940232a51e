"""DHT lookups: cost against swarm size over real sockets, and success against
adversaries in a 10,000-node simulation.

Sockets. For each swarm size n (32, 64, 128 by default) the bench starts n peers in
this one trio process on loopback, each its own Host and DhtNode, each bootstrapped
through one random earlier peer, as the tests do. Eight peers publish one block
record each. Then, after an untimed warm-up (connections open), it times sequential
lookups from random peers: FIND_VALUE for the published keys (``DhtNode.get``) and
FIND_NODE for random targets. Reported per n: median and p95 latency, median and
max hops, mean messages (queries sent) per lookup, and each figure's ratio to the
smallest swarm's, next to log2(n) / log2(n0), the growth O(log n) predicts.
Latency on loopback is CPU time (Noise, CBOR, Ed25519 verification in one Python
process), so it grows with messages, not with network distance.

Simulation (no sockets, ``--sim-nodes`` 10,000). Every node has an ideal Kademlia
table (per prefix length, up to k random nodes of that subtree); a record is held by
the k nodes closest to its key. A fraction of the nodes (20% by default) is
adversarial and answers every query in one way: ``collude`` (only the k adversaries
closest to the target, no record), ``silent`` (an empty answer), ``stale`` (an older
version of the record, and only adversaries as contacts). Lookups from random honest
nodes for random keys are driven by the real ``swarm.dht.DisjointLookup`` with the
DHT node's parameters (k = 20, alpha = 3, beta = 3), once over one path (plain
Kademlia) and once over d = 3 disjoint paths; a lookup succeeds when the newest
record reached it (as ``DhtNode.get`` merges: the highest seq wins). Printed next to
S/Kademlia's estimate 1 - (1 - (1 - f)^h)^d, with h the mean hops measured without
adversaries. Goal: >= 95% success at 20% adversaries with disjoint paths.

Run: ``.venv/bin/python bench/dht.py [--sizes 32 64 128] [--lookups 60] [--seed N]
[--sim-nodes 10000] [--sim-lookups 1000] [--only sim|sockets]``.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass

import trio

from protocol import Announcement, Identity, NodeInfo
from swarm.announce import RECORD_KINDS, announcement_records
from swarm.dht import ALPHA, BETA, K, PATHS, Contact, DisjointLookup
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
                               throughput=10.0, free_sessions=1, expires=int(time.time()) + 240)
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


# --- simulation -----------------------------------------------------------------------

ID_BITS = 160


class SimNetwork:
    """``n`` nodes with ideal Kademlia tables; ``adversaries`` is a set of node ids."""

    def __init__(self, n: int, *, adversarial: float, rng: random.Random, k: int = K) -> None:
        self.k = k
        self.rng = rng
        contacts = []
        for i in range(n):
            identity = Identity.from_seed(rng.randbytes(32))
            contacts.append(Contact(NodeInfo(peer_id=identity.peer_id, public_key=identity.public_key,
                                             addrs=(f"10.{i >> 8 & 255}.{i & 255}.1:4000",))))
        contacts.sort(key=lambda c: c.long_id)
        self.contacts = contacts
        self.ids = [c.long_id for c in contacts]
        self.adversaries = {c.long_id for c in rng.sample(contacts, int(adversarial * n))}
        bad = [c for c in contacts if c.long_id in self.adversaries]
        self.bad, self.bad_ids = bad, [c.long_id for c in bad]
        self._buckets: dict[tuple[int, int], list[Contact]] = {}

    def closest(self, target: int, n: int, *, among: str = "all") -> list[Contact]:
        """The ``n`` nodes closest to ``target`` by XOR (exact: they all lie in the
        smallest aligned subtree around ``target`` that holds ``n`` nodes)."""
        contacts, ids = (self.contacts, self.ids) if among == "all" else (self.bad, self.bad_ids)
        for free_bits in range(ID_BITS + 1):
            low = target >> free_bits << free_bits
            lo, hi = bisect.bisect_left(ids, low), bisect.bisect_left(ids, low + (1 << free_bits))
            if hi - lo >= n or free_bits == ID_BITS:
                return sorted(contacts[lo:hi], key=lambda c: c.long_id ^ target)[:n]
        raise AssertionError("unreachable")

    def bucket(self, node: Contact, depth: int) -> list[Contact]:
        """Up to k random nodes sharing exactly ``depth`` leading bits with ``node``."""
        key = (node.long_id, depth)
        if key not in self._buckets:
            free_bits = ID_BITS - depth - 1
            low = ((node.long_id >> free_bits) ^ 1) << free_bits
            lo, hi = bisect.bisect_left(self.ids, low), bisect.bisect_left(self.ids, low + (1 << free_bits))
            members = self.contacts[lo:hi]
            self._buckets[key] = members if len(members) <= self.k else random.Random(
                node.long_id ^ depth).sample(members, self.k)
        return self._buckets[key]

    def table_answer(self, node: Contact, target: int) -> list[Contact]:
        """The k contacts of ``node``'s table closest to ``target`` (FIND_NODE)."""
        if node.long_id == target:
            depth = ID_BITS
        else:
            depth = ID_BITS - (node.long_id ^ target).bit_length()
        found: list[Contact] = []
        order = [depth] + list(range(depth + 1, ID_BITS)) + list(range(depth - 1, -1, -1))
        for d in order:
            if d >= ID_BITS:
                continue
            found.extend(self.bucket(node, d))
            if len(found) >= self.k and d <= depth:
                break
        return sorted(found, key=lambda c: c.long_id ^ target)[: self.k]


@dataclass(slots=True)
class SimOutcome:
    success: bool
    messages: int
    hops: int


def sim_lookup(net: SimNetwork, start: Contact, target: int, *, behaviour: str, paths: int) -> SimOutcome:
    """One FIND_VALUE lookup for a key whose newest record (seq 2) the honest nodes
    among its k closest hold; adversaries among them hold seq 1 (``stale``) or none."""
    holders = {c.long_id for c in net.closest(target, net.k)}
    target_bytes = target.to_bytes(20, "big")
    lookup = DisjointLookup(target_bytes, net.table_answer(start, target), k=net.k, alpha=ALPHA, beta=BETA,
                            paths=paths, self_id=start.id)
    newest = 0
    while lookup.termination() is None:
        for index, peer in lookup.next_queries():
            if peer.long_id not in net.adversaries:
                newest = max(newest, 2 if peer.long_id in holders else 0)
                lookup.on_response(index, peer.id, net.table_answer(peer, target))
            elif behaviour == "silent":
                lookup.on_response(index, peer.id, [])
            else:  # collude, stale: only each other; stale also returns the older record
                if behaviour == "stale" and peer.long_id in holders:
                    newest = max(newest, 1)
                lookup.on_response(index, peer.id, net.closest(target, net.k, among="bad"))
    return SimOutcome(success=newest == 2, messages=lookup.messages, hops=lookup.hops)


def simulate(n: int, lookups: int, seed: int, adversarial: float) -> None:
    started = time.perf_counter()
    rng = random.Random(seed)
    honest_net = SimNetwork(n, adversarial=0.0, rng=random.Random(seed))
    net = SimNetwork(n, adversarial=adversarial, rng=random.Random(seed))
    print(f"\nsimulation: {n} nodes, k={K}, alpha={ALPHA}, beta={BETA}, {lookups} FIND_VALUE lookups per row "
          f"(set-up {time.perf_counter() - started:.1f} s)")
    starts = [c for c in net.contacts if c.long_id not in net.adversaries]
    queries = [(rng.choice(starts), rng.getrandbits(ID_BITS)) for _ in range(lookups)]
    base = {d: [sim_lookup(honest_net, s, t, behaviour="none", paths=d) for s, t in queries] for d in (1, PATHS)}
    hops = statistics.mean(o.hops for o in base[1])
    print(f"{'adversaries':>11} {'behaviour':>9} {'d':>2} {'success':>8} {'S/Kademlia':>10} {'msgs':>6} "
          f"{'hops':>5}")
    for d in (1, PATHS):
        rate = sum(o.success for o in base[d]) / lookups
        print(f"{0:>10.0%} {'-':>9} {d:>2} {rate:>8.1%} {1.0:>10.1%} {statistics.mean(o.messages for o in base[d]):>6.1f} "
              f"{statistics.mean(o.hops for o in base[d]):>5.2f}")
    for behaviour in ("collude", "silent", "stale"):
        for d in (1, PATHS):
            outcomes = [sim_lookup(net, s, t, behaviour=behaviour, paths=d) for s, t in queries]
            rate = sum(o.success for o in outcomes) / lookups
            formula = 1 - (1 - (1 - adversarial) ** hops) ** d
            print(f"{adversarial:>10.0%} {behaviour:>9} {d:>2} {rate:>8.1%} {formula:>10.1%} "
                  f"{statistics.mean(o.messages for o in outcomes):>6.1f} "
                  f"{statistics.mean(o.hops for o in outcomes):>5.2f}", flush=True)
    print(f"(h = {hops:.2f} mean hops without adversaries; simulation took {time.perf_counter() - started:.0f} s)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--lookups", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sim-nodes", type=int, default=10_000)
    parser.add_argument("--sim-lookups", type=int, default=1000)
    parser.add_argument("--adversarial", type=float, default=0.2)
    parser.add_argument("--only", choices=("sim", "sockets"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # abandoned dials at lookup ends log a line each
    if args.only != "sockets":
        simulate(args.sim_nodes, args.sim_lookups, args.seed, args.adversarial)
    if args.only == "sim":
        return
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
