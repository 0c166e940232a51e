"""Audit benchmark: detection, collusion, framing, Sybil credit, and the cost of auditing.

    python bench/audit.py [--trials 4000] [--tokens 48] [--skip-cost] [--only NAME ...]
                          [--collusion-trials 3] [--framing 10000]

Part 1 (detection). A cheater that cheats on a fraction q of its steps survives N
audited-at-rate-p steps with probability (1 - p q)^N, so detection should follow
1 - (1 - p q)^N. Each simulated generation draws the audit decisions with the real
``verify.Auditor.should_audit`` (its seeded RNG, no probation) and the cheats with an
independent RNG. Printed: measured vs model, per (p, q, N).

Part 2 (collusion). Real loopback swarms (tiny random Llama, hidden 64, 6 blocks;
blocks 0:3 held by 2, 3 or 5 servers, 3:6 by two honest servers). One cheater adds a
fixed offset (20 % of the row RMS, so that what gets through changes the tokens) to
its FORWARD outputs and answers FORWARD_ONCE honestly; "k colluding" holders add the
same offset to FORWARD and FORWARD_ONCE (they back the cheater), the rest are honest.
Cheaters announce 1000x throughput (routing picks them). For each configuration,
client mode (``recompute``: the client may load the span itself, the default;
``votes``: it may not, and the honest holders are established in its history while
the cheaters are fresh) and audit policy (``default`` p = 0.05 with probation;
``paranoid``), fresh clients generate greedily (fraud-proof vetting off, so each trial
measures the audit and not the DHT). Printed per row: the share of trials where a
dishonest hop served a step and was flagged and routed around, the tokens generated
before the first flag (mean) and the seconds, the share where the client convicted it
on its own evidence, whether an honest holder banned it (swarm side, by recomputing
the proof), wrong tokens in the final outputs (against local ``transformers``
greedy), honest servers banned by any honest peer, and the mean verified fraction.
Rows marked "established cheater" pre-seed the cheaters as established too: then
only the base rate p = 0.05 finds them (Part 1's law), and steps no audit drew can
deliver wrong tokens; these rows are outside the goal of 0 wrong tokens.

Part 3 (framing). ``--framing`` attempts (default 10,000) to convict an honest
server with proofs of its genuine, signed outputs on inputs no model produces:
N(0, s) for s in 1e-3..1e3, heavy tails, a few huge rows, constant rows, and real
activations, in every auditable wire dtype, the honest output computed three ways
(KV-cache session, one-shot pass, float64 rounded), on spans of the tests' tiny Llama
and of one with large weights. Each attempt runs ``verify_proof`` (the verifier's code
path: signatures, bounds, two recomputations, ``judge``). Printed: honest servers
convicted (goal 0) and, as the baseline in the same run, how many the previous rule
(calibrated thresholds against one recomputation) convicted.

Part 4 (Sybil credit). A peer X really served server S; it signs receipts that N
fresh identities served it as much, and S merges them (real Ed25519 records, S's
``Ledger``). Printed: the credit those identities get at S relative to X's real
contribution (goal <= 1.0x), against the per-requester 2-hop flow (the old rule).

Part 5 (cost). A real loopback swarm (the design's bench model: tiny random Llama,
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on sys.path, the repo root is not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import trio  # noqa: E402

from bench._audit_attacks import collusion, framing, sybil_credit  # noqa: E402
from peer.api import Swarm  # noqa: E402
from peer.node import ServeOptions, run_server  # noqa: E402
from protocol import Identity  # noqa: E402
from verify import AuditPolicy, Auditor, Reputation  # noqa: E402


def detection(trials: int) -> None:
    print("detection probability: measured (real Auditor sampling) vs model 1 - (1 - p q)^N")
    print(f"{'p':>6} {'q':>5} {'N':>5} {'measured':>9} {'model':>7}")
    cheat_rng = random.Random(7)
    worst = 0.0
    for p in (0.01, 0.05, 0.2, 1.0):
        for q in (0.1, 1.0):
            for n in (10, 50, 200):
                auditor = Auditor(None, None, Reputation(),  # type: ignore[arg-type]
                                  policy=AuditPolicy(rate=p, probation=0, seed=int(p * 1000 + q * 10 + n)))
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


PARTS = ("detection", "collusion", "framing", "credit", "cost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4000, help="simulated generations per detection point")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per generation in the cost part")
    parser.add_argument("--collusion-trials", type=int, default=2, help="rounds of 3 prompts per collusion row")
    parser.add_argument("--collusion-tokens", type=int, default=12)
    parser.add_argument("--framing", type=int, default=10000, help="framing attempts")
    parser.add_argument("--only", nargs="*", choices=PARTS, help="run only these parts")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    parts = set(args.only or PARTS) - ({"cost"} if args.skip_cost else set())
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if "detection" in parts:
        detection(args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        if "collusion" in parts:
            collusion(tmp, trials=args.collusion_trials, tokens=args.collusion_tokens)
        if "framing" in parts:
            framing(tmp, attempts=args.framing)
        if "credit" in parts:
            sybil_credit()
        if "cost" in parts:
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                         eos_token_id=2, bos_token_id=1,
                                         tie_word_embeddings=False)).save_pretrained(f"{tmp}/cost")
            prompts = [[1, 5, 9, 33, 7], [900, 3, 14], [42] * 9]
            trio.run(_cost, f"{tmp}/cost", args.tokens, prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
