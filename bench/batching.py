"""Batching across sessions: one server process, 1, 4, 8 and 16 clients generating at once.

One ``swarm-peer serve`` process holds the whole model (``--threads 1`` by default: the
setting of DESIGN.md's probe). In the same run, for each concurrency N, N clients in
client processes (each client a ``peer.api.Swarm`` of its own identity, greedy,
prompts of different lengths so that the sessions sit at different positions;
``--client-processes K`` spreads them over K processes, see ``Clients``) generate at
once, and the bench prints:

- aggregate decode tokens/s over the window in which all N sessions were decoding
  (from the last session's first token to the first session's last token);
- per-session step latency (the time between a session's consecutive tokens, as its
  client sees it) p50 and p95 over all sessions' steps in that window;
- the ratios of both to the lone session (N = 1), and whether every client's greedy
  tokens start with the ``--check-tokens`` it got generating alone (they must).

A first part (``compute``) times the server's side alone, in this process: the span's
``forward_batch`` of B decode steps of sessions at different positions, B = 1, 4, 8, 16
(one thread), as decode tokens/s and step time against B = 1: what batching buys the
server, without the clients' own costs (on a 2-core machine the clients of the second
part share the cores with the server).

With ``--baseline`` a second server with ``--max-batch 1`` (no batching, same credit
scheduler) runs the largest N too, the same run. Goal (issue 16): >= 3x aggregate at 16
sessions with p95 step latency <= 2.5x of a lone session.

The default model is ``smollm2-shape``: SmolLM2-135M's decoder shapes (30 layers,
hidden 576, intermediate 1536, 9 heads, 3 KV heads) with random weights and a
1000-token vocabulary, built from its config in a temp dir: the server computes what
SmolLM2's server computes, while the clients' heads (all in this process) stay cheap;
with SmolLM2's own 49,152-token head, 16 clients on a 2-core machine spend more time in
their heads than the server in its blocks and measure the clients. ``--model
smollm2-135m-instruct`` (or any model) runs the real one.

Run: ``.venv/bin/python bench/batching.py [--part compute|swarm|all] [--model smollm2-shape] [--clients 1,4,8,16]
[--tokens 48] [--threads 1] [--max-batch 16] [--client-processes 1] [--baseline]``. The machine may be shared:
the load average is printed; compare ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import trio

from peer.api import Swarm
from peer._heap import freeze_loaded_heap
from peer.demo import start_server_process

SHAPE = dict(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, rope_theta=100000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


@dataclass(slots=True)
class Session:
    tokens: list[int]
    stamps: list[float]  # perf_counter at each token


@dataclass(frozen=True, slots=True)
class Level:
    clients: int
    tokens_per_second: float
    p50: float
    p95: float
    same_tokens: bool
    batched: str


def make_shape_model(root: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = root / "smollm2-shape"
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path)
    return str(path)


def prompt(i: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(3, vocab, (6 + 3 * i,), generator=g).tolist()


async def generate_all(swarms: Sequence[Swarm], prompts: Sequence[list[int]], n: int) -> list[Session]:
    sessions = [Session([], []) for _ in swarms]

    async def one(i: int) -> None:
        def note(event: object) -> None:
            sessions[i].stamps.append(time.perf_counter())

        result = await swarms[i].generate(prompts[i], max_new_tokens=n, chat=False, on_token=note)
        sessions[i].tokens = result.token_ids

    async with trio.open_nursery() as nursery:
        for i in range(len(swarms)):
            nursery.start_soon(one, i)
    return sessions


def measure(sessions: Sequence[Session]) -> tuple[float, list[float]]:
    """Aggregate tokens/s and the step latencies inside the window where all decoded."""
    start = max(s.stamps[0] for s in sessions)
    end = min(s.stamps[-1] for s in sessions)
    if len(sessions) == 1 or end <= start:  # one session: its whole decode
        start, end = min(s.stamps[0] for s in sessions), max(s.stamps[-1] for s in sessions)
    count, gaps = 0, []
    for s in sessions:
        for a, b in zip(s.stamps, s.stamps[1:]):
            if start < b <= end:
                count += 1
                # A step that began before the window waited on the prefills of the
                # sessions still starting, which the window leaves out.
                if start <= a:
                    gaps.append(b - a)
    return count / (end - start), gaps


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def client_worker(conn: Connection, address: str, model: str, indices: Sequence[int], vocab: int) -> None:
    """One client process: a ``Swarm`` per client index, generating what ``conn`` asks for."""
    async with trio.open_nursery() as nursery:
        # audit=None: each client would settle its probation audits of the (new to it)
        # server on its own copy of the span, a full forward per audited step; here all
        # clients share the server's two cores, so that would measure the clients.
        swarms = {i: await Swarm.connect(nursery, bootstrap=[address], model=model, audit=None) for i in indices}
        conn.send("ready")
        while True:
            command, *args = await trio.to_thread.run_sync(conn.recv)
            if command == "stop":
                break
            if command == "freeze":  # as the command line's clients do: no full collection of all that mid-measurement
                freeze_loaded_heap()
                conn.send(None)
                continue
            which, n = args
            sessions = await generate_all([swarms[i] for i in which], [prompt(i, vocab) for i in which], n)
            conn.send([(i, s.tokens, s.stamps) for i, s in zip(which, sessions)])
        for swarm in swarms.values():
            await swarm.aclose()
        nursery.cancel_scope.cancel()


def client_process(conn: Connection, address: str, model: str, indices: Sequence[int], vocab: int) -> None:
    torch.set_num_threads(1)  # the clients' heads: leave the other cores to the server
    trio.run(client_worker, conn, address, model, indices, vocab)


class Clients:
    """``top`` clients spread over ``processes`` processes, client i in process i % processes.

    Real clients of a server are separate machines; in one process, the clients' own
    per-token work (head, signatures, framing: ~2.5 ms a token measured with SmolLM2's
    shapes) runs one client after another, and at 16 clients the server waits 10-40 ms
    for the last step of each batch. Several processes let the clients' work overlap,
    as far as the machine's cores allow: on a 2-core machine, where the server's compute
    thread takes one core, 2 or 4 processes did not lower p95 (runs of 1, 2 and 4
    alternating: 3.0-5.8x lone with each), hence the default of 1. Stamps are
    ``time.perf_counter``, the system's monotonic clock, comparable across processes.
    """

    def __init__(self, address: str, model: str, top: int, vocab: int, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.owner: dict[int, Connection] = {}
        self.procs = []
        for k in range(min(processes, top)):
            here, there = ctx.Pipe()
            indices = list(range(k, top, processes))
            proc = ctx.Process(target=client_process, args=(there, address, model, indices, vocab), daemon=True)
            proc.start()
            self.procs.append((proc, here))
            self.owner.update({i: here for i in indices})
        for _, conn in self.procs:
            if conn.recv() != "ready":
                raise RuntimeError("a client process did not start")

    def generate(self, which: Sequence[int], n: int) -> list[Session]:
        asked = [(conn, [i for i in which if self.owner[i] is conn]) for _, conn in self.procs]
        for conn, mine in asked:  # every process starts before any is waited on
            if mine:
                conn.send(("generate", mine, n))
        got = {}
        for conn, mine in asked:
            if mine:
                got.update({i: Session(tokens, stamps) for i, tokens, stamps in conn.recv()})
        return [got[i] for i in which]

    def freeze(self) -> None:
        for _, conn in self.procs:
            conn.send(("freeze",))
        for _, conn in self.procs:
            conn.recv()

    def close(self) -> None:
        for proc, conn in self.procs:
            conn.send(("stop",))
        for proc, _ in self.procs:
            proc.join(timeout=30)


def run_levels(address: str, model: str, levels: Sequence[int], n: int, vocab: int, check: int,
               processes: int) -> list[Level]:
    out: list[Level] = []
    top = max(levels)
    clients = Clients(address, model, top, vocab, processes)
    try:
        for k in range(len(clients.procs)):
            clients.generate([k], 4)  # warm-up: routes, connections, kernels
        alone = [clients.generate([i], check)[0].tokens for i in range(top)]  # each client's first tokens, alone
        clients.freeze()
        for level in levels:
            sessions = clients.generate(range(level), n)
            rate, gaps = measure(sessions)
            same = all(s.tokens[:check] == alone[i] for i, s in enumerate(sessions))
            out.append(Level(level, rate, percentile(gaps, 0.5), percentile(gaps, 0.95), same, ""))
            print(f"  {level:2d} clients: {rate:7.2f} tok/s aggregate, step p50 {out[-1].p50 * 1e3:7.1f} ms, "
                  f"p95 {out[-1].p95 * 1e3:7.1f} ms, tokens as alone: {same}   (load {load_average()})", flush=True)
    finally:
        clients.close()
    return out


def table(levels: Sequence[Level], title: str) -> None:
    lone = levels[0]
    print(f"\n{title}")
    print("  clients | aggregate tok/s | x lone | step p50 ms | step p95 ms | p95 x lone | tokens as alone")
    for lv in levels:
        print(f"  {lv.clients:7d} | {lv.tokens_per_second:15.2f} | {lv.tokens_per_second / lone.tokens_per_second:6.2f} "
              f"| {lv.p50 * 1e3:11.1f} | {lv.p95 * 1e3:11.1f} | {lv.p95 / lone.p95:10.2f} | {lv.same_tokens}")


def compute_part(model: str, blocks: int, sizes: Sequence[int], threads: int, repeats: int = 7) -> None:
    """``forward_batch`` alone: B sessions at different positions, one decode step each;
    the sizes take turns, so that a shared machine's load falls on all of them alike."""
    from peer.runtime import load_span

    torch.set_num_threads(threads)
    ex = load_span(model, 0, blocks)
    g = torch.Generator().manual_seed(0)
    groups = {}
    for size in sizes:
        groups[size] = [ex.open_session(256) for _ in range(size)]
        for i, sid in enumerate(groups[size]):
            ex.forward(sid, torch.randn(1, 6 + 3 * i, ex.hidden_size, generator=g), 0)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for r in range(repeats + 1):
        for size, sids in groups.items():
            steps = [ex.check_step(sid, torch.randn(1, 1, ex.hidden_size, generator=g), ex.session_length(sid))
                     for sid in sids]
            t0 = time.perf_counter()
            ex.forward_batch(steps)
            if r:  # the first round warms up
                times[size].append(time.perf_counter() - t0)
    print(f"\nserver compute alone (forward_batch, {blocks} blocks, {threads} thread(s); median and min of "
          f"{repeats}; load {load_average()})")
    print("  batch | step ms (median, min) | x lone step | decode tok/s | x lone tok/s (median, min)")
    lone, lone_min = statistics.median(times[sizes[0]]), min(times[sizes[0]])
    for size in sizes:
        step, fastest = statistics.median(times[size]), min(times[size])
        print(f"  {size:5d} | {step * 1e3:9.1f} {fastest * 1e3:9.1f} | {step / lone:11.2f} | {size / step:12.2f} | "
              f"{size * lone / step:12.2f} {size * lone_min / fastest:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["compute", "swarm", "all"], default="all")
    parser.add_argument("--model", default="smollm2-shape")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--check-tokens", type=int, default=8,
                        help="tokens each client first generates alone, to compare with")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the clients are spread over (1: all in one, one after another)")
    parser.add_argument("--baseline", action="store_true", help="also run the largest N with --max-batch 1")
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    if levels[0] != 1:
        levels = [1, *levels]
    torch.set_num_threads(1)  # the clients' heads: leave the other cores to the server
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        root = Path(tmp)
        model = make_shape_model(root) if args.model == "smollm2-shape" else args.model
        from peer.runtime import load_head

        head = load_head(model)
        blocks, vocab = head.num_blocks, head.vocab_size
        del head
        print(f"model {args.model}: {blocks} blocks; server --threads {args.threads}; {args.tokens} tokens per client; "
              f"load {load_average()}; {os.cpu_count()} cores", flush=True)
        if args.part in ("compute", "all"):
            compute_part(model, blocks, levels, args.threads)
            torch.set_num_threads(1)
        if args.part == "compute":
            return
        common = ["--threads", str(args.threads), "--max-sessions", str(max(levels))]
        results = {}
        runs = [("batched", args.max_batch, levels)]
        if args.baseline:
            runs.append(("unbatched", 1, [1, max(levels)]))
        for name, max_batch, which in runs:
            print(f"server --max-batch {max_batch}:", flush=True)
            server = start_server_process(model, (0, blocks), identity=root / f"{name}.key",
                                          extra=[*common, "--max-batch", str(max_batch)])
            try:
                print(f"  {server.ready_line}", flush=True)
                results[name] = run_levels(server.address, model, which, args.tokens, vocab, args.check_tokens,
                                           args.client_processes)
            finally:
                print(f"  server stopped (SIGTERM), exit code {server.stop(timeout=20.0)}", flush=True)
        table(results["batched"], f"--max-batch {args.max_batch} (batching across sessions)")
        if "unbatched" in results:
            table(results["unbatched"], "--max-batch 1 (no batching, same scheduler)")
            top_b, top_u = results["batched"][-1], results["unbatched"][-1]
            print(f"\n  at {top_b.clients} clients: batched / unbatched = "
                  f"{top_b.tokens_per_second / top_u.tokens_per_second:.2f}x aggregate tok/s")
        top, lone = results["batched"][-1], results["batched"][0]
        print(f"\ngoal at 16 sessions: >= 3x aggregate (got {top.tokens_per_second / lone.tokens_per_second:.2f}x), "
              f"p95 step latency <= 2.5x lone (got {top.p95 / lone.p95:.2f}x)")


if __name__ == "__main__":
    main()
