"""The Python API for generation jobs: async (trio), sync, and streaming.

Async, inside a trio nursery that owns the swarm connection's tasks::

    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=["127.0.0.1:31337"])
        result = await swarm.generate("What is a swarm?", max_new_tokens=32)
        async for token in swarm.stream("Tell me a story", temperature=0.7, seed=1):
            print(token.text, end="", flush=True)
        await swarm.aclose()

Sync, from ordinary code (a background thread runs trio)::

    with SyncSwarm(bootstrap=["127.0.0.1:31337"]) as swarm:
        print(swarm.generate("What is a swarm?").text)
        for token in swarm.stream("Tell me a story"):
            print(token.text, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import trio

from protocol import Identity
from protocol.errors import SwarmError, swarm_error_in
from swarm.announce import SwarmView
from swarm.credit import Credit
from swarm.dht import DhtNode
from swarm.transport import Host
from verify import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_LOCAL_RECOMPUTE_BYTES,
    AuditPolicy,
    Auditor,
    FraudProofService,
    Reputation,
    record_kinds,
)

from ._bootstrap import check_bootstrap
from .client import ROUTE_COSTS, GenerationResult, SwarmClient, TokenEvent
from ._local_verify import LocalSpans
from ._drafters import DraftModel, drafter_from, speculative_from
from .credit import CreditService
from .runtime import DEFAULT_MODEL, ClientHead, InvalidArgument, SamplingParams, load_head
from .speculative import Drafter, Speculative

__all__ = ["Swarm", "SyncSwarm", "GenerationResult", "TokenEvent", "check_bootstrap"]

Prompt = str | list[dict[str, str]]




def sampling_params(max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
            seed: int | None, stop: Sequence[str]) -> SamplingParams:
    if isinstance(stop, str):  # a str is a Sequence[str] too, but one string is not a list of them
        raise InvalidArgument(f"stop must be a sequence of strings, got {stop!r}")
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop))


class Swarm:
    """A connection to a swarm serving one model. Make one with ``Swarm.connect``."""

    def __init__(self, client: SwarmClient, cancel_scope: trio.CancelScope) -> None:
        self.client = client
        self._scope = cancel_scope
        self._drafters: dict[str, Drafter] = {}  # draft models loaded, by path

    @classmethod
    async def connect(cls, nursery: trio.Nursery, *, bootstrap: Sequence[str], model: str = DEFAULT_MODEL,
                      identity: Identity | None = None, listen_host: str = "127.0.0.1", port: int = 0,
                      source_host: str | None = None,
                      wire_dtype: str = "f32", step_timeout: float = 60.0, device: str | None = None,
                      ledger_path: str | None = None, audit: AuditPolicy | float | None = DEFAULT_AUDIT_RATE,
                      reputation_path: str | None = None,
                      local_recompute_bytes: int = DEFAULT_LOCAL_RECOMPUTE_BYTES, relay: str = "star",
                      dht_server: bool = False) -> Swarm:
        """Join the swarm through ``bootstrap`` and load the model's client head.

        Args:
            nursery: owns the transport and DHT tasks until ``aclose``.
            bootstrap: ``host:port`` addresses of peers already in the swarm.
            model: the model source (built-in name, local path or hub id) whose head
                this client runs; servers must serve the same model id.
            identity: this peer's identity (default: a new one). Use the identity you
                serve with: servers prioritize peers that did work for them.
            ledger_path: where this peer's credit ledger persists (default: memory).
            audit: the share of an established peer's hop-steps spot-checked by
                recomputation on an independent peer (``verify.DEFAULT_AUDIT_RATE`` =
                0.05; new and unknown peers are checked more; 1.0 audits every step
                before using it, ``verify.PARANOID`` also with two independent peers;
                0 or None turns audits off), or a full ``verify.AuditPolicy``.
            reputation_path: where peer standings and bans persist (default: memory).
            local_recompute_bytes: the client loads a span of the model itself, when its
                weights fit this many bytes (default 1 GiB), to settle a disputed audit
                and to verify fraud proofs on its own evidence rather than trust a vote
                among servers; 0 turns this off (disputes are then settled by votes).
            source_host: local address this client dials peers from (default: the kernel's choice).
            relay: ``"star"`` (the client sends every hop its input and gets its output)
                or ``"push"`` (each server hands its output to the next: one trip around
                the chain per token; star where push cannot go).
            dht_server: also serve the DHT, as servers do. By default a client is in
                DHT client mode (Petals' ``client_mode``, libp2p's client mode): it
                claims no listen address in its handshakes, so no node admits it as a
                routing-table contact (spec 10, "Routing table"); it looks up and
                stores like any node, but is never asked to answer lookups or to hold
                records, and its coming and going never enters other nodes' tables.

        Raises:
            BootstrapFailed: no bootstrap address answered, or one is not ``host:port``
                (checked before anything slow).
            ModelError: the model cannot be resolved or loaded.
        """
        bootstrap = check_bootstrap(bootstrap)  # before the slow head load
        head = await trio.to_thread.run_sync(functools.partial(load_head, model, device=device))
        host = Host(identity or Identity.generate(), host=listen_host, port=port, source_host=source_host,
                    announce_addrs=None if dht_server else ())
        dht = DhtNode(host, kinds=record_kinds())
        credit = CreditService(host, ledger_path=ledger_path)
        reputation = Reputation.load(reputation_path) if reputation_path is not None else Reputation()
        local = (LocalSpans(model, head.model_id, head.info.config, budget_bytes=local_recompute_bytes,
                            device=device) if local_recompute_bytes > 0 else None)
        fraud = FraudProofService(host, dht, reputation, local=local, reputation_path=reputation_path)
        try:
            scope, background = await nursery.start(_services, host, dht, credit, fraud, bootstrap)
        except BaseExceptionGroup as group:  # e.g. BootstrapFailed inside the services' nursery
            error = swarm_error_in(group)
            if error is None:
                raise
            raise error from None
        return cls.assemble(dht, head, credit=credit, reputation=reputation, fraud=fraud, cancel_scope=scope,
                            wire_dtype=wire_dtype, step_timeout=step_timeout, audit=audit, local=local,
                            spawn=background.start_soon, relay=relay)

    @classmethod
    def assemble(cls, dht: DhtNode, head: ClientHead, *, credit: CreditService, reputation: Reputation,
                 fraud: FraudProofService, cancel_scope: trio.CancelScope | None = None, wire_dtype: str = "f32",
                 step_timeout: float = 60.0, audit: AuditPolicy | float | None = DEFAULT_AUDIT_RATE,
                 local: LocalSpans | None = None, spawn: Callable[..., None] | None = None,
                 relay: str = "star") -> Swarm:
        """A ``Swarm`` on services that already run (a serving peer's own host, DHT, credit
        and fraud proof service: ``swarm-peer serve --api`` generates as the server).
        ``local``: the spans the auditor may load to settle disputes itself (None: votes
        only). ``aclose`` cancels ``cancel_scope`` (default: a scope of its own, so nothing).
        ``spawn`` starts tasks that outlive a generation (view refreshes, hedged requests:
        a nursery's ``start_soon``); without it nothing is hedged."""
        client = SwarmClient(dht, head, wire_dtype=wire_dtype, step_timeout=step_timeout, credit=credit,
                             reputation=reputation, fraud=fraud, spawn=spawn,
                             costs=dataclasses.replace(ROUTE_COSTS, relay=relay))
        policy = AuditPolicy(rate=float(audit)) if isinstance(audit, (int, float)) else audit
        if policy is not None and policy.rate > 0:
            client.auditor = Auditor(dht.host, client.audit_candidates, reputation, service=fraud, local=local,
                                     policy=policy)
        return cls(client, cancel_scope if cancel_scope is not None else trio.CancelScope())

    @property
    def model(self) -> str:
        return self.client.model

    async def generate(self, prompt: Prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] = (), chat: bool = True,
                       on_token: Callable[[TokenEvent], None] | None = None,
                       speculative: str | Drafter | Speculative | None = None) -> GenerationResult:
        """Generate a completion (Hugging Face ``generate``-like arguments; temperature 0 is greedy).

        ``on_token`` is called with each ``TokenEvent`` as it is generated.
        ``speculative``: draft tokens locally and have the swarm verify several per step
        (``"prompt-lookup"``, the path of a draft model with the same tokenizer, a
        ``peer.speculative.Drafter`` or ``Speculative``); the output is the target's
        either way (greedy: the same tokens), only faster when drafts are kept.

        Raises:
            InvalidArgument, PromptTooLong, NoRoute, ModelNotServed, AllCandidatesFailed.
        """
        params = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
        return await self.client.generate(prompt, params, chat=chat, on_token=on_token,
                                          speculative=self._speculative(speculative))

    async def stream(self, prompt: Prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop: Sequence[str] = (), chat: bool = True,
                     speculative: str | Drafter | Speculative | None = None) -> AsyncIterator[TokenEvent]:
        """Yield ``TokenEvent``s as tokens are generated (same arguments as ``generate``)."""
        params = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
        async for event in self.client.stream(prompt, params, chat=chat, speculative=self._speculative(speculative)):
            yield event

    def _speculative(self, value: str | Drafter | Speculative | None) -> Speculative | None:
        """``speculative=`` as a ``Speculative``; a draft model path is loaded once per path."""
        if isinstance(value, str):
            cached = self._drafters.get(value)
            if cached is None:
                cached = self._drafters[value] = drafter_from(value, vocab_size=self.client.head.vocab_size)
            # a draft model's session is one generation's: concurrent generations share
            # the loaded weights, each with a session of its own
            value = DraftModel.from_parts(cached.head, cached.span, name=cached.name) \
                if isinstance(cached, DraftModel) else cached
        return speculative_from(value, vocab_size=self.client.head.vocab_size)

    def credit(self) -> list[tuple[bytes, Credit, int, int]]:
        """This peer's credit with its neighbours: (public key, their credit here, work
        they did for us, work we did for them), in work units (blocks x tokens)."""
        assert self.client.credit is not None
        return self.client.credit.neighbours()

    async def status(self) -> SwarmView:
        """Who serves which blocks of the model right now."""
        return await self.client.swarm_view(fresh=True)

    def health(self) -> dict[bytes, dict[str, Any]]:
        """What this client knows of each server it dealt with: seconds since it was last
        seen alive, backoff left and failures in a row, RTT, measured compute."""
        return self.client.health.snapshot(trio.current_time())

    async def aclose(self) -> None:
        self._scope.cancel()


async def _services(host: Host, dht: DhtNode, credit: CreditService, fraud: FraudProofService,
                    bootstrap: tuple[str, ...], *,
                    task_status: trio.TaskStatus[tuple[trio.CancelScope, trio.Nursery]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            await nursery.start(functools.partial(dht.run, bootstrap=bootstrap))
            await nursery.start(credit.run)
            await nursery.start(fraud.run)
            # The client's background tasks (view refreshes, hedges) live here too, so
            # they end with the connection and never outlive what they use.
            task_status.started((scope, nursery))


_DONE = object()


class SyncSwarm:
    """The blocking form of ``Swarm``: same arguments, plain calls and iterators.

    Runs trio in a background thread; use as a context manager or call ``close``.
    """

    def __init__(self, *, bootstrap: Sequence[str], model: str = DEFAULT_MODEL, **connect_kwargs: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._swarm: Swarm | None = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, tuple(bootstrap), model, connect_kwargs),
                                        name="swarm-peer-trio", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    async def _main(self, bootstrap: tuple[str, ...], model: str, kwargs: dict[str, Any]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._swarm = await Swarm.connect(nursery, bootstrap=bootstrap, model=model, **kwargs)
                self._nursery, self._token, self._stop = nursery, trio.lowlevel.current_trio_token(), trio.Event()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException as exc:  # reported to the constructor's caller, unwrapped from trio's group
            self._error = swarm_error_in(exc) or exc
        finally:
            self._ready.set()

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._swarm is None or self._token is None:
            raise SwarmError("this SyncSwarm is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @property
    def model(self) -> str:
        assert self._swarm is not None
        return self._swarm.model

    def generate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """Like ``Swarm.generate``; blocks until the text is complete."""
        assert self._swarm is not None
        return self._call(functools.partial(self._swarm.generate, prompt, **kwargs))

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[TokenEvent]:
        """Like ``Swarm.stream``; yields tokens as they arrive."""
        assert self._swarm is not None
        assert self._nursery is not None
        events: queue.Queue[Any] = queue.Queue()
        swarm = self._swarm

        async def produce() -> None:
            try:
                async for event in swarm.stream(prompt, **kwargs):
                    events.put(event)
            except BaseException as exc:  # handed to the consuming thread
                events.put(exc)
            else:
                events.put(_DONE)

        trio.from_thread.run_sync(self._nursery.start_soon, produce, trio_token=self._token)
        while True:
            item = events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def status(self) -> SwarmView:
        assert self._swarm is not None
        return self._call(self._swarm.status)

    def close(self) -> None:
        if self._stop is not None and self._token is not None:
            stop, self._stop = self._stop, None
            try:
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join()
        self._swarm = None

    def __enter__(self) -> SyncSwarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
