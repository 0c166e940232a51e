"""The relay on an emulated geo-distributed swarm (issue 14, section 4): a client in
"tokyo", servers in tokyo, seoul and virginia behind the userspace WAN emulator
(``bench/wanem``), every configuration measured in the same run.

Configurations:

* (a) the far data center: one server holding every block in virginia;
* (b) replicas of every span in all three regions, star relay, latency-blind routing
  (every RTT the planner's default, as before section 2);
* (c) the same swarm, latency-aware routing (measured RTTs), star;
* (d) the same swarm, latency-aware routing, server-to-server push (spec 11.4);
* (e) a swarm whose chain must cross regions (first span only in tokyo, second only
  in seoul, third only in virginia; ``--cross`` picks other regions), star and push;
  the same servers again with the emulator's delay off give the compute and protocol
  time per token, so the network time per token is measured, not assumed. The
  topology's own figures are printed too: push saves what the ring around the chain
  is shorter than the sum of the client's round trips to every hop, which for
  tokyo -> seoul -> virginia (the issue's example) is almost nothing (181.5 vs 183 ms),
  and for a chain far from the client and near itself is most of it.

Per configuration it prints the route (regions), time to first token, decode steps/s,
per-token latency and the ratios the issue sets as goals: (d) >= 3x faster per token
than (a); (c) >= 2x faster than (b); in (e) push's network time per token <=
(H+1)/(2H) of star's plus 10%.

Run: ``.venv/bin/python bench/wan.py [--model tiny|smollm] [--tokens 16] [--repeats 2]
[--bandwidth 100]``. ``tiny`` is a random Llama (6 layers, hidden 256) saved in a temp
dir, spans 0:2, 2:4, 4:6; ``smollm`` is SmolLM2-135M-Instruct fp32 (30 blocks, spans
0:10, 10:20, 20:30), the issue's model, slower to start (13 server processes in all).
The machine may be shared: compare ratios, and read the load average printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ scripts run with bench/ on sys.path

from bench.wanem import EmulatedSwarm, ServerSpec, Topology, exit_on_sigterm, regional  # noqa: E402

if TYPE_CHECKING:
    from peer.client import SwarmClient
    from swarm.announce import SwarmView
    from swarm.planning import Candidate

REGIONS = ("tokyo", "seoul", "virginia")
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
TINY_PROMPT = [17, 301, 5, 88, 912, 43, 7, 250]
SMOLLM_PROMPT = "The history of the printing press begins in"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """A client configuration's generations (after a warm-up)."""

    name: str
    route: list[str]  # the node of each hop
    tokens: list[list[int]]
    ttft: list[float]
    decode: list[float]  # decode steps/s after the first token
    pushed: int

    @property
    def steps(self) -> float:
        return statistics.median(self.decode)

    @property
    def per_token(self) -> float:
        return 1 / self.steps if self.steps else float("nan")

    def row(self) -> str:
        return (f"  {self.name:34s} {self.per_token * 1e3:8.1f} ms/token {self.steps:7.2f} steps/s  TTFT "
                f"{statistics.median(self.ttft) * 1e3:7.0f} ms  route {' -> '.join(self.route)}"
                f"{f'  (pushed {self.pushed} of {len(self.tokens[0])})' if self.pushed else ''}")


def _blind(client: SwarmClient) -> None:
    """Make ``client`` plan as before latency-aware routing: every candidate at the
    default RTT, no server-to-server RTTs (deadlines still use what it measured)."""
    measured = client.candidates

    def candidates(view: SwarmView) -> list[Candidate]:
        return [dataclasses.replace(c, rtt=client.costs.default_rtt, next_rtts={}) for c in measured(view)]

    client.candidates = candidates


