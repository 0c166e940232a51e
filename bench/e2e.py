"""End-to-end relay speed: server processes on loopback against local ``transformers`` generate.

Two parts (DESIGN.md, "Performance targets"), each measured against its baseline in
the same run, alternating relay and local runs after a warm-up of both:

* ``smollm``: SmolLM2-135M-Instruct (the built-in GGUF, fp32), three ``swarm-peer serve``
  processes for blocks 0:10, 10:20 and 20:30, the client in this process
  (``peer.api.Swarm``, greedy, ``chat=False``) against ``transformers`` ``generate`` on
  the whole model here, and the same three spans chained in this process (no network)
  to separate the relay's cost from the model's. Target: relay >= 0.95x local.
* ``tiny``: the Petals comparison: a random Llama (4 layers, hidden 256, intermediate
  688, 4 heads, vocab 1000, fp32) built from its config and saved as safetensors in a
  temp dir, served by two processes (blocks 0:2 and 2:4). Target (issue 14, section 6):
  >= 250 decode steps/s and 0.8x local; Petals reached 40-43 against 270 tok/s for
  local generate on these machines.

Both relay modes run by default, alternating: star (the client sends every hop its
input) and push (each server hands its output to the next, spec 11.4).

Per run it records time to first token (prompt routing, session opening and prefill
for the relay; the prefill for transformers), decode steps/s after the first token,
and tokens/s over the whole call. The servers are stopped with SIGTERM at the end,
also on errors and on SIGTERM/Ctrl-C of this process.

Run: ``.venv/bin/python bench/e2e.py [--part smollm|tiny|all] [--smollm-tokens 48]
[--tiny-tokens 128] [--repeats 3] [--relay star|push|both] [--threads N] [--wire-dtype f32] [--audit 0] [--server-env K=V]``.
The machine may be shared: each part prints the load average; compare ratios. On an
oversubscribed machine torch's default of one thread per core stalls in OpenMP
barriers (several times slower); ``--threads 1`` measures without that.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import trio

from peer.api import Swarm
from peer.demo import ServerProcess, start_server_process

PROMPT = "The history of the printing press begins in"
SMOLLM_SPANS = ((0, 10), (10, 20), (20, 30))
TINY_SPANS = ((0, 2), (2, 4))
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
TINY_PROMPT = [17, 301, 5, 88, 912, 43, 7, 250]
PETALS_STEPS = "40-43"


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One generation: tokens, seconds to the first token, seconds in all."""

    tokens: list[int]
    ttft: float
    total: float
    pushed: int = 0  # steps that went around the chain by server-to-server push

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.total

    @property
    def steps_per_second(self) -> float:
        """Decode steps after the first token, per second (the first token costs the prefill)."""
        decode = self.total - self.ttft
        return (len(self.tokens) - 1) / decode if len(self.tokens) > 1 and decode > 0 else 0.0


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- baselines ------------------------------------------------------------------------------


def local_generate(model: torch.nn.Module, ids: Sequence[int], n: int) -> Run:
    """Greedy ``transformers`` generate, timed per token through a streamer."""
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Stamps(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:  # first call: the prompt; then one per new token
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, streamer=Stamps())
    total = time.perf_counter() - t0
    tokens = out[0, len(ids):].tolist()
    return Run(tokens=tokens, ttft=stamps[1] - t0 if len(stamps) > 1 else total, total=total)


def inprocess_chain(model: str, spans: Sequence[tuple[int, int]], ids: Sequence[int], n: int) -> Callable[[], Run]:
    """The same spans chained in this process by the runtime (no network): a timed runner."""
    import peer.runtime as rt

    head = rt.load_head(model)
    executors = [rt.load_span(model, a, b) for a, b in spans]
    params = rt.SamplingParams(max_new_tokens=n)

    class Stamps(list):  # generate_local appends each step's logits: note when
        def append(self, item: object) -> None:
            super().append(time.perf_counter())

    def run() -> Run:
        stamps = Stamps()
        t0 = time.perf_counter()
        tokens = rt.generate_local(head, executors, list(ids), params, logits_out=stamps)
        total = time.perf_counter() - t0
        return Run(tokens=list(tokens), ttft=stamps[0] - t0, total=total)

    return run


# -- the relay ------------------------------------------------------------------------------


