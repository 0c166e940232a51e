"""A serving peer assembled: transport, DHT, span server, announcement, status.

``run_server`` is what ``swarm-peer serve`` runs: it joins (or starts) the DHT,
picks its span (``--blocks`` or the swarm's weakest blocks), loads only that span,
measures its throughput, serves and announces it, and shows what it is doing.
``ServerNode.shutdown`` is the graceful exit: refuse new sessions, let in-flight
steps finish, withdraw the announcement.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import TextIO

import torch
import trio

from protocol import Identity
from swarm.announce import DEFAULT_TTL, Announcer, fetch_swarm_view
from swarm.dht import DhtNode
from swarm.latency import NextPings
from swarm.planning import choose_blocks, should_rebalance
from swarm.transport import Host
from verify import FraudProofService, Reputation, record_kinds

from .runtime import DEFAULT_MODEL, SpanExecutor, load_span, measure_throughput, resolve_model
from .credit import CreditService
from .model_info import ModelInfoService
from . import _progress
from .runtime._errors import InvalidArgument
from .scheduler import Scheduler
from .server import SpanServer

__all__ = ["ServeOptions", "ServerNode", "run_server", "parse_blocks", "span_reason"]

log = logging.getLogger("swarm.node")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    """What ``swarm-peer serve`` takes; see its ``--help`` for each option."""

    model: str = DEFAULT_MODEL
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None  # span length when the swarm chooses the span
    host: str = "127.0.0.1"
    port: int = 0
    announce_addrs: tuple[str, ...] = ()
    source_addr: str | None = None  # local address outgoing connections bind to (None: the kernel's choice)
    bootstrap: tuple[str, ...] = ()
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    max_sessions: int = 16
    cache_bytes: int | None = None
    announce_ttl: float = DEFAULT_TTL
    drain_grace: float = 30.0
    ledger_path: str | None = None  # the credit ledger (None: kept in memory)
    reputation_path: str | None = None  # reputation and bans (None: kept in memory)
    rebalance_interval: float = 300.0  # seconds between checks of a self-chosen span (Petals' rule)
    compute_slots: int = 1  # steps computed at once; more queue in credit order
    threads: int | None = None  # torch threads for compute (None: torch's default, one per core)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise InvalidArgument(f"--max-sessions must be at least 1, got {self.max_sessions}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidArgument(f"--num-blocks must be at least 1, got {self.num_blocks}")
        if self.threads is not None and self.threads < 1:
            raise InvalidArgument(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"--port must be in 0..65535, got {self.port}")


def parse_blocks(text: str) -> tuple[int, int]:
    """``S:E`` -> (S, E), a half-open block range."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise InvalidArgument(f"--blocks takes START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= start < end:
        raise InvalidArgument(f"--blocks {text}: need 0 <= START < END")
    return start, end


def span_reason(span: tuple[int, int], asked: int | None, num_blocks: int, *, servers: int) -> str:
    """Why a server without ``--blocks`` serves ``span``, in a sentence's tail."""
    length = span[1] - span[0]
    if asked is None:
        why = f"all {num_blocks} blocks (no --num-blocks given)" if length == num_blocks else f"{length} blocks"
    elif asked > num_blocks:
        why = f"all {num_blocks} blocks: --num-blocks {asked} is more than the model has"
    else:
        why = f"{length} blocks as --num-blocks asked"
    where = "the swarm is empty, so from the first block" if servers == 0 else \
        f"where the {servers} server(s) already there leave the swarm weakest"
    return f"{why}; {where}"


@dataclass(slots=True)
class ServerNode:
    """A running serving peer (returned by ``run_server`` through ``task_status``)."""

    identity: Identity
    host: Host
    dht: DhtNode
    server: SpanServer
    announcer: Announcer
    credit: CreditService
    compute: Scheduler  # the one owner of compute: served steps and proof verification
    fraud: FraudProofService
    executor: SpanExecutor
    throughput: float
    cancel_scope: trio.CancelScope
    span_reason: str = ""  # why this span: said at start-up
    next_pings: NextPings | None = None  # RTTs to the servers of the next block, announced

    @property
    def span(self) -> tuple[int, int]:
        return self.server.span

    @property
    def address(self) -> str:
        return self.host.listen_addrs[0]

    async def shutdown(self, *, withdraw_timeout: float = 10.0) -> None:
        """Graceful stop: no new sessions, in-flight steps finish, announcement withdrawn.

        The withdrawal (tombstones to the DHT) happens here, while the host is still up:
        cancelling the node's scope also closes every connection it would need.
        """
        await self.server.drain()
        with trio.move_on_after(withdraw_timeout):
            await self.announcer.withdraw()
        self.cancel_scope.cancel()

    def status_line(self) -> str:
        s, st = self.server, self.server.stats
        return (f"blocks {s.span[0]}:{s.span[1]} | sessions {s.open_sessions}/{s.max_sessions} | "
                f"{st.tokens} tokens in {st.steps} steps | {st.tokens_per_second:.1f} tok/s compute | "
                f"{len(self.host.connections)} peers")


