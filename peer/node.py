"""A serving peer assembled: transport, DHT, span server, announcement, status.

``run_server`` is what ``swarm-peer serve`` runs: it joins (or starts) the DHT,
picks its span (``--blocks`` or the swarm's weakest blocks), loads only that span,
measures its throughput, serves and announces it, and shows what it is doing.
``ServerNode.shutdown`` is the graceful exit: refuse new sessions, let in-flight
steps finish, withdraw the announcement.

Readiness (issue 12 item 4; spec section 11): the host listens before the span is
loaded (the DHT runs over it, and choosing a span needs the DHT), so until the span
server exists its session requests are answered ``ERROR LOADING`` with an estimate of
the wait, and records an earlier process of the same identity left under the model's
block keys are replaced by tombstones at once, so clients stop routing to the old
address before the new announcement is up.

The KV cache budget (``--cache-bytes``) is finite by default: ``default_cache_bytes``,
a quarter of the memory available once the weights are loaded (half of the free
device memory on a GPU), and no more than ``max_sessions`` sessions of the whole
context need.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import TextIO

import torch
import trio

from protocol import FraudProofNotice, Identity, SignedRecord, type_cap
from swarm.announce import DEFAULT_TTL, Announcer, block_key, fetch_swarm_view
from swarm.dht import TOMBSTONE_MAX_TTL, DhtNode
from swarm.latency import NextPings
from swarm.planning import choose_blocks, should_rebalance
from swarm.transport import Host
from verify import FraudProofService, Reputation, record_kinds

from .runtime import DEFAULT_MODEL, SpanExecutor, load_span, measure_throughput, resolve_model
from .credit import CreditService
from .model_info import ModelInfoService
from . import _progress
from .runtime._errors import InvalidArgument
from .scheduler import Scheduler, SchedulerConfig
from .server import ServerLimits, SpanServer, answer_loading

__all__ = ["ServeOptions", "ServerNode", "run_server", "parse_blocks", "span_reason", "default_cache_bytes"]

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
    max_sessions_per_peer: int = 4  # sessions one requester may hold
    cache_bytes: int | None = None  # None: default_cache_bytes
    announce_ttl: float = DEFAULT_TTL
    drain_grace: float = 30.0
    ledger_path: str | None = None  # the credit ledger (None: kept in memory)
    reputation_path: str | None = None  # reputation and bans (None: kept in memory)
    rebalance_interval: float = 300.0  # seconds between checks of a self-chosen span (Petals' rule)
    compute_slots: int = 1  # steps computed at once; more queue in credit order
    max_batch: int = 16  # decode steps of different sessions computed as one forward (1: no batching)
    threads: int | None = None  # torch threads for compute (None: torch's default, one per core)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise InvalidArgument(f"--max-sessions must be at least 1, got {self.max_sessions}")
        if self.max_sessions_per_peer < 1:
            raise InvalidArgument(f"--max-sessions-per-peer must be at least 1, got {self.max_sessions_per_peer}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidArgument(f"--num-blocks must be at least 1, got {self.num_blocks}")
        if self.max_batch < 1:
            raise InvalidArgument(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.threads is not None and self.threads < 1:
            raise InvalidArgument(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"--port must be in 0..65535, got {self.port}")


def default_cache_bytes(executor: SpanExecutor, *, max_sessions: int) -> int:
    """The KV cache budget a server has unless told: a quarter of the memory available
    now (the weights are loaded) on CPU, half the free device memory on a GPU, and no
    more than ``max_sessions`` sessions of the model's whole context need."""
    if executor.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(executor.device)
        budget = free // 2
    else:
        budget = _available_memory() // 4
    context = executor.context_length
    if context:
        budget = min(budget, max_sessions * context * executor.per_token_cache_bytes)
    return max(int(budget), executor.per_token_cache_bytes)