async def _measure(emu: EmulatedSwarm, configs: Sequence[tuple[str, str, bool]], prompt: str | list[int], n: int, repeats: int,
                   peer_nodes: dict[bytes, str]) -> list[Measured]:
    """One client per (name, relay, blind) on node "client"; a warm-up each, then
    ``repeats`` generations each, alternating."""
    out: dict[str, dict] = {}
    async with trio.open_nursery() as nursery:
        swarms = {}
        for name, relay, blind in configs:
            swarm = await emu.connect(nursery, "client", audit=None, relay=relay, step_timeout=30.0)
            if blind:
                _blind(swarm.client)
            swarms[name] = swarm
            out[name] = dict(tokens=[], ttft=[], decode=[], route=[], pushed=0)
        for name, swarm in swarms.items():  # warm-up: probes (RTTs), connections, sessions
            await swarm.generate(prompt, max_new_tokens=min(n, 4), chat=False)
        for _ in range(repeats):
            for name, swarm in swarms.items():
                result = await swarm.generate(prompt, max_new_tokens=n, chat=False)
                entry = out[name]
                entry["tokens"].append(result.token_ids)
                entry["ttft"].append(result.time_to_first_token)
                entry["decode"].append(result.tokens_per_second)
                entry["route"] = [peer_nodes.get(bytes.fromhex(h.peer_id), "?") for h in result.route]
                entry["pushed"] = result.pushed_steps
        for swarm in swarms.values():
            await swarm.aclose()
    return [Measured(name=name, **entry) for name, entry in out.items()]


def _peer_nodes(emu: EmulatedSwarm, workdir: Path) -> dict[bytes, str]:
    from protocol import Identity

    return {Identity.load(workdir / f"{s.node}.key").peer_id: s.node for s in emu.specs}