async def run_server(identity: Identity, options: ServeOptions, *,
                     task_status: trio.TaskStatus[ServerNode] = trio.TASK_STATUS_IGNORED,
                     status_stream: TextIO | None = None, status_interval: float = 1.0) -> None:
    """Serve until cancelled (or ``ServerNode.shutdown``). ``started`` with the node once
    its span is loaded and announced.

    Raises:
        BootstrapFailed: none of ``options.bootstrap`` answered.
        ModelError (and subclasses): the model or span cannot be loaded.
    """
    if options.threads is not None:
        # Several peers on one machine each spinning a thread per core stall in OpenMP
        # barriers; the operator splits the cores with --threads.
        torch.set_num_threads(options.threads)
    info = await trio.to_thread.run_sync(resolve_model, options.model)
    host = Host(identity, host=options.host, port=options.port,
                announce_addrs=list(options.announce_addrs) or None, source_host=options.source_addr)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            dht = DhtNode(host, kinds=record_kinds())
            await nursery.start(functools.partial(dht.run, bootstrap=options.bootstrap))
            if options.blocks is not None:
                span, reason = options.blocks, "as --blocks asked"
            else:
                view = await fetch_swarm_view(dht, info.model_id, info.num_blocks)
                span = choose_blocks(view.announcements, num_blocks=info.num_blocks,
                                     span_length=options.num_blocks or info.num_blocks)
                reason = span_reason(span, options.num_blocks, info.num_blocks, servers=len(view.servers))
            log.info("loading blocks %d:%d of %s", span[0], span[1], info.model_id)
            executor = await trio.to_thread.run_sync(functools.partial(
                load_span, options.model, span[0], span[1], device=options.device, dtype=options.dtype,
                quant=options.quant, cache_bytes=options.cache_bytes))
            _progress.note(f"measuring the throughput of blocks {span[0]}:{span[1]} ...")
            throughput = await trio.to_thread.run_sync(measure_throughput, executor)
            credit = CreditService(host, ledger_path=options.ledger_path)
            await nursery.start(credit.run)
            # The one owner of this peer's compute: served steps and fraud proof
            # verification alike wait here for a slot, in credit order.
            compute = Scheduler(options.compute_slots, credit_of=credit.credit_total,
                                delinquent_of=credit.delinquent)
            reputation = (Reputation.load(options.reputation_path) if options.reputation_path is not None
                          else Reputation())
            server = SpanServer(host, executor, max_sessions=options.max_sessions, drain_grace=options.drain_grace,
                                compute=compute, on_work=credit.served, banned=reputation.banned)
            nursery.start_soon(server.run)
            model_info = ModelInfoService(host, server, source=options.model)  # answers MODEL_QUERY
            fraud = FraudProofService(host, dht, reputation, executor=executor, compute=compute,
                                      reputation_path=options.reputation_path)
            await nursery.start(fraud.run)
            pings = NextPings(host, dht, model=info.model_id, span=lambda: server.span, num_blocks=info.num_blocks)
            announcer = Announcer(dht, identity, lambda expires: dataclasses.replace(
                server.make_announcement(expires, node.throughput), next_pings=pings.table()),
                                  ttl=options.announce_ttl, model_entry=model_info.entry())
            node = ServerNode(identity=identity, host=host, dht=dht, server=server, announcer=announcer,
                              credit=credit, compute=compute, fraud=fraud, executor=executor, throughput=throughput,
                              cancel_scope=scope, span_reason=reason, next_pings=pings)
            await nursery.start(announcer.run)
            nursery.start_soon(pings.run)
            if status_stream is not None:
                nursery.start_soon(_show_status, node, status_stream, status_interval)
            if options.blocks is None:
                nursery.start_soon(_rebalance_loop, node, options, info.num_blocks)
            task_status.started(node)


async def _rebalance_loop(node: ServerNode, options: ServeOptions, num_blocks: int) -> None:
    """Move a self-chosen span where the swarm is weakest when that helps enough
    (``should_rebalance``: Petals' rule), and only while no session is open."""
    while True:
        await trio.sleep(options.rebalance_interval)
        server = node.server
        if server.open_sessions or server.draining:
            continue
        view = await fetch_swarm_view(node.dht, server.model, num_blocks)
        me = node.identity.peer_id
        if me not in view.servers or not should_rebalance(view.announcements, peer_id=me, num_blocks=num_blocks):
            continue
        length = server.span[1] - server.span[0]
        span = choose_blocks(view.announcements, num_blocks=num_blocks, span_length=length, exclude=me)
        log.info("rebalancing: moving from blocks %d:%d to %d:%d", *server.span, *span)
        executor = await trio.to_thread.run_sync(functools.partial(
            load_span, options.model, span[0], span[1], device=options.device, dtype=options.dtype,
            quant=options.quant, cache_bytes=options.cache_bytes))
        throughput = await trio.to_thread.run_sync(measure_throughput, executor)
        if server.open_sessions or server.draining:
            continue  # a client arrived meanwhile; try again next round
        server.swap_executor(executor)
        node.executor, node.throughput, node.fraud.executor = executor, throughput, executor
        await node.announcer.publish_now()  # the new span; keys of the old blocks are withdrawn


async def _show_status(node: ServerNode, stream: TextIO, interval: float) -> None:
    """A live line on a terminal; a plain log line every 30 s otherwise."""
    tty = stream.isatty()
    last_logged = 0.0
    while True:
        await trio.sleep(interval)
        line = node.status_line()
        if tty:
            stream.write("\r\x1b[K" + line)
            stream.flush()
        elif time.monotonic() - last_logged >= 30.0:
            last_logged = time.monotonic()
            print(f"[swarm-peer] {line}", file=stream, flush=True)