#: Allocations at least this large get pages of their own from the kernel (glibc).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map every allocation of ``nbytes`` or more on its own, returned to the
    kernel when freed (issue 10 item 4: RSS under hostile load). By default glibc raises
    this threshold to the size of each large block freed (up to 32 MiB), after which the
    activations and growing KV caches of other people's requests come from the heap and
    stay in the RSS once freed; a fixed threshold turns that off. True if set (a glibc
    process); elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def _available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or all of it."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def _replace_old_records(dht: DhtNode, identity: Identity, model_id: str, num_blocks: int) -> None:
    """Tombstones under every block key of the model: whatever records an earlier
    process of this identity left there (pointing at its address, with its free
    slots) are replaced at once; the new announcement replaces the tombstones."""
    now = time.time()
    seq = int(now * 1000)

    async def one(block: int) -> None:
        tombstone = SignedRecord.create(identity, key=block_key(model_id, block), seq=seq,
                                        expires=int(now + TOMBSTONE_MAX_TTL), value=b"")
        try:
            await dht.store(tombstone)
        except Exception as exc:  # the DHT may be empty or unreachable: nothing to replace then
            log.debug("replacing the old record of block %d failed: %s", block, exc)

    async with trio.open_nursery() as nursery:
        for block in range(num_blocks):
            nursery.start_soon(one, block)


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
                + (f"{st.batched_steps} steps batched (up to {st.largest_batch}) | " if st.batched_steps else "")
                + f"{len(self.host.connections)} peers")


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
    fix_mmap_threshold()
    info = await trio.to_thread.run_sync(resolve_model, options.model)
    host = Host(identity, host=options.host, port=options.port,
                announce_addrs=list(options.announce_addrs) or None, source_host=options.source_addr)
    started = time.monotonic()
    # Until the span server exists, session requests get LOADING (never "not served").
    answer_loading(host, retry_after=lambda: max(5.0, 2 * (time.monotonic() - started)))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            dht = DhtNode(host, kinds=record_kinds())
            await nursery.start(functools.partial(dht.run, bootstrap=options.bootstrap))
            nursery.start_soon(_replace_old_records, dht, identity, info.model_id, info.num_blocks)
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
            _apply_cache_default(executor, options)
            _progress.note(f"measuring the throughput of blocks {span[0]}:{span[1]} ...")
            throughput = await trio.to_thread.run_sync(measure_throughput, executor)
            credit = CreditService(host, ledger_path=options.ledger_path)
            await nursery.start(credit.run)
            # The one owner of this peer's compute: served steps and fraud proof
            # verification alike wait here for a slot, in credit order.
            compute = Scheduler(options.compute_slots, credit_of=credit.credit_total,
                                delinquent_of=credit.delinquent, config=SchedulerConfig(max_batch=options.max_batch))
            reputation = (Reputation.load(options.reputation_path) if options.reputation_path is not None
                          else Reputation())
            limits = ServerLimits(max_sessions=options.max_sessions, max_sessions_per_peer=options.max_sessions_per_peer,
                                  max_sessions_per_group=max(1, options.max_sessions // 4))
            server = SpanServer(host, executor, limits=limits, drain_grace=options.drain_grace,
                                compute=compute, on_work=credit.served, banned=reputation.banned)
            _set_proof_cap(host, executor)
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
        _apply_cache_default(executor, options)
        throughput = await trio.to_thread.run_sync(measure_throughput, executor)
        if server.open_sessions or server.draining:
            continue  # a client arrived meanwhile; try again next round
        server.swap_executor(executor)
        node.executor, node.throughput, node.fraud.executor = executor, throughput, executor
        await node.announcer.publish_now()  # the new span; keys of the old blocks are withdrawn


def _apply_cache_default(executor: SpanExecutor, options: ServeOptions) -> None:
    if options.cache_bytes is None:
        executor.cache_bytes = default_cache_bytes(executor, max_sessions=options.max_sessions)
        log.info("KV cache budget: %d MiB (--cache-bytes to change it)", executor.cache_bytes >> 20)


def _set_proof_cap(host: Host, executor: SpanExecutor) -> None:
    """FRAUD_PROOF's size cap (spec section 7.5): a proof carries one session's inputs
    and one output, so at most twice the model's context of hidden states."""
    context = executor.context_length
    if context:
        elements = 2 * executor.hidden_size * context
        host.set_request_cap(FraudProofNotice, type_cap(FraudProofNotice, host.limits, elements))


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
