"""Audit benchmark: detection probability vs audit rate, and the cost of auditing.

    python bench/audit.py [--trials 4000] [--tokens 48]

Part 1 (detection). A cheater that cheats on a fraction q of its steps survives N
audited-at-rate-p steps with probability (1 - p q)^N, so detection should follow
1 - (1 - p q)^N. Each simulated generation draws the audit decisions with the real
``verify.Auditor.should_audit`` (its seeded RNG) and the cheats with an independent
RNG; a generation counts as detected if some step is both cheated and audited (an
audited cheat is always caught: tests/verify show every cheat kind far outside the
tolerances). Printed: measured vs model, per (p, q, N).

Part 2 (cost). A real loopback swarm (the design's bench model: tiny random Llama,
4 layers, hidden 256, fp32; two spans, two servers each) generates the same prompts
with audits off (baseline), at p = 0.05 and at p = 1. Printed per setting: decode
steps/s and its ratio to the baseline (latency), and the span compute the servers
spent (sum of their measured compute seconds) as a ratio to the baseline (extra
compute; an audit replays the whole prefix, so its cost grows with the position).
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import tempfile
import time

import torch
import trio

from peer.api import Swarm
from peer.node import ServeOptions, run_server
from protocol import Identity
from verify import AuditPolicy, Auditor, Reputation


def detection(trials: int) -> None:
    print("detection probability: measured (real Auditor sampling) vs model 1 - (1 - p q)^N")
    print(f"{'p':>6} {'q':>5} {'N':>5} {'measured':>9} {'model':>7}")
    cheat_rng = random.Random(7)
    worst = 0.0
    for p in (0.01, 0.05, 0.2, 1.0):
        for q in (0.1, 1.0):
            for n in (10, 50, 200):
                auditor = Auditor(None, None, Reputation(), policy=AuditPolicy(rate=p, seed=int(p * 1000 + q * 10 + n)))
                caught = 0
                for _ in range(trials):
                    for _ in range(n):
                        audited = auditor.should_audit()
                        if cheat_rng.random() < q and audited:
                            caught += 1
                            break
                measured, model = caught / trials, 1 - (1 - p * q) ** n
                worst = max(worst, abs(measured - model))
                print(f"{p:6.2f} {q:5.2f} {n:5d} {measured:9.3f} {model:7.3f}")
    print(f"largest |measured - model| = {worst:.3f} over {trials} generations each "
          f"(binomial std at most {0.5 / trials ** 0.5:.3f})\n")


async def _cost(path: str, tokens: int, prompts: list[list[int]]) -> None:
    async with trio.open_nursery() as nursery:
        async def serve(blocks, bootstrap=()):
            options = ServeOptions(model=path, blocks=blocks, bootstrap=tuple(bootstrap))
            return await nursery.start(functools.partial(run_server, Identity.generate(), options))

        first = await serve((0, 2))
        nodes = [first] + [await serve(span, [first.address]) for span in [(0, 2), (2, 4), (2, 4)]]
        rows = []
        for label, audit in (("off", None), ("p=0.05", 0.05), ("p=1", 1.0)):
            swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=path, audit=audit)
            await swarm.generate(prompts[0], max_new_tokens=4)  # connections, caches, view
            compute0 = sum(n.server.stats.compute_seconds for n in nodes)
            steps = 0
            t0 = time.perf_counter()
            decode = 0.0
            for prompt in prompts:
                result = await swarm.generate(prompt, max_new_tokens=tokens)
                steps += len(result.token_ids) - 1
                decode += result.total_seconds - result.time_to_first_token
            wall = time.perf_counter() - t0
            compute = sum(n.server.stats.compute_seconds for n in nodes) - compute0
            auditor = swarm.client.auditor
            audits = auditor.stats.audits if auditor else 0
            rows.append((label, steps / decode, wall, compute, audits))
            await swarm.aclose()
        base_rate, _, base_compute = rows[0][1], rows[0][2], rows[0][3]
        print(f"audit cost on a loopback swarm ({len(prompts)} prompts x {tokens} tokens, 2 hops, tiny Llama h256):")
        print(f"{'audit':>7} {'steps/s':>8} {'latency x':>9} {'compute x':>9} {'audits':>7}")
        for label, rate, wall, compute, audits in rows:
            print(f"{label:>7} {rate:8.1f} {base_rate / rate:9.2f} {compute / base_compute:9.2f} {audits:7d}")
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    detection(args.trials)
    if args.skip_cost:
        return 0
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                     eos_token_id=2, bos_token_id=1, tie_word_embeddings=False)).save_pretrained(tmp)
        prompts = [[1, 5, 9, 33, 7], [900, 3, 14], [42] * 9]
        trio.run(_cost, tmp, args.tokens, prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
