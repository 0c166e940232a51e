"""Availability under churn (issue 12): real `swarm-peer serve` processes on loopback, a
fault schedule drawn from a seed, and a no-fault baseline in the same run.

A tiny random Llama (6 layers) built from its config and saved as safetensors in a temp
dir is served by 7 processes, 2-3 replicas of each span: by default (``--layout
tiles``) blocks 0:2 and 4:6 twice and 2:4 three times, so every route has three hops
whatever is down and the throughput ratio measures what faults cost, not which route
shapes they leave; ``--layout mixed`` serves 0:2, 2:4 and 4:6 twice and 0:6 once (2-3
replicas of every block, but a single one of the one-hop route: while it is down every
generation takes three hops, several times slower on this relay, and the ratio mostly
measures that). ``--clients`` clients in this process generate
``--tokens`` tokens greedily in a loop; every result is compared with
``transformers`` generate. Scenarios, each ``--duration`` seconds with fresh clients:

* ``baseline``: no faults;
* ``churn``: every 4-7 s a server is killed (kill -9 and SIGTERM in turn, the server
  drawn by the seed) and restarted 8-12 s later on the same identity and port, only
  when every block keeps a live replica (a fault is skipped, and counted, when a slow
  restart would break that). A restarted server loads in the idle scheduling class until
  it is ready (``--normal-priority-restarts`` to not): in a swarm it loads on its own
  machine, here its imports and throughput measurement would take the two cores from
  the clients and servers being measured;
* ``loads``: no faults, but churn's restarts: at each time the churn scenario restarts
  a server, a server of the same span starts in a swarm of its own (nobody routes to
  it) the same way and is killed once ready. A control: churn against it is what the
  faults cost, it against the baseline what restarts on the same two cores cost;
* ``stop``: a server is SIGSTOPped for 15 s (the widest span first when it is alone
  in being widest, as 0:6 of ``mixed``: every client routes through it), then
  SIGCONTed, one at a time;
* ``outage``: every server of one block is killed for 20 s (those generations are
  expected to fail fast with NoRoute naming the block), then restarted.

Per scenario it prints generations attempted / completed / failed by error type,
tokens identical, failovers and hedges, p50/p95 latency of completed generations,
throughput (completed tokens per second) against the baseline, sessions leaked after a
quiet period (a fresh peer opens sessions on every server until BUSY: the server's
``--max-sessions`` less what it got), for the dead peers: how often a client failed
on a peer it had already backed off (should be 0) and how long after a fault the
clients stopped trying it, and how long until it left the view of an observer that
never used it (``-`` when it came back first). A client that failed waits 0.2 s
before its next try (a failing loop would only spin).

Run: ``.venv/bin/python bench/churn.py [--seed 1] [--duration 60] [--clients 3]
[--tokens 64] [--scenarios baseline,churn,loads,stop,outage] [--layout tiles|mixed]``. Goals (issue 12): under
churn throughput >= 0.8x baseline and >= 99% of generations complete; 0 wrong tokens;
0 leaked sessions; 0 retries within a backoff; NoRoute naming the blocks in an outage.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import trio

from peer.api import Swarm
from peer._heap import freeze_loaded_heap
from swarm.announce import SwarmView
from peer.demo import DemoError, launch_server_process, wait_ready
from peer.server import ServerLimits
from protocol import CloseSession, OpenSession, SessionOpened
from protocol.errors import ErrorCode, RemoteError
from swarm.errors import SwarmError
from swarm.transport import PeerConnection

LAYERS = 6
LAYOUTS = {
    "tiles": ((0, 2), (0, 2), (2, 4), (2, 4), (2, 4), (4, 6), (4, 6)),
    "mixed": ((0, 2), (0, 2), (2, 4), (2, 4), (4, 6), (4, 6), (0, 6)),
}
SPANS = LAYOUTS["tiles"]
PROMPT = [1, 5, 9, 33, 7, 250, 12, 99]
MAX_SESSIONS = 8
RESTART = 10.0  # a restarted server counts as down this much longer (it loads first)
QUIET = 3.0  # seconds after a scenario before sessions are counted
RETRY_PAUSE = 0.2


# -- the fault schedule (pure: a seed and the layout in, faults out) -----------------------

@dataclass(frozen=True, slots=True)
class Fault:
    at: float  # seconds into the scenario
    kind: str  # "kill" (-9), "term" (SIGTERM), "stop" (SIGSTOP, then SIGCONT) or "load" (a server aside)
    servers: tuple[int, ...]
    duration: float  # until the restart (or SIGCONT)


def covered(spans: tuple[tuple[int, int], ...], up: set[int], layers: int = LAYERS) -> bool:
    return all(any(spans[i][0] <= b < spans[i][1] for i in up) for b in range(layers))


def schedule(kind: str, rng: random.Random, duration: float, spans: tuple[tuple[int, int], ...] = SPANS,
             layers: int = LAYERS) -> list[Fault]:
    """The faults of scenario ``kind``, drawn from ``rng``."""
    everyone = set(range(len(spans)))
    faults: list[Fault] = []
    if kind == "churn":
        t = rng.uniform(4, 7)
        while t < duration - 1:
            up = {i for i in everyone if not any(i in f.servers and f.at + f.duration + RESTART > t for f in faults)}
            choices = sorted(i for i in up if covered(spans, up - {i}, layers))
            if choices:  # kill -9 and SIGTERM take turns: every run has both (a seed once drew only SIGTERM)
                how = ("kill", "term")[len(faults) % 2]
                faults.append(Fault(t, how, (rng.choice(choices),), rng.uniform(8, 12)))
            t += rng.uniform(4, 7)
    elif kind == "stop":
        order = sorted(everyone)
        rng.shuffle(order)
        widths = [b - a for a, b in spans]
        if widths.count(max(widths)) == 1:
            order.remove(widest := widths.index(max(widths)))
            order.insert(0, widest)
        t = rng.uniform(2, 4)
        for i in order:
            if t + 15 > duration:
                break
            faults.append(Fault(t, "stop", (i,), 15.0))
            t += 15 + rng.uniform(2, 5)
    elif kind == "loads":  # churn's restarts without its faults: what they cost the shared cores
        return [Fault(f.at + f.duration, "load", f.servers, 0.0) for f in schedule("churn", rng, duration, spans, layers)]
    elif kind == "outage":
        block = rng.randrange(layers)
        faults.append(Fault(rng.uniform(2, 4), "kill", tuple(i for i in sorted(everyone)
                                                             if spans[i][0] <= block < spans[i][1]), 20.0))
    elif kind != "baseline":
        raise ValueError(f"unknown scenario {kind!r}")
    return faults


# -- the servers -----------------------------------------------------------------------------

@dataclass(slots=True)
class Server:
    span: tuple[int, int]
    key: Path
    port: int
    proc: subprocess.Popen[str] | None = None
    peer_id: bytes = b""
    address: str = ""
    up: bool = False  # ready, and not faulted since

    def launch(self, model: str, bootstrap: list[str], *, low_priority: bool = False) -> None:
        with open(self.key.with_suffix(".log"), "a") as log:  # why a (re)start failed, if one does
            self.proc = launch_server_process(model, self.span, identity=self.key, bootstrap=bootstrap,
                                              extra=["--threads", "1", "--port", str(self.port),
                                                     "--max-sessions", str(MAX_SESSIONS)], stderr=log)
        if low_priority:
            # A restart loads (imports, weights, its throughput measurement) in the
            # background: in a swarm it loads on its own machine, here it would take the
            # two cores from the clients and servers being measured. ``ready`` restores it.
            _background(self.proc.pid, True)

    def ready(self) -> None:
        assert self.proc is not None
        try:
            ready = wait_ready(self.proc, timeout=300)
        except DemoError:
            print(self.key.with_suffix(".log").read_text()[-2000:])
            raise
        self.address = ready.address
        self.peer_id = bytes.fromhex(ready.ready_line.split("(peer ", 1)[1].split(",", 1)[0])
        _background(self.proc.pid, False)  # every thread it started meanwhile (needs root; else it stays)
        self.up = True

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def _background(pid: int, on: bool) -> None:
    """Put every thread of ``pid`` in the idle scheduling class (it runs only on a core
    nobody else wants: not even nice 19 keeps a restart's ~5 s of imports and loading
    off the two cores here), or back in the normal one. Linux schedules threads, and
    the ones a thread starts inherit its class."""
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    policy = os.SCHED_IDLE if on else os.SCHED_OTHER
    for tid in threads:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 19 if on else 0)
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one scenario ------------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    attempted: int = 0
    completed: int = 0
    identical: int = 0
    tokens: int = 0
    failovers: int = 0
    hedges: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    by_hops: dict[int, list[float]] = field(default_factory=dict)  # latencies by the route's final hop count
    fail_latencies: list[float] = field(default_factory=list)
    failures: list[tuple[int, bytes, float, bool]] = field(default_factory=list)  # client, peer, t, backed off
    left_view: list[float | None] = field(default_factory=list)
    stopped_trying: list[float] = field(default_factory=list)
    leaked: int = 0
    seconds: float = 0.0
    faults: Counter = field(default_factory=Counter)  # applied, by kind
    skipped: int = 0  # faults not applied: they would have left a block without a ready server


def watch_failures(swarm: Swarm, client: int, out: Outcome, t0: float) -> None:
    """Record every failure the client's health hears of, and whether the peer was
    already backed off (a retry within its backoff) when it happened."""
    health = swarm.client.health
    failed = health.failed

    def recording(peer: bytes, now: float, *, retry_after: float | None = None, reason: str = "") -> float:
        out.failures.append((client, peer, now - t0, health.backed_off(peer, now) and retry_after is None))
        return failed(peer, now, retry_after=retry_after, reason=reason)

    health.failed = recording  # type: ignore[method-assign]


async def generate_loop(swarm: Swarm, want: list[int], tokens: int, t0: float, until: float, out: Outcome) -> None:
    """Generate until ``until``; ``out.seconds`` is how long the loops ran (the last one
    ends after ``until``), the time throughput is counted over (not the restarts after)."""
    while trio.current_time() < until:
        out.attempted += 1
        t = trio.current_time()
        try:
            result = await swarm.generate(PROMPT, max_new_tokens=tokens)
        except SwarmError as exc:
            out.errors[type(exc).__name__ + ("" if "NoRoute" not in type(exc).__name__ else
                                             f" ({str(exc).split('blocks ', 1)[-1].split()[0]})")] += 1
            out.fail_latencies.append(trio.current_time() - t)
            await trio.sleep(RETRY_PAUSE)
            out.seconds = max(out.seconds, trio.current_time() - t0)
            continue
        out.completed += 1
        out.identical += result.token_ids == want
        out.tokens += len(result.token_ids)
        out.failovers += result.failovers
        out.hedges += result.hedges
        out.latencies.append(trio.current_time() - t)
        out.by_hops.setdefault(len(result.route), []).append(out.latencies[-1])
        out.seconds = max(out.seconds, trio.current_time() - t0)


async def apply_fault(fault: Fault, servers: list[Server], model: str, t0: float,
                      observer: ViewWatch, out: Outcome, *, keep_covered: bool, low_priority: bool) -> None:
    """Apply ``fault`` at its time; with ``keep_covered``, only if the servers up then
    (ready, not faulted) still cover every block without the ones it hits: the schedule
    assumes a restart takes RESTART seconds, and on a loaded machine it takes longer."""
    await trio.sleep_until(t0 + fault.at)
    if fault.kind == "load":
        out.faults["load"] += 1
        await load_aside(servers[fault.servers[0]], model, out.faults["load"], low_priority)
        return
    hit = [servers[i] for i in fault.servers]
    up = {i for i, s in enumerate(servers) if s.up}
    spans = tuple(s.span for s in servers)
    if not all(s.up for s in hit) or (keep_covered and not covered(spans, up - set(fault.servers))):
        out.skipped += 1
        return
    out.faults[fault.kind] += 1
    for s in hit:
        s.up = False
        if fault.kind == "kill":
            s.kill()
        else:
            s.signal(signal.SIGTERM if fault.kind == "term" else signal.SIGSTOP)
    faulted = trio.current_time()
    async with trio.open_nursery() as nursery:
        for s in hit:
            nursery.start_soon(watch_view, observer, s.peer_id, faulted, faulted + fault.duration, out)
        await trio.sleep_until(faulted + fault.duration)
        for s in hit:
            if fault.kind == "stop":
                s.signal(signal.SIGCONT)
                s.up = True
                continue
            assert s.proc is not None
            await trio.to_thread.run_sync(s.proc.wait)  # a SIGTERMed server withdraws first
            # Every other server bootstraps it: the first one may be the one down now.
            s.launch(model, [o.address for o in servers if o is not s], low_priority=low_priority)
            nursery.start_soon(trio.to_thread.run_sync, s.ready)
    for s in hit:  # when the clients last failed on it during the fault, after it began
        times = [t for _, peer, t, _ in out.failures
                 if peer == s.peer_id and faulted - t0 <= t <= faulted - t0 + fault.duration]
        if times:
            out.stopped_trying.append(max(times) - (faulted - t0))


async def load_aside(like: Server, model: str, n: int, low_priority: bool) -> None:
    """Start a server of ``like``'s span in a swarm of its own (no bootstrap: nobody
    routes to it) as churn restarts one, wait until it is ready and kill it: the CPU a
    restart takes from everyone else on this machine, without the fault."""
    aside = Server(like.span, like.key.with_name(f"aside{n}.key"), free_port())
    aside.launch(model, [], low_priority=low_priority)
    try:
        await trio.to_thread.run_sync(aside.ready)
    finally:
        aside.kill()


class ViewWatch:
    """One fresh view of the swarm per second while some fault is watched, shared by
    every watcher: a poll per fault (each view is a lookup of every block) would load
    the process the clients generate in, the more so the more faults overlap."""

    def __init__(self, observer: Swarm) -> None:
        self.observer = observer
        self.watching = 0
        self.wake = trio.Event()
        self.fresh = trio.Event()  # set, and replaced, on each new view
        self.view: SwarmView | None = None

    async def run(self) -> None:
        while True:
            if not self.watching:
                await self.wake.wait()
                self.wake = trio.Event()
                continue
            with trio.move_on_after(5):
                self.view = await self.observer.client.swarm_view(fresh=True)
                self.fresh.set()
                self.fresh = trio.Event()
            await trio.sleep(1.0)


async def watch_view(watch: ViewWatch, peer: bytes, since: float, until: float, out: Outcome) -> None:
    """Seconds until ``peer`` left the observer's view (None: not before it came back)."""
    watch.watching += 1
    watch.wake.set()
    try:
        with trio.move_on_at(until):
            while True:
                fresh = watch.fresh
                await fresh.wait()
                if watch.view is not None and peer not in watch.view.servers:
                    out.left_view.append(trio.current_time() - since)
                    return
        out.left_view.append(None)
    finally:
        watch.watching -= 1


