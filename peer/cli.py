"""The ``swarm-peer`` command line: one binary for serving, generating, a demo and status.

Every expected failure prints one line starting with ``swarm-peer: error:`` and
exits non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from protocol import Identity, SwarmError, peer_id_of
from protocol.errors import swarm_error_in
from swarm.credit import Ledger

from .credit import ledger_path_for, neighbour_rows

__all__ = ["main", "default_identity_path"]

READY_PREFIX = "swarm-peer: serving"
DEFAULT_MODEL = "smollm2-135m-instruct"  # peer.runtime.DEFAULT_MODEL, without importing torch for --help


def default_identity_path() -> Path:
    """Where the identity lives unless ``--identity`` says otherwise (XDG data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "swarm-peer" / "identity.key"


# --- keygen ------------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.identity or default_identity_path())
    if path.exists() and not args.force:
        identity = Identity.load(path)
        print(f"identity exists: {path}\npeer id: {identity.peer_id.hex()}")
        return 0
    identity = Identity.generate()
    identity.save(path)
    print(f"new identity written to {path} (mode 600)\npeer id: {identity.peer_id.hex()}")
    return 0


# --- serve -------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .node import ServeOptions, parse_blocks

    options = ServeOptions(
        model=args.model, blocks=parse_blocks(args.blocks) if args.blocks else None, num_blocks=args.num_blocks,
        host=args.host, port=args.port, announce_addrs=tuple(args.announce_addr), bootstrap=tuple(args.bootstrap),
        source_addr=args.source_addr,
        device=args.device, dtype=args.dtype, quant=args.quant, max_sessions=args.max_sessions,
        cache_bytes=args.cache_bytes, compute_slots=args.compute_slots, threads=args.threads,
        ledger_path=str(ledger_path_for(args.identity or default_identity_path())))
    identity = Identity.load_or_create(args.identity or default_identity_path())
    trio.run(_serve, identity, options)
    return 0


async def _serve(identity: Identity, options: object) -> None:
    from .node import run_server

    finished = trio.Event()

    async def runner(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await run_server(identity, options, task_status=task_status, status_stream=sys.stderr)
        finally:
            finished.set()

    async with trio.open_nursery() as nursery:
        node = await nursery.start(runner)
        print(f"{READY_PREFIX} blocks {node.span[0]}:{node.span[1]} of {node.executor.model_id} at {node.address} "
              f"(peer {identity.peer_id.hex()}, {node.throughput:.1f} tok/s)", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(_watch_signals, signals, node, nursery)
            await finished.wait()
        nursery.cancel_scope.cancel()
    print("\nswarm-peer: stopped", file=sys.stderr, flush=True)


async def _watch_signals(signals: object, node: object, nursery: trio.Nursery) -> None:
    async for _ in signals:  # type: ignore[attr-defined]
        print("\nswarm-peer: shutting down: finishing in-flight steps and withdrawing the announcement "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        nursery.start_soon(node.shutdown)  # type: ignore[attr-defined]
        break
    async for _ in signals:  # type: ignore[attr-defined]
        os._exit(130)


# --- generate ----------------------------------------------------------------------------


def _cmd_generate(args: argparse.Namespace) -> int:
    return trio.run(_generate, args)


async def _generate(args: argparse.Namespace) -> int:
    from .api import Swarm, sampling_params

    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=tuple(args.stop))
    sampling_params(**kwargs)  # bad arguments fail before any connection is made
    async with trio.open_nursery() as nursery:
        identity, ledger = _identity_and_ledger(args.identity)
        swarm = await Swarm.connect(nursery, bootstrap=args.bootstrap, model=args.model, step_timeout=args.timeout,
                                    identity=identity, ledger_path=ledger)
        if args.json:
            result = await swarm.generate(args.prompt, chat=args.chat, **kwargs)
            print(json.dumps(result.to_dict(), indent=2))
        else:
            result = await swarm.generate(args.prompt, chat=args.chat, **kwargs,
                                          on_token=lambda event: print(event.text, end="", flush=True))
            print()
            print(f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s, first token after "
                  f"{result.time_to_first_token:.2f} s, route: {format_route(result.route)}]", file=sys.stderr)
        await swarm.aclose()
    return 0


def _identity_and_ledger(path: str | None) -> tuple[Identity, str | None]:
    """The identity (and its ledger) of ``--identity`` or the default file if it exists;
    else a throwaway identity: generating needs no key file."""
    path_ = Path(path) if path else default_identity_path()
    if path or path_.exists():
        return Identity.load(path_), str(ledger_path_for(path_))
    return Identity.generate(), None


# --- status ------------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    return trio.run(_status, args)


async def _status(args: argparse.Namespace) -> int:
    from swarm.announce import RECORD_KINDS, fetch_swarm_view
    from swarm.dht import DhtNode
    from swarm.transport import Host

    from .runtime import resolve_model

    info = await trio.to_thread.run_sync(resolve_model, args.model)
    async with trio.open_nursery() as nursery:
        host = Host(Identity.generate())
        await nursery.start(host.run)
        dht = DhtNode(host, kinds=RECORD_KINDS)
        await nursery.start(functools.partial(dht.run, bootstrap=tuple(args.bootstrap)))
        view = await fetch_swarm_view(dht, info.model_id, info.num_blocks)
        print(format_status(info.model_id, info.num_blocks, view.announcements))
        _, ledger = _identity_and_ledger(args.identity)
        if ledger is not None:
            print("\n" + format_credit(Ledger.open(ledger, Identity.load(args.identity or default_identity_path())
                                                       .public_key)))
        nursery.cancel_scope.cancel()
    return 0


def format_credit(ledger: Ledger) -> str:
    """This peer's credit with its neighbours, from its ledger (work units = blocks x tokens)."""
    rows = neighbour_rows(ledger)
    lines = [f"credit of this peer's neighbours ({len(ledger)} receipts in the ledger):",
             f"  {'PEER':<14}{'THEIR CREDIT HERE':>18}{'WORK FOR US':>13}{'WORK FOR THEM':>15}"]
    lines += [f"  {peer_id_of(key).hex()[:12]:<14}{credit.total:>18}{for_us:>13}{for_them:>15}"
              for key, credit, for_us, for_them in rows]
    if not rows:
        lines.append("  (no receipts yet: serve blocks to earn credit)")
    return "\n".join(lines)


def format_route(route: list) -> str:
    return " -> ".join(f"{h.peer_id[:8]}@{h.address}[{h.start}:{h.end}]" for h in route)


def format_status(model: str, num_blocks: int, announcements: list) -> str:
    """The ``swarm-peer status`` table: servers, then block coverage with gaps shown."""
    lines = [f"model {model} ({num_blocks} blocks), {len(announcements)} server(s)", ""]
    lines.append(f"{'PEER':<14}{'BLOCKS':<10}{'THROUGHPUT':>14}{'FREE':>6}  ADDRESSES")
    for a in sorted(announcements, key=lambda a: (a.span, a.peer_id)):
        lines.append(f"{a.peer_id.hex()[:12]:<14}{f'{a.span[0]}:{a.span[1]}':<10}{a.throughput:>10.1f} t/s"
                     f"{a.free_sessions:>6}  {', '.join(a.addrs)}")
    lines += ["", "coverage:"]
    runs: list[tuple[int, int, int, float]] = []  # (start, end, servers, throughput) of equal coverage
    for b in range(num_blocks):
        covering = [a for a in announcements if a.span[0] <= b < a.span[1]]
        key = (len(covering), round(sum(a.throughput for a in covering), 3))
        if runs and runs[-1][1] == b and (runs[-1][2], runs[-1][3]) == key:
            runs[-1] = (runs[-1][0], b + 1, *key)
        else:
            runs.append((b, b + 1, *key))
    for start, end, count, tput in runs:
        what = f"{count} server(s), {tput:.1f} tok/s" if count else "GAP: not served by anyone"
        lines.append(f"  blocks {start}:{end}".ljust(20) + what)
    return "\n".join(lines)


# --- demo --------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, peers=args.peers, question=args.question,
                    max_new_tokens=args.max_new_tokens)


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-peer",
        description="Distributed LLM inference on volunteer hardware: serve blocks, generate, run a demo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    keygen = sub.add_parser("keygen", help="create this peer's Ed25519 identity (or show the existing one)")
    keygen.add_argument("--identity", metavar="PATH", help=f"key file (default: {default_identity_path()})")
    keygen.add_argument("--force", action="store_true", help="replace an existing identity")
    keygen.set_defaults(func=_cmd_keygen)

    serve = sub.add_parser("serve", help="serve a span of a model's blocks to the swarm")
    serve.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                       help=f"built-in name, local HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})")
    serve.add_argument("--blocks", metavar="S:E", help="serve blocks S..E-1 (default: where the swarm is weakest)")
    serve.add_argument("--num-blocks", type=int, metavar="N", help="how many blocks to serve when choosing the span")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; :: for IPv6)")
    serve.add_argument("--port", type=int, default=0, help="listen port (default: any free port)")
    serve.add_argument("--announce-addr", action="append", default=[], metavar="HOST:PORT",
                       help="address to announce instead of the bound one (NAT); repeatable")
    serve.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT",
                       help="a peer already in the swarm; repeatable (none: start a new swarm)")
    serve.add_argument("--source-addr", metavar="HOST",
                       help="local address to dial other peers from (multi-homed hosts; default: the kernel's choice)")
    serve.add_argument("--identity", metavar="PATH", help=f"key file (default: {default_identity_path()})")
    serve.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    serve.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on GPU)")
    serve.add_argument("--quant", choices=["int8", "nf4"], help="quantize the served blocks' weights (bitsandbytes)")
    serve.add_argument("--max-sessions", type=int, default=16, help="concurrent inference sessions (default 16)")
    serve.add_argument("--cache-bytes", type=int, help="memory budget for KV caches in bytes (default: unlimited)")
    serve.add_argument("--threads", type=int,
                       help="torch threads for compute (default: one per core; use fewer when several peers share "
                            "a machine)")
    serve.add_argument("--compute-slots", type=int, default=1,
                       help="steps computed at once; more wait, served in order of the requesters' credit")
    serve.set_defaults(func=_cmd_serve)

    gen = sub.add_parser("generate", help="generate text with a swarm")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--bootstrap", action="append", required=True, metavar="HOST:PORT",
                     help="a peer in the swarm; repeatable")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"model the swarm serves (default: {DEFAULT_MODEL})")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print the result with route and timings as JSON")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--timeout", type=float, default=60.0, help="seconds one hop may take for one step")
    gen.add_argument("--identity", metavar="PATH",
                     help="generate as this peer (default: the default key file if present): serving earns priority")
    gen.set_defaults(func=_cmd_generate)

    status = sub.add_parser("status", help="show which peers serve which blocks")
    status.add_argument("--bootstrap", action="append", required=True, metavar="HOST:PORT")
    status.add_argument("--model", default=DEFAULT_MODEL)
    status.add_argument("--identity", metavar="PATH", help="show this identity's credit (default key file if present)")
    status.set_defaults(func=_cmd_status)

    demo = sub.add_parser("demo", help="run a local swarm of peer processes with the default model and ask it")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--peers", type=int, default=3, help="server processes (default 3)")
    demo.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (SwarmError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        leaf = _expected_error(exc)
        if leaf is None:
            raise
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        print(f"swarm-peer: error: {leaf}", file=sys.stderr)
        return 1


def _expected_error(exc: BaseException) -> BaseException | None:
    """A KeyboardInterrupt or SwarmError (possibly wrapped by trio in exception groups)."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    if isinstance(exc, BaseExceptionGroup) and any(isinstance(e, KeyboardInterrupt) for e in exc.exceptions):
        return KeyboardInterrupt()
    return swarm_error_in(exc)


if __name__ == "__main__":
    sys.exit(main())