def run_config(topo: Topology, model: str, servers: list[ServerSpec], configs: Sequence[tuple[str, str, bool]], *,
               workdir: Path, env: dict, prompt: str | list[int], n: int, repeats: int, proxy: bool = True) -> list[Measured]:
    t0 = time.perf_counter()
    with EmulatedSwarm(topo, model, servers, workdir=workdir, env=env, proxy=proxy) as emu:
        print(f"  {len(servers)} servers ready in {time.perf_counter() - t0:.1f} s"
              f"{'; ' + emu.overhead_line if proxy and emu.overhead_line else ''}", flush=True)
        nodes = _peer_nodes(emu, workdir)
        return trio.run(_measure, emu, configs, prompt, n, repeats, nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm"), default="tiny")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=2, help="measured generations per configuration")
    parser.add_argument("--bandwidth", type=float, default=100.0, help="Mbit/s of every link")
    parser.add_argument("--skip", default="", help="configurations to skip, e.g. 'b' or 'be'")
    parser.add_argument("--cross", default="tokyo,seoul,virginia",
                        help="(e): the region of each span's only server, in block order")
    args = parser.parse_args()
    exit_on_sigterm()
    print(f"wan bench: model {args.model}, {args.tokens} new tokens, {args.repeats} repeats, {args.bandwidth:g} "
          f"Mbit/s links, client in tokyo, cpus {os.cpu_count()}, load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="swarm-bench-wan-") as tmp_name:
        tmp = Path(tmp_name)
        env = {"SWARM_PEER_CACHE": str(tmp / "cache")}
        if args.model == "tiny":
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**TINY)).eval().save_pretrained(tmp / "tiny")
            model, blocks, prompt = str(tmp / "tiny"), 6, TINY_PROMPT
        else:
            import peer.runtime as rt

            model, blocks, prompt = rt.DEFAULT_MODEL, 30, SMOLLM_PROMPT
            env = {}
        third = blocks // 3
        spans = [(0, third), (third, 2 * third), (2 * third, blocks)]
        results: dict[str, Measured] = {}
        common = dict(env=env, prompt=prompt, n=args.tokens, repeats=args.repeats)

        if "a" not in args.skip:
            print("\n== (a) the far data center: every block in virginia", flush=True)
            topo = Topology.make([("client", "tokyo"), ("virginia-dc", "virginia")], bandwidth_mbit=args.bandwidth)
            (results["a"],) = run_config(topo, model, [ServerSpec(node="virginia-dc", blocks=(0, blocks))],
                                         [("(a) far data center", "star", False)], workdir=tmp / "a", **common)
            print(results["a"].row(), flush=True)

        if not {"b", "c", "d"} <= set(args.skip):
            print("\n== (b)-(d) replicas of every span in tokyo, seoul and virginia", flush=True)
            topo = regional({"client": "tokyo"}, {r: 3 for r in REGIONS}, bandwidth_mbit=args.bandwidth)
            servers = [ServerSpec(node=f"{r}-{i}", blocks=span) for r in REGIONS for i, span in enumerate(spans)]
            configs = [("(b) star, latency-blind", "star", True), ("(c) star, latency-aware", "star", False),
                       ("(d) push, latency-aware", "push", False)]
            for key, measured in zip("bcd", run_config(topo, model, servers, configs, workdir=tmp / "bcd", **common)):
                results[key] = measured
                print(measured.row(), flush=True)

        if "e" not in args.skip:
            cross = args.cross.split(",")
            if len(cross) != 3 or not set(cross) <= set(REGIONS) | {"frankfurt"}:
                parser.error("--cross takes three regions")
            print(f"\n== (e) a chain that must cross regions: {' -> '.join(cross)}", flush=True)
            nodes = [f"{region}-{i}" for i, region in enumerate(cross)]
            topo = Topology.make([("client", "tokyo"), *zip(nodes, cross)], bandwidth_mbit=args.bandwidth)
            servers = [ServerSpec(node=node, blocks=span) for node, span in zip(nodes, spans)]
            ring = ["client", *nodes, "client"]
            expected = {"star": sum(topo.link("client", n).rtt_ms for n in nodes),
                        "push": sum(topo.link(a, b).rtt_ms for a, b in zip(ring, ring[1:])) / 2}
            print(f"  the topology's network time per token: star {expected['star']:.1f} ms (a round trip per "
                  f"hop), push {expected['push']:.1f} ms (one trip around): push/star "
                  f"{expected['push'] / expected['star']:.3f}", flush=True)
            configs = [("(e) star", "star", False), ("(e) push", "push", False)]
            results["e-star"], results["e-push"] = run_config(topo, model, servers, configs, workdir=tmp / "e",
                                                              **common)
            print(results["e-star"].row(), flush=True)
            print(results["e-push"].row(), flush=True)
            print("   the same servers again, emulator delay off (compute and protocol only):", flush=True)
            configs = [("(e0) star, no delay", "star", False), ("(e0) push, no delay", "push", False)]
            results["e0-star"], results["e0-push"] = run_config(topo, model, servers, configs, workdir=tmp / "e0",
                                                                proxy=False, **common)
            print(results["e0-star"].row(), flush=True)
            print(results["e0-push"].row(), flush=True)

    print(f"\n== summary (load average {load_average()})", flush=True)
    for measured in results.values():
        print(measured.row())
    if "a" in results and "d" in results:
        ratio = results["a"].per_token / results["d"].per_token
        print(f"  (d) vs (a): {ratio:.2f}x faster per token (goal >= 3x)")
    if "b" in results and "c" in results:
        ratio = results["b"].per_token / results["c"].per_token
        print(f"  (c) vs (b): {ratio:.2f}x faster per token (goal >= 2x)")
    if "e-star" in results and "e0-star" in results:
        hops = len(results["e-star"].route)
        star_net = results["e-star"].per_token - results["e0-star"].per_token
        push_net = results["e-push"].per_token - results["e0-push"].per_token
        bound = (hops + 1) / (2 * hops)
        print(f"  (e) network time per token: star {star_net * 1e3:.1f} ms, push {push_net * 1e3:.1f} ms: "
              f"push/star {push_net / star_net:.3f} (goal <= {bound:.3f} + 10% = {bound * 1.1:.3f}, H = {hops})")
    tokens = {tuple(m.tokens[0]) for m in results.values()}
    print(f"  every configuration generated the same tokens: {len(tokens) == 1}")


if __name__ == "__main__":
    main()