async def count_leaked(observers: list[Swarm], servers: list[Server]) -> int:
    """Sessions held on every server that nobody is using: MAX_SESSIONS less what fresh
    peers can open there now (each identity up to the server's per-requester cap, so
    ``observers`` holds enough of them). The sessions opened here are closed again."""
    leaked = 0
    per_peer = ServerLimits().max_sessions_per_peer
    for s in servers:
        opened: list[tuple[PeerConnection, bytes]] = []
        try:
            for observer in observers:
                conn = await observer.client.host.connect(s.address, peer_id=s.peer_id, timeout=10)
                mine = 0
                while mine < per_peer and len(opened) < MAX_SESSIONS:
                    msg = OpenSession(model=observer.client.model, span=s.span, max_length=64)
                    try:
                        opened.append((conn, cast(SessionOpened, await conn.request(msg, timeout=10)).session))
                    except RemoteError as exc:
                        if exc.code != ErrorCode.BUSY:
                            raise
                        break
                    mine += 1
                if mine < per_peer:  # BUSY before this identity's cap: the server is full
                    break
        finally:
            for conn, session in opened:
                await conn.request(CloseSession(session=session), timeout=10)
        leaked += MAX_SESSIONS - len(opened)
    return leaked


async def run_scenario(kind: str, args: argparse.Namespace, servers: list[Server], model: str,
                       want: list[int]) -> Outcome:
    out = Outcome()
    # (loads: churn's draw, so that its loads are the churn scenario's restarts)
    draw = random.Random(f"{args.seed}:{'churn' if kind == 'loads' else kind}")
    faults = schedule(kind, draw, args.duration, LAYOUTS[args.layout])
    async with trio.open_nursery() as nursery:
        bootstrap = [s.address for s in servers]
        clients = [await Swarm.connect(nursery, bootstrap=bootstrap, model=model, audit=None,
                                       step_timeout=args.step_timeout) for _ in range(args.clients)]
        observer = ViewWatch(await Swarm.connect(nursery, bootstrap=bootstrap, model=model, audit=None))
        nursery.start_soon(observer.run)
        counters = [await Swarm.connect(nursery, bootstrap=bootstrap, model=model, audit=None)
                    for _ in range(math.ceil(MAX_SESSIONS / ServerLimits().max_sessions_per_peer))]
        freeze_loaded_heap()  # as the command line's clients do: no full collection of the loaded heap mid-run
        t0 = trio.current_time()
        for i, c in enumerate(clients):
            watch_failures(c, i, out, t0)
        async with trio.open_nursery() as work:
            for fault in faults:
                work.start_soon(functools.partial(apply_fault, fault, servers, model, t0, observer, out,
                                                  keep_covered=kind != "outage",
                                                  low_priority=not args.normal_priority_restarts))
            for c in clients:
                work.start_soon(generate_loop, c, want, args.tokens, t0, t0 + args.duration, out)
        await trio.sleep(QUIET)
        out.leaked = await count_leaked(counters, servers)
        nursery.cancel_scope.cancel()
    return out