class Servers:
    """``swarm-peer serve`` processes for ``spans``; stopped with SIGTERM on exit, whatever happens."""

    def __init__(self, model: str, spans: Sequence[tuple[int, int]], workdir: Path, *,
                 env: dict[str, str] | None = None) -> None:
        self.model, self.spans, self.workdir = model, spans, workdir
        self.env = env or {}
        self.procs: list[ServerProcess] = []

    def __enter__(self) -> Servers:
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)  # start_server_process hands the children this process's environment
        try:
            t0 = time.perf_counter()
            for i, span in enumerate(self.spans):
                boot = [self.procs[0].address] if self.procs else []
                self.procs.append(start_server_process(self.model, span, identity=self.workdir / f"server{i}.key",
                                                       bootstrap=boot))
                print(f"  {self.procs[-1].ready_line}", flush=True)
            print(f"  {len(self.procs)} servers ready in {time.perf_counter() - t0:.1f} s", flush=True)
        except BaseException:
            self.stop()
            raise
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.procs]

    def stop(self) -> None:
        codes = [p.stop(timeout=20.0) for p in self.procs]
        if codes:
            print(f"  servers stopped (SIGTERM), exit codes {codes}", flush=True)
        self.procs.clear()


async def _relay_runs(addresses: Sequence[str], model: str, prompt: str | list[int], n: int, *, repeats: int,
                      relays: Sequence[str], connect_kwargs: dict, local: Callable[[], Run],
                      extra: Callable[[], Run] | None, chat: bool = False, profile: int = 0
                      ) -> tuple[dict[str, list[Run]], list[Run], list[Run], dict[str, list[dict[str, float]]]]:
    """Warm up, then alternate the relays' runs (one client per relay mode), local (and
    ``extra``) runs; local ones in a worker thread so the clients' trio services stay
    responsive."""
    runs: dict[str, list[Run]] = {r: [] for r in relays}
    waits: dict[str, list[dict[str, float]]] = {r: [] for r in relays}
    base: list[Run] = []
    more: list[Run] = []
    async with trio.open_nursery() as nursery:
        swarms = {r: await Swarm.connect(nursery, bootstrap=list(addresses), model=model, relay=r, **connect_kwargs)
                  for r in relays}

        async def one(relay: str, tokens: int) -> Run:
            result = await swarms[relay].generate(prompt, max_new_tokens=tokens, chat=chat)
            steps = max(len(result.token_ids), 1)
            waits[relay].append({peer: seconds / steps for peer, seconds in result.hop_latency.items()})
            return Run(tokens=result.token_ids, ttft=result.time_to_first_token, total=result.total_seconds,
                       pushed=result.pushed_steps)

        for relay in relays:
            await one(relay, min(n, 8))  # warm-up: routing, connections, sessions, kernels
        await trio.to_thread.run_sync(local)
        if extra is not None:
            await trio.to_thread.run_sync(extra)
        for w in waits.values():
            w.clear()
        for _ in range(repeats):
            for relay in relays:
                runs[relay].append(await one(relay, n))
            base.append(await trio.to_thread.run_sync(local))
            if extra is not None:
                more.append(await trio.to_thread.run_sync(extra))
        if profile:
            relay = relays[-1]
            profiler = cProfile.Profile()
            profiler.enable()
            run = await one(relay, n)
            profiler.disable()
            waits[relay].pop()
            print_profile(profiler, f"one {relay} generation, client process ({run.steps_per_second:.1f} steps/s "
                          f"under the profiler)", profile)
        for swarm in swarms.values():
            await swarm.aclose()
    return runs, base, more, waits


def print_profile(profiler: cProfile.Profile, title: str, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for order in ("tottime", "cumulative"):
        out.seek(0)
        out.truncate()
        stats.sort_stats(order).print_stats(top)
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"  cProfile of {title}, top {top} by {order} (seconds):")
        print("\n".join(lines[start:]).rstrip(), flush=True)


