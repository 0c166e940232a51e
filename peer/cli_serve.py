"""The serving commands of ``swarm-peer``: ``serve`` (optionally with ``--api``) and ``api``.

Before anything slow (resolving and loading the model) ``serve`` checks what would
otherwise fail late: the ports are free, and no other running server holds the same
identity (two servers with one identity replace each other's announcements, so the
swarm flips between them and shows gaps). The identity's claim is an advisory lock
(``fcntl.flock``) on ``<identity>.lock``, released by the kernel when the process
ends, however it ends.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import trio

from protocol import Identity
from protocol.errors import SwarmError

from ._format import READY_PREFIX
from ._paths import default_identity_path

if TYPE_CHECKING:
    from .node import ServerNode

__all__ = ["cmd_serve", "cmd_api", "check_port_free", "IdentityInUse", "PortInUse", "claim_identity", "identity_holder"]


class PortInUse(SwarmError):
    """A port to listen on is taken."""


class IdentityInUse(SwarmError):
    """Another running server holds this identity."""


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise PortInUse (one line) if ``host:port`` cannot be bound; port 0 always can."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listeners do
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is already in use (is another swarm-peer running?); "
                                f"choose another with {what}") from None
            raise PortInUse(f"cannot listen on {host}:{port} ({exc.strerror}); check {what} and --host") from None


def claim_identity(path: Path) -> TextIO:
    """Lock ``path``'s claim for this process; the returned file must stay open.

    Raises:
        IdentityInUse: another running process holds it (the message names its pid).
    """
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")  # noqa: SIM115 -- held for the process's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise IdentityInUse(f"the identity {path} is in use by another running server (pid {holder}); give this "
                            f"one its own with --identity PATH (swarm-peer keygen --identity PATH makes one)"
                            ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def identity_holder(path: Path) -> str | None:
    """The pid of the running server that holds ``path``, or None if none does."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        handle = open(lock_path)  # noqa: SIM115
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "?"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# --- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from ._bootstrap import check_bootstrap
    from .credit import ledger_path_for
    from .node import ServeOptions, parse_blocks

    if args.bootstrap:
        check_bootstrap(args.bootstrap)
    identity_path = Path(args.identity or default_identity_path())
    options = ServeOptions(
        model=args.model, blocks=parse_blocks(args.blocks) if args.blocks else None, num_blocks=args.num_blocks,
        host=args.host, port=args.port, announce_addrs=tuple(args.announce_addr), bootstrap=tuple(args.bootstrap),
        source_addr=args.source_addr,
        device=args.device, dtype=args.dtype, quant=args.quant, max_sessions=args.max_sessions,
        cache_bytes=args.cache_bytes, compute_slots=args.compute_slots, max_batch=args.max_batch, threads=args.threads,
        ledger_path=str(ledger_path_for(identity_path)))
    check_port_free(args.host, args.port, "--port")
    if args.api is not None:
        check_port_free(args.api_host, args.api, "--api")
    claim = claim_identity(identity_path)
    try:
        identity = Identity.load_or_create(identity_path)
        trio.run(_serve, identity, options, args)
    finally:
        claim.close()
    return 0


def _join_line(node: Any, options: Any) -> str:
    address = node.address
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]"):
        address = f"<this machine's address>:{port}"
    return f"swarm-peer: started a new swarm; others join it with: --bootstrap {address}"


async def _serve(identity: Identity, options: Any, args: argparse.Namespace) -> None:
    from ._heap import freeze_loaded_heap
    from .node import run_server

    finished = trio.Event()

    async def runner(task_status: trio.TaskStatus[ServerNode] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await run_server(identity, options, task_status=task_status, status_stream=sys.stderr)
        finally:
            finished.set()

    async with trio.open_nursery() as nursery:
        node = await nursery.start(runner)
        if options.blocks is None:
            print(f"swarm-peer: chose blocks {node.span[0]}:{node.span[1]}: {node.span_reason}", file=sys.stderr,
                  flush=True)
        print(f"{READY_PREFIX} blocks {node.span[0]}:{node.span[1]} of {node.executor.model_id} at {node.address} "
              f"(peer {identity.peer_id.hex()}, {node.throughput:.1f} tok/s)", flush=True)
        if not options.bootstrap:
            print(_join_line(node, options), flush=True)
        if args.api is not None:
            url = await nursery.start(functools.partial(_api_beside, node, args))
            print(f"swarm-peer: OpenAI-compatible API and web page at {url}", flush=True)
        freeze_loaded_heap()  # the model and the API's head are loaded
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(_watch_signals, signals, node, nursery)
            await finished.wait()
        nursery.cancel_scope.cancel()
    print("\nswarm-peer: stopped", file=sys.stderr, flush=True)


async def _api_beside(node: Any, args: argparse.Namespace, *,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """The HTTP API in the server's process, generating as the server (its identity, so
    its credit buys priority) over the server's own host and DHT."""
    from .api import Swarm
    from .http import ApiModel, SwarmApi, serve_http
    from .runtime import load_head

    head = await trio.to_thread.run_sync(functools.partial(load_head, args.model, device=args.device))
    swarm = Swarm.assemble(node.dht, head, credit=node.credit, reputation=node.fraud.reputation, fraud=node.fraud)
    api = SwarmApi([ApiModel(args.model, swarm)])
    await api.warm_up()
    await serve_http(api.app, host=args.api_host, port=args.api, task_status=task_status)


async def _watch_signals(signals: Any, node: Any, nursery: trio.Nursery) -> None:
    async for _ in signals:
        print("\nswarm-peer: shutting down: finishing in-flight steps and withdrawing the announcement "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        nursery.start_soon(node.shutdown)
        break
    async for _ in signals:
        os._exit(130)


# --- api ---------------------------------------------------------------------------------


def cmd_api(args: argparse.Namespace) -> int:
    from ._bootstrap import check_bootstrap

    check_bootstrap(args.bootstrap)
    check_port_free(args.host, args.port, "--port")
    return trio.run(_api, args)


async def _api(args: argparse.Namespace) -> int:
    from .api import Swarm
    from .cli_client import identity_and_ledger
    from .http import ApiModel, SwarmApi, serve_http

    models = args.model or ["smollm2-135m-instruct"]
    identity, ledger = identity_and_ledger(args.identity)
    async with trio.open_nursery() as nursery:
        first = await Swarm.connect(nursery, bootstrap=args.bootstrap, model=models[0], identity=identity,
                                    ledger_path=ledger, step_timeout=args.timeout)
        entries = [ApiModel(models[0], first)]
        for name in models[1:]:
            # Each further model is its own client with its own (throwaway) identity: one
            # identity at two addresses would confuse the DHT.
            swarm = await Swarm.connect(nursery, bootstrap=args.bootstrap, model=name, step_timeout=args.timeout)
            entries.append(ApiModel(name, swarm))
        api = SwarmApi(entries)
        await api.warm_up()
        url = await nursery.start(functools.partial(serve_http, api.app, host=args.host, port=args.port))
        print(f"swarm-peer: OpenAI-compatible API at {url}v1 and the web page at {url} (Ctrl-C to stop)",
              flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()
    print("swarm-peer: stopped", file=sys.stderr, flush=True)
    return 0