# -- the report --------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]:.2f}"


def report(results: dict[str, Outcome], args: argparse.Namespace) -> None:
    base = results.get("baseline")
    base_tps = base.tokens / base.seconds if base and base.seconds else None
    spans = LAYOUTS[args.layout]
    print(f"\nchurn: seed {args.seed}, {args.duration:.0f} s per scenario, {args.clients} clients x {args.tokens} "
          f"tokens, {len(spans)} servers ({args.layout}) {' '.join(f'{a}:{b}' for a, b in spans)}, "
          f"load {os.getloadavg()[0]:.1f}")
    head = (f"{'scenario':<9} {'tried':>5} {'done':>5} {'done%':>6} {'ident':>5} {'fovers':>6} {'hedges':>6} "
            f"{'p50 s':>6} {'p95 s':>6} {'tok/s':>6} {'vs base':>7} {'leaked':>6} {'re-bo':>5} "
            f"{'stop try s':>10} {'left view s':>11} {'faults':>12}  failed by error")
    print(head)
    print("-" * len(head))
    for kind, o in results.items():
        tps = o.tokens / o.seconds if o.seconds else 0.0
        ratio = f"{tps / base_tps:.2f}x" if base_tps else "-"
        left = [x for x in o.left_view if x is not None]
        left_s = (f"{statistics.median(left):.1f}" if left else "-") + f" ({len(left)}/{len(o.left_view)})"
        stop_s = f"{max(o.stopped_trying):.1f}" if o.stopped_trying else "-"
        errors = ", ".join(f"{k} {v}" for k, v in o.errors.most_common()) or "-"
        if o.fail_latencies:
            errors += f" (p50 {statistics.median(o.fail_latencies):.2f} s)"
        retried = sum(1 for *_, backed in o.failures if backed)
        faults = " ".join(f"{k}:{v}" for k, v in sorted(o.faults.items())) or "-"
        if o.skipped:
            faults += f" -{o.skipped}"
        print(f"{kind:<9} {o.attempted:>5} {o.completed:>5} {100 * o.completed / max(o.attempted, 1):>5.1f}% "
              f"{o.identical:>5} {o.failovers:>6} {o.hedges:>6} {pct(o.latencies, 0.5):>6} {pct(o.latencies, 0.95):>6} "
              f"{tps:>6.1f} {ratio:>7} {o.leaked:>6} {retried:>5} {stop_s:>10} {left_s:>11} {faults:>12}  {errors}")
    churn, loads = results.get("churn"), results.get("loads")
    if churn and loads and churn.seconds and loads.tokens:
        print(f"churn against loads (the same restarts, no faults): "
              f"{churn.tokens / churn.seconds / (loads.tokens / loads.seconds):.2f}x")
    print("completed generations by the hop count of their final route: count, p50 s")
    for kind, o in results.items():
        print(f"  {kind:<9} " + "   ".join(f"{h} hop{'s' if h > 1 else ''}: {len(v)}, {pct(v, 0.5)}"
                                          for h, v in sorted(o.by_hops.items())))
    print("ident: completed with tokens identical to transformers; fovers/hedges: summed over generations; "
          "re-bo: failures on a peer the client had backed off; stop try: the longest a client kept failing on a "
          "faulted peer after the fault; left view: median seconds until an observer's view dropped it "
          "(of the faults); faults: applied by kind, -n: skipped (it would have left a block without a ready server: "
          "restarts took longer than the schedule allows)")