def _median(runs: Sequence[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def _row(name: str, runs: Sequence[Run]) -> str:
    steps = ", ".join(f"{r.steps_per_second:.1f}" for r in runs)
    return (f"  {name:28s} {_median(runs, 'tokens_per_second'):8.2f} tok/s  {_median(runs, 'steps_per_second'):8.2f} "
            f"steps/s  TTFT {_median(runs, 'ttft') * 1e3:6.0f} ms   (steps/s of each run: {steps})")


def _report(relays: dict[str, list[Run]], local: list[Run], extra: list[Run],
            waits: dict[str, list[dict[str, float]]], extra_name: str) -> None:
    print("  median over runs:           whole call        decode after 1st token")
    for name, runs in relays.items():
        print(_row(f"{name} relay (servers)", runs))
    print(_row("transformers generate", local))
    if extra:
        print(_row(extra_name, extra))
    l_tps, l_sps = _median(local, "tokens_per_second"), _median(local, "steps_per_second")
    for name, runs in relays.items():
        r_tps, r_sps = _median(runs, "tokens_per_second"), _median(runs, "steps_per_second")
        print(f"  {name} / local: {r_tps / l_tps:.3f}x tokens/s (whole call), {r_sps / l_sps:.3f}x decode steps/s; "
              f"TTFT {(_median(runs, 'ttft') - _median(local, 'ttft')) * 1e3:+.0f} ms")
        if extra:
            e_tps, e_sps = _median(extra, "tokens_per_second"), _median(extra, "steps_per_second")
            print(f"  {name} / {extra_name}: {r_tps / e_tps:.3f}x tokens/s, {r_sps / e_sps:.3f}x steps/s;  "
                  f"{extra_name} / local: {e_tps / l_tps:.3f}x tokens/s")
        if name == "push":
            print(f"  push: steps that went around the chain by push: {runs[0].pushed} of {len(runs[0].tokens)}")
        hop_waits = waits.get(name) or []
        if hop_waits and name == "star":
            per_hop = {peer: statistics.median(w.get(peer, 0.0) for w in hop_waits) for peer in hop_waits[0]}
            step = 1 / r_sps if r_sps else float("nan")
            hops = sum(per_hop.values())
            print(f"  per star step: {step * 1e3:.2f} ms, of which waiting on hops {hops * 1e3:.2f} ms "
                  f"({', '.join(f'{v * 1e3:.2f}' for v in per_hop.values())} ms; server compute + network + "
                  f"protocol), client side {(step - hops) * 1e3:.2f} ms (hop waits are per token including the "
                  f"prefill)")
    if "star" in relays and "push" in relays:
        ratio = _median(relays["push"], "steps_per_second") / _median(relays["star"], "steps_per_second")
        print(f"  push / star: {ratio:.3f}x decode steps/s")
    same = all(r.tokens == b.tokens[: len(r.tokens)] for runs in relays.values() for r, b in zip(runs, local))
    agree = len({tuple(runs[0].tokens) for runs in relays.values()}) == 1
    print(f"  tokens identical to transformers: {same}; relays agree with each other: {agree} "
          f"({len(local[0].tokens)} tokens)")


# -- the parts ------------------------------------------------------------------------------


def part_smollm(args: argparse.Namespace, connect_kwargs: dict) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import peer.runtime as rt
    from peer.runtime._sources import builtin_gguf_path

    model_name = rt.DEFAULT_MODEL
    n = args.smollm_tokens
    print(f"\n== smollm: {model_name} fp32, spans {list(SMOLLM_SPANS)}, {n} new tokens, greedy, "
          f"load average {load_average()}", flush=True)
    path = builtin_gguf_path(model_name)
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's own progress bar
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = rt.load_head(model_name).encode_prompt(PROMPT, chat=False)
    print(f"  prompt: {PROMPT!r} ({len(ids)} tokens); torch threads here {torch.get_num_threads()}", flush=True)
    chain = inprocess_chain(model_name, SMOLLM_SPANS, ids, n) if args.inprocess else None
    with tempfile.TemporaryDirectory(prefix="swarm-bench-e2e-") as tmp, \
            Servers(model_name, SMOLLM_SPANS, Path(tmp), env=args.server_env) as servers:
        relays, local, extra, waits = trio.run(
            lambda: _relay_runs(servers.addresses, model_name, PROMPT, n, repeats=args.repeats, relays=args.relays,
                                connect_kwargs=connect_kwargs, local=lambda: local_generate(model, ids, n),
                                extra=chain, profile=args.profile))
    _report(relays, local, extra, waits, "in-process 3-span chain")
    for name, runs in relays.items():
        ratio = _median(runs, "tokens_per_second") / _median(local, "tokens_per_second")
        print(f"  target (issue 14, section 6): {name} relay >= 0.95x local: {ratio:.3f}x", flush=True)
    print(f"  load average {load_average()}", flush=True)


def make_tiny(path: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(path)  # safetensors
    return model


def part_tiny(args: argparse.Namespace, connect_kwargs: dict) -> None:
    n = args.tiny_tokens
    print(f"\n== tiny: random Llama (4 layers, hidden 256, intermediate 688, 4 heads, vocab 1000, fp32), "
          f"spans {list(TINY_SPANS)}, {n} new tokens, load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="swarm-bench-tiny-") as tmp:
        path = Path(tmp) / "tiny-llama"
        model = make_tiny(path)
        old_cache = os.environ.get("SWARM_PEER_CACHE")
        os.environ["SWARM_PEER_CACHE"] = str(Path(tmp) / "cache")  # throwaway digests, for the servers too
        try:
            with Servers(str(path), TINY_SPANS, Path(tmp), env=args.server_env) as servers:
                relays, local, _, waits = trio.run(
                    lambda: _relay_runs(servers.addresses, str(path), TINY_PROMPT, n, repeats=args.repeats,
                                        relays=args.relays, connect_kwargs=connect_kwargs,
                                        local=lambda: local_generate(model, TINY_PROMPT, n), extra=None,
                                        profile=args.profile))
        finally:
            if old_cache is None:
                os.environ.pop("SWARM_PEER_CACHE", None)
            else:
                os.environ["SWARM_PEER_CACHE"] = old_cache
    _report(relays, local, [], waits, "")
    for name, runs in relays.items():
        steps = _median(runs, "steps_per_second")
        print(f"  target (issue 14, section 6): {name} relay >= 250 decode steps/s and >= 0.8x local: {steps:.1f} "
              f"({steps / _median(local, 'steps_per_second'):.2f}x local; Petals: {PETALS_STEPS} steps/s)",
              flush=True)
    print(f"  load average {load_average()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("smollm", "tiny", "all"), default="all")
    parser.add_argument("--smollm-tokens", type=int, default=48)
    parser.add_argument("--tiny-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each (after one warm-up)")
    parser.add_argument("--relay", choices=("star", "push", "both"), default="both",
                        help="how the client relays: star, server-to-server push, or both (alternating)")
    parser.add_argument("--wire-dtype", default="f32", choices=("f32", "f16", "bf16"),
                        help="hidden states on the wire (Swarm.connect's default: f32, lossless)")
    parser.add_argument("--audit", type=float, default=0.0,
                        help="share of hop-steps audited (0: none, the fast path; the API's default is 0.05)")
    parser.add_argument("--no-inprocess", dest="inprocess", action="store_false",
                        help="smollm: skip the in-process 3-span chain")
    parser.add_argument("--threads", type=int,
                        help="torch threads here and in the servers (OMP_NUM_THREADS); default: torch's (one "
                             "per core). On an oversubscribed machine 1 avoids OpenMP barrier stalls")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also cProfile one relay generation in this (the client) process; print TOP rows")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the server processes (e.g. OMP_NUM_THREADS=1); repeatable")
    args = parser.parse_args()
    args.server_env = dict(item.partition("=")[::2] for item in args.server_env)
    args.relays = ["star", "push"] if args.relay == "both" else [args.relay]
    if args.threads:
        torch.set_num_threads(args.threads)
        args.server_env = {"OMP_NUM_THREADS": str(args.threads), **args.server_env}
    # SIGTERM becomes SystemExit, so the servers' finally-blocks stop them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    connect_kwargs = dict(wire_dtype=args.wire_dtype, audit=args.audit or None)
    env = " ".join(f"{k}={v}" for k, v in args.server_env.items()) or "inherited"
    print(f"e2e relay bench: relay {args.relay}, wire {args.wire_dtype}, audit {args.audit}, repeats {args.repeats}, torch threads "
          f"{torch.get_num_threads()}, server env {env}, "
          f"cpus {os.cpu_count()}, load average {load_average()}", flush=True)
    if args.part in ("smollm", "all"):
        part_smollm(args, connect_kwargs)
    if args.part in ("tiny", "all"):
        part_tiny(args, connect_kwargs)


if __name__ == "__main__":
    main()