async def main_async(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="churn-") as tmp:
        model_dir = Path(tmp) / "tiny"
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
        reference = LlamaForCausalLM(config).eval()
        reference.save_pretrained(model_dir)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([PROMPT]), max_new_tokens=args.tokens, do_sample=False,
                                     attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
        want = out[0, len(PROMPT):].tolist()
        model = str(model_dir)
        servers = [Server(span, Path(tmp) / f"server{i}.key", free_port()) for i, span in enumerate(LAYOUTS[args.layout])]
        try:
            servers[0].launch(model, [])
            await trio.to_thread.run_sync(servers[0].ready)
            boot = [servers[0].address]
            for s in servers[1:]:
                s.launch(model, boot)
            for s in servers[1:]:
                await trio.to_thread.run_sync(s.ready)
            print(f"{len(servers)} servers ready", flush=True)
            results: dict[str, Outcome] = {}
            for kind in args.scenarios.split(","):
                results[kind] = await run_scenario(kind, args, servers, model, want)
                o = results[kind]
                print(f"{kind}: {o.completed}/{o.attempted} completed, {o.identical} identical", flush=True)
            report(results, args)
        finally:
            for s in servers:
                s.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per scenario (>= 25 for outage)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--step-timeout", type=float, default=5.0, help="the clients' step timeout (cap)")
    parser.add_argument("--scenarios", default="baseline,churn,loads,stop,outage")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tiles",
                        help="tiles: 0:2 and 4:6 twice, 2:4 three times; mixed: 0:2, 2:4, 4:6 twice and 0:6 once")
    parser.add_argument("--normal-priority-restarts", action="store_true",
                        help="restarted servers load at normal CPU priority (default: idle class, until ready)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # so that the servers are killed on the way out
    t = time.monotonic()
    trio.run(main_async, args)
    print(f"total {time.monotonic() - t:.0f} s")


if __name__ == "__main__":
    main()
