"""The generating side of a peer: routing, the relay loop and sampling.

Theory of operation. ``SwarmClient`` holds the client head (tokenizer, embeddings,
final norm, LM head) of one model and a DHT node. ``stream`` looks up who serves
every block (``swarm.announce.fetch_swarm_view``), plans the cheapest chain, opens a
``Chain`` of sessions and then loops: embed the new tokens, send them through the
chain, sample from the last hidden state (with ``speculative``, the step also carries
tokens a drafter proposed, the target's logits at every one decide which are kept, and
the next step starts where the kept ones end: ``peer.speculative``). It is an async generator with no nursery
open across its ``yield`` (so it is safe to iterate from any task); ``generate``
drains it into a ``GenerationResult``.

Routing uses what this client measured (spec section 10, "Routing"): one
``swarm.health.PeerHealth`` per client holds every server's failure memory (backoff),
RTT and measured compute, and every plan of every generation reads it. A plan is made
on the cached view of the swarm; a view older than ``view_ttl`` is refreshed, but a
plan waits for that at most ``refresh_timeout`` (a hung DHT node must not cost a
failover its lookup timeouts). Before a route is used, every server on it this client
never measured is probed (``_probe``: a PING for the RTT, then a one-token
FORWARD_ONCE over the hop's blocks for its compute), together with the other
unmeasured candidates for the same blocks, so that servers announcing more than they
serve cost one probe round, not a failover each; then the route is planned again on
the measurements. A backed-off peer that published a new announcement since it
failed has come back (a restart) and is routable again (``PeerHealth.republished``;
a plan that finds no route refreshes the view first). A block announced only by
backed-off peers is ``NoRoute`` with ``retry_in``; a plan waits for a backoff the
server asked for (BUSY, LOADING) up to ``max_backoff_wait``, and fails fast otherwise.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import trio

from protocol import ForwardOnceResult, accept_forward_once_result, encode_tensor, sign_forward_once
from protocol.errors import ErrorCode, LocalProtocolError, RemoteError, SwarmError
from swarm.announce import SwarmView, fetch_swarm_view
from swarm.dht import DhtNode
from swarm.errors import NoRoute
from swarm.health import PeerHealth, TimeoutPolicy
from swarm.latency import PING_TIMEOUT, ping
from swarm.planning import Candidate, Hop, Route, RouteCosts, make_candidates, plan_candidates

from ._chain import HOP_FAILURES, AllCandidatesFailed, Chain, RollbackRequired, Spawn
from .credit import CreditService
from .runtime import ClientHead, InvalidArgument, ModelError, SamplingParams, TokenStream
from .speculative import NO_DRAFT, Speculative, accept_drafts

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeIs

    from verify import Auditor, FraudProofService, Reputation

#: Age of the swarm view that audits may use to pick independent peers (seconds).
AUDIT_VIEW_TTL = 30.0
#: How long a peer checked against the DHT's fraud proofs stays checked (seconds).
VET_TTL = 300.0
#: Seconds a plan waits for a stale view's refresh before it plans on the cached one.
REFRESH_TIMEOUT = 1.0
#: The longest a plan waits for a backoff a server asked for (BUSY, LOADING).
MAX_BACKOFF_WAIT = 5.0
#: Probe rounds before a route is used, and servers probed per round at most.
PROBE_ROUNDS = 3
PROBE_FANOUT = 16

ROUTE_COSTS = RouteCosts()

log = logging.getLogger("swarm.client")

__all__ = ["SwarmClient", "GenerationResult", "TokenEvent", "RouteHop", "PromptTooLong", "ModelNotServed"]


class ModelNotServed(SwarmError):
    """No peer in the swarm announces the model."""

    code = ErrorCode.MODEL_MISMATCH


class PromptTooLong(SwarmError):
    """The prompt plus the tokens to generate do not fit what the sessions allow."""

    code = ErrorCode.MAX_LENGTH_EXCEEDED


@dataclass(frozen=True, slots=True)
class RouteHop:
    peer_id: str  # hex
    address: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token: its id and the text it added (may be empty mid-character)."""

    token_id: int
    text: str
    index: int  # 0 for the first generated token
    # Audits with rate < 1 can convict a hop after tokens computed with its (unaudited,
    # wrong) outputs were yielded: then the generation rolls back, and the next event
    # says how many of the tokens yielded before it to discard (``index`` restarts
    # accordingly). Always 0 with rate 1 (nothing is yielded before its audit) or 0.
    rewind: int = 0


@dataclass(slots=True)
class GenerationResult:
    """What ``generate`` returns: the text, its tokens and how it was made."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" or "length"
    route: list[RouteHop]
    failovers: int
    time_to_first_token: float  # seconds
    total_seconds: float
    hop_latency: dict[str, float] = field(default_factory=dict)  # peer id hex -> seconds waited
    # Verification (spec 13.2, "Reporting"): hop-steps whose output was used, how many
    # were audited, and the share of those an independent check confirmed (None: no
    # audits). ``unverifiable_hops``: hops with audited steps nobody could check.
    hop_steps: int = 0
    audited_steps: int = 0
    verified_fraction: float | None = None
    unverifiable_hops: list[RouteHop] = field(default_factory=list)

    @property
    def fully_verified(self) -> bool:
        """True unless some audited hop-step could not be checked independently."""
        return not self.unverifiable_hops
    hedges: int = 0  # slow requests raced against another candidate
    pushed_steps: int = 0  # steps that went around the chain by server-to-server push
    steps: int = 0  # steps through the chain (prefill included)
    first_step_tokens: int = 1  # tokens the first step gave (1, or more when it verified drafts)
    drafted: int = 0  # speculative decoding: tokens drafted, and those the target kept
    accepted: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Tokens per second after the first token (decode speed): those the steps after
        the first gave, over the time they took."""
        decode = self.total_seconds - self.time_to_first_token
        later = len(self.token_ids) - self.first_step_tokens
        return later / decode if later > 0 and decode > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "route": [{"peer_id": h.peer_id, "address": h.address, "blocks": [h.start, h.end]} for h in self.route],
            "failovers": self.failovers, "hedges": self.hedges, "pushed_steps": self.pushed_steps,
            "steps": self.steps, "speculative": {"drafted": self.drafted, "accepted": self.accepted},
            "timings": {"time_to_first_token": self.time_to_first_token, "total_seconds": self.total_seconds,
                        "tokens_per_second": self.tokens_per_second, "hop_latency": self.hop_latency},
            "verification": self.verification_dict(),
        }

    def verification_dict(self) -> dict:
        """The verification facts as JSON (``--json``, the HTTP API's ``swarm`` field)."""
        return {"hop_steps": self.hop_steps, "audited_steps": self.audited_steps,
                "verified_fraction": self.verified_fraction,
                "unverifiable_hops": [{"peer_id": h.peer_id, "address": h.address, "blocks": [h.start, h.end]}
                                      for h in self.unverifiable_hops]}

    def verification_warning(self) -> str | None:
        """The one-line warning ``generate`` prints when some hop could not be checked."""
        if not self.unverifiable_hops:
            return None
        hops = ", ".join(f"{h.peer_id[:12]}[{h.start}:{h.end}]" for h in self.unverifiable_hops)
        share = f"{self.verified_fraction:.0%}" if self.verified_fraction is not None else "none"
        return (f"only {share} of {self.audited_steps} audited hop-steps could be checked independently; "
                f"unverified: {hops} (add servers for those blocks, or let the client recompute them: "
                f"local_recompute_bytes)")


class SwarmClient:
    """Generates text with the swarm serving ``head``'s model.

    Args:
        dht: a running DHT node (its host is the client's transport).
        head: the model's client head; its ``model_id`` must be what servers announce.
        wire_dtype: hidden-state dtype on the wire (lossless ``f32`` by default).
        step_timeout: seconds a hop may take for one step before it counts as failed.
        banned: peer ids never to route through (the verification layer adds to it).
        credit: the peer's credit service; receipts for work received are sent through it.
        auditor: spot-checks hop-steps (``verify.Auditor``); None: no audits (fast path).
        reputation: per-peer standings (``verify.Reputation``): routing adds each peer's
            penalty to its cost, and its ban list becomes ``banned``.
        fraud: the peer's fraud proof service: before a generation uses a peer, proofs
            stored against it in the DHT are fetched and verified (once per ``VET_TTL``).
        health: failure memory and measurements (default: a fresh one, deadlines at
            most ``step_timeout``); shared by every generation of this client.
        spawn: starts a task in a nursery that outlives generations (``nursery.start_soon``):
            view refreshes and hedges run there; None: no hedging, refreshes inline.
        probe: measure servers before first use (module docstring).
        costs: the planner's cost parameters (``relay`` "star" is how this client relays).
    """

    def __init__(self, dht: DhtNode, head: ClientHead, *, wire_dtype: str = "f32", step_timeout: float = 60.0,
                 max_failovers: int = 8, banned: set[bytes] | None = None,
                 view_ttl: float = 2.0, credit: CreditService | None = None, auditor: Auditor | None = None,
                 reputation: Reputation | None = None, fraud: FraudProofService | None = None,
                 health: PeerHealth | None = None, spawn: Spawn | None = None, probe: bool = True,
                 refresh_timeout: float = REFRESH_TIMEOUT, max_backoff_wait: float = MAX_BACKOFF_WAIT,
                 costs: RouteCosts = ROUTE_COSTS) -> None:
        self.dht = dht
        self.host = dht.host
        self.head = head
        self.model = head.model_id
        self.num_blocks = head.num_blocks
        self.wire_dtype = wire_dtype
        self.step_timeout = step_timeout
        self.max_failovers = max_failovers
        self.banned = banned if banned is not None else set()
        self.view_ttl = view_ttl
        self.credit = credit
        self.auditor = auditor
        self.reputation = reputation
        self.fraud = fraud
        self._vetted: dict[bytes, float] = {}  # peer id -> when its stored fraud proofs were checked
        if reputation is not None:  # one ban list for routing, audits and the proof service
            reputation.banned.update(self.banned)
            self.banned = reputation.banned
        self.health = health if health is not None else PeerHealth(timeouts=TimeoutPolicy(cap=step_timeout))
        self.spawn = spawn
        self.probe = probe
        self.refresh_timeout = refresh_timeout
        self.max_backoff_wait = max_backoff_wait
        self.costs = costs
        self.probes = 0  # servers probed (a PING and, for compute, a FORWARD_ONCE)
        self._view: tuple[float, SwarmView] | None = None
        self._refreshing: trio.Event | None = None
        self.max_length = int(getattr(head.info.config, "max_position_embeddings", 0) or 1 << 20)

    # -- the swarm view -----------------------------------------------------------------------

    async def swarm_view(self, *, fresh: bool = False) -> SwarmView:
        """Who serves which blocks of the model (cached for ``view_ttl`` seconds)."""
        now = trio.current_time()
        if fresh or self._view is None or now - self._view[0] > self.view_ttl:
            self._view = (now, await fetch_swarm_view(self.dht, self.model, self.num_blocks))
        return self._view[1]

    async def _planning_view(self) -> SwarmView:
        """The cached view, refreshed first if stale, waiting for that at most
        ``refresh_timeout`` (the first view is always waited for)."""
        if self._view is None:
            return await self.swarm_view(fresh=True)
        if trio.current_time() - self._view[0] > self.view_ttl:
            await self._refresh(self.refresh_timeout)
        return self._view[1]

    async def _refresh(self, wait: float) -> None:
        """Refresh the view (or join the refresh under way), waiting at most ``wait``
        seconds; a refresh cut short keeps the cached view for another ``view_ttl``."""
        done = self._refreshing
        if done is None:
            done = self._refreshing = trio.Event()
            if self.spawn is not None:
                self.spawn(self._fetch_view, done)
            else:
                with trio.move_on_after(wait):
                    await self._fetch_view(done)
                if not done.is_set():  # cut short: try again after view_ttl
                    self._refreshing = None
                    if self._view is not None:
                        self._view = (trio.current_time(), self._view[1])
                return
        with trio.move_on_after(wait):
            await done.wait()

    async def _fetch_view(self, done: trio.Event) -> None:
        try:
            self._view = (trio.current_time(), await fetch_swarm_view(self.dht, self.model, self.num_blocks))
        except SwarmError as exc:
            log.info("refreshing the swarm view failed: %s", exc)
        finally:
            if self._refreshing is done:
                self._refreshing = None
            done.set()

    # -- planning -------------------------------------------------------------------------------

    async def plan(self, start: int = 0, end: int | None = None, *, exclude: frozenset[bytes] = frozenset(),
                   fresh: bool = False, ignore_backoff: bool = False) -> Route:
        """The cheapest route for blocks [start, end) on what this client knows now
        (the cached view, its measurements, its backoffs unless ``ignore_backoff``).
        Raises NoRoute naming the gap (with ``retry_in`` when only backed-off peers
        announce it)."""
        view = await (self.swarm_view(fresh=True) if fresh else self._planning_view())
        if not view.servers:
            raise ModelNotServed(f"no peer in the swarm serves {self.model}; start servers with "
                                 f"'swarm-peer serve --model ...' for the same model")
        try:
            return self._plan_on(view, start, end, exclude, ignore_backoff=ignore_backoff)
        except NoRoute:
            if fresh:
                raise
        # The cached view may predate a server that covers the gap now.
        await self._refresh(self.refresh_timeout)
        assert self._view is not None
        return self._plan_on(self._view[1], start, end, exclude, ignore_backoff=ignore_backoff)

    def candidates(self, view: SwarmView) -> list[Candidate]:
        """The view's servers as the planner sees them: routable only for blocks they
        published themselves, announced compute clamped by what this client measured,
        this client's RTTs, reputation penalties."""
        rtts = {p: r for p in view.servers if (r := self.health.rtt(p)) is not None}
        measured = {p: s for p in view.servers if (s := self.health.block_seconds(p)) is not None}
        penalties = None
        if self.reputation is not None:
            now = time.time()
            penalties = {p: self.reputation.penalty(p, now) for p in view.servers if p not in self.banned}
        return make_candidates(view.announcements, rtts=rtts, measured=measured, penalties=penalties,
                               routable=view.routable, costs=self.costs)

    def _plan_on(self, view: SwarmView, start: int, end: int | None, exclude: frozenset[bytes], *,
                 ignore_backoff: bool = False) -> Route:
        now = trio.current_time()
        wall = time.time()
        for peer, published in view.published.items():  # back since it failed: routable again
            if self.health.republished(peer, now, published_ago=wall - published):
                log.info("peer %s published again after its failure: its backoff ends", peer.hex()[:12])
        backed_off = frozenset() if ignore_backoff else self.health.excluded(now, view.servers)
        candidates = self.candidates(view)
        try:
            return plan_candidates(candidates, num_blocks=self.num_blocks, start=start, end=end, banned=self.banned,
                                   exclude=exclude | backed_off, model=self.model, costs=self.costs)
        except NoRoute as gap:
            waiting = [c.peer_id for c in candidates if c.peer_id in backed_off and c.peer_id not in exclude
                       and c.peer_id not in self.banned and c.start <= gap.start < c.end]
            if not waiting:
                raise
            retry_in = min(self.health.backoff_left(p, now) for p in waiting)
            raise NoRoute(gap.start, gap.end, model=self.model, retry_in=retry_in) from None

    async def route(self, start: int = 0, end: int | None = None, *,
                    exclude: frozenset[bytes] = frozenset()) -> Route:
        """A route for blocks [start, end) on measured servers: plans, probes the servers
        on it never measured (and the other unmeasured candidates for the same blocks),
        plans again; waits for a requested backoff up to ``max_backoff_wait``.

        Raises:
            NoRoute: the blocks are not served, or only by peers backed off for longer.
            ModelNotServed: nobody serves the model.
        """
        waited = 0.0
        rounds = 0
        while True:
            try:
                route = await self.plan(start, end, exclude=exclude)
            except NoRoute as gap:
                if gap.retry_in is None or waited + gap.retry_in > self.max_backoff_wait:
                    raise
                await trio.sleep(gap.retry_in + 0.01)
                waited += gap.retry_in + 0.01
                continue
            if not self.probe or rounds >= PROBE_ROUNDS or not await self._probe(route, exclude):
                return route
            rounds += 1

    async def alternative(self, start: int, end: int, exclude: frozenset[bytes]) -> Route | None:
        """A route for [start, end) around ``exclude`` to hedge with: one hop or several
        (when no other single server covers the span), planned on the cached view
        without waiting; None if there is none."""
        if self._view is None:
            return None
        try:
            return self._plan_on(self._view[1], start, end, exclude)
        except NoRoute:
            return None

    # -- probes ---------------------------------------------------------------------------------

    async def _probe(self, route: Route, exclude: frozenset[bytes]) -> bool:
        """Measure the route's servers this client never measured (or whose RTT is old),
        with up to ``PROBE_FANOUT`` other unmeasured candidates of the same blocks, all at
        once. Returns False when there was nothing to measure."""
        now = trio.current_time()

        def due(peer: bytes) -> bool:
            return not self.health.measured(peer) or self.health.needs_rtt(peer, now)

        unmeasured = [h for h in route.hops if due(h.peer_id)]
        if not unmeasured:
            return False
        targets: dict[bytes, tuple[tuple[str, ...], int, int]] = {h.peer_id: (h.addrs, h.start, h.end)
                                                                   for h in unmeasured}
        if self._view is not None:
            others = sorted((c for c in self.candidates(self._view[1]) if c.peer_id not in targets
                             and not self.health.measured(c.peer_id) and c.peer_id not in exclude
                             and c.peer_id not in self.banned and not self.health.backed_off(c.peer_id, now)),
                            key=lambda c: (c.rtt + c.extra + c.block_seconds, c.peer_id))
            for c in others:
                if len(targets) >= PROBE_FANOUT:
                    break
                for h in unmeasured:
                    lo, hi = max(c.start, h.start), min(c.end, h.end)
                    if lo < hi and c.peer_id not in targets:
                        targets[c.peer_id] = (c.addrs, lo, hi)
        banned = await self._vet_peers(list(targets))  # a probe is a use: check for stored proofs first
        async with trio.open_nursery() as nursery:
            for peer, (addrs, lo, hi) in targets.items():
                if peer not in banned:
                    nursery.start_soon(self._probe_one, peer, addrs, lo, hi)
        return True

    async def _probe_one(self, peer: bytes, addrs: tuple[str, ...], start: int, end: int) -> None:
        """PING ``peer`` for its RTT; then, if its compute was never measured, one token
        through [start, end) as FORWARD_ONCE. Any failure backs the peer off."""
        self.probes += 1
        timeouts = self.health.timeouts
        try:
            # A first contact (dial, handshake, PING) gets the unmeasured deadline too: on a
            # loaded machine a new peer's handshake alone can take longer than a PING's
            # usual 2 s, and a missed probe backs an honest server off for 15 s.
            first = timeouts.unmeasured if self.health.rtt(peer) is None else PING_TIMEOUT
            rtt = await ping(self.host, peer, addrs, timeout=min(first, self.step_timeout))
            self.health.observe_rtt(peer, rtt, trio.current_time())
            if self.health.measured(peer):
                return
            conn = await self.host.connect(addrs[0], peer_id=peer, timeout=min(first, self.step_timeout))
            wire = encode_tensor(self.head.embed([0]).to("cpu"), "f32")
            request, state = sign_forward_once(self.host.identity, server=peer, nonce=secrets.token_bytes(16),
                                               model=self.model, span=(start, end), hidden=wire)
            # No compute estimate yet: the unmeasured deadline (a first step on a loaded
            # machine can take seconds), plus the RTT's share. Probes run concurrently, so
            # liars cost one such deadline per probe round, not one each.
            timeout = min(timeouts.unmeasured + timeouts.slack * rtt, self.step_timeout)
            t0 = time.perf_counter()
            result = cast(ForwardOnceResult, await conn.request(request, timeout=timeout))
            seconds = time.perf_counter() - t0
            accept_forward_once_result(state, request, result, server_public_key=conn.public_key)
        except HOP_FAILURES as exc:
            retry_after = exc.retry_after if isinstance(exc, RemoteError) else None
            self.health.failed(peer, trio.current_time(), retry_after=retry_after, reason=f"probe: {exc}")
            log.info("probe of %s failed: %s", peer.hex()[:12], exc)
            return
        self.health.observe_step(peer, trio.current_time(), seconds=seconds, blocks=end - start, tokens=1,
                                 success=False)

    async def audit_candidates(self, span: tuple[int, int]) -> list[tuple[bytes, tuple[str, ...]]]:
        """Peers announcing, in records of their own, a span that covers ``span`` (the
        auditor filters them), less those this client backs off (a hung auditor would
        cost every audit its deadline). A view up to ``AUDIT_VIEW_TTL`` old will do: an
        audit only needs some independent holder; refreshing it waits ``refresh_timeout``
        at most."""
        cached = self._view
        if cached is None:
            view = await self.swarm_view()
        else:
            if trio.current_time() - cached[0] > AUDIT_VIEW_TTL:
                await self._refresh(self.refresh_timeout)
            assert self._view is not None
            view = self._view[1]
        now = trio.current_time()
        return [(a.peer_id, tuple(a.addrs)) for a in view.announcements
                if not self.health.backed_off(a.peer_id, now)
                and any(lo <= span[0] and span[1] <= hi for lo, hi in view.routable(a))]

    async def generate(self, prompt: str | list[dict[str, str]] | list[int], params: SamplingParams | None = None, *,
                       chat: bool = True, on_token: Callable[[TokenEvent], None] | None = None,
                       speculative: Speculative | None = None) -> GenerationResult:
        """Generate a completion of ``prompt``; see ``stream`` for arguments and errors."""
        result: list[GenerationResult] = []
        async for event in self.stream(prompt, params, chat=chat, result_out=result, speculative=speculative):
            if on_token is not None:
                on_token(event)
        return result[0]

    async def stream(self, prompt: str | list[dict[str, str]] | list[int], params: SamplingParams | None = None, *,
                     chat: bool = True, result_out: list[GenerationResult] | None = None,
                     speculative: Speculative | None = None) -> AsyncIterator[TokenEvent]:
        """Yield tokens as they are generated.

        Args:
            prompt: text, chat messages ``[{"role": ..., "content": ...}]``, or token ids.
            params: sampling parameters (default: greedy, 64 new tokens).
            chat: wrap a text prompt in the model's chat template.
            result_out: if given, the final ``GenerationResult`` is appended to it.
            speculative: draft tokens locally and verify them in one step through the
                chain (``peer.speculative``); the output is the target's either way
                (greedy: the same tokens).

        Raises:
            InvalidArgument: bad prompt or parameters.
            PromptTooLong: prompt + max_new_tokens exceed the model's context.
            NoRoute: some blocks are served by nobody.
            AllCandidatesFailed: every server that could take some blocks failed.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidArgument("params must be a SamplingParams")
        decode_text = True
        if _is_token_ids(prompt):
            prompt_ids = list(prompt)  # already token ids
            if min(prompt_ids) < 0 or max(prompt_ids) >= self.head.vocab_size:
                raise InvalidArgument(f"token ids must be in [0, {self.head.vocab_size})")
            try:
                self.head.tokenizer  # noqa: B018 -- text is optional when ids come in
            except ModelError:
                if params.stop:  # stop strings need the text
                    raise
                decode_text = False
        else:
            prompt_ids = self.head.encode_prompt(prompt, chat=chat)
        max_length = len(prompt_ids) + params.max_new_tokens
        if max_length > self.max_length:
            raise PromptTooLong(f"prompt of {len(prompt_ids)} tokens + {params.max_new_tokens} new tokens exceeds "
                                f"the model's context of {self.max_length}; shorten the prompt or max_new_tokens")
        tokens = TokenStream(self.head, params, prompt_ids)
        t0 = time.perf_counter()
        route = await self._vet(await self.route())
        chain = self._chain(max_length)
        first_token_at = None
        yielded = rewind = 0
        rng_states: list[torch.Tensor] = []  # the sampler's RNG before each token, for rollbacks
        policy = speculative.policy() if speculative is not None else None
        if speculative is not None:
            speculative.drafter.start(max_length, tokens.sampler.seed)
        fed = 0  # tokens of prompt + output whose keys the chain's sessions hold (kept)
        steps = drafted = accepted = 0
        first_step_tokens: int | None = None
        try:
            await chain.open(route)
            shown = ""
            while True:
                ids = tokens.prompt_ids + tokens.new_ids
                draft = NO_DRAFT
                if speculative is not None and policy is not None:
                    k = min(policy.next(), params.max_new_tokens - len(tokens.new_ids) - 1)
                    if k > 0:
                        draft = await trio.to_thread.run_sync(speculative.drafter.draft, ids, k, tokens.sampler)
                # Below the sessions' length (drafts rejected last step) this rolls them back.
                hidden = self.head.embed(ids[fed:] + list(draft.tokens))
                try:
                    out = await chain.step(hidden, fed)
                except RollbackRequired as rollback:
                    # Tokens at positions <= rollback.position came from verified outputs.
                    keep = max(rollback.position + 1 - len(prompt_ids), 0)
                    chain = await self._rebuild(chain, max_length)
                    if keep < len(tokens.new_ids):
                        _restore_rng(tokens, rng_states[keep])
                    del tokens.new_ids[keep:], rng_states[keep:]
                    tokens.finish_reason = None
                    rewind += max(yielded - keep, 0)
                    yielded = min(yielded, keep)
                    shown = _stable_text(tokens, decode_text)
                    fed = 0
                    continue
                steps += 1
                before = len(tokens.new_ids)
                rng = _rng_state(tokens) if self.auditor is not None else None
                kept = accept_drafts(tokens, self.head.logits_rows(out[:, -len(draft.tokens) - 1:]), draft)
                fed = len(ids) + kept
                if first_step_tokens is None:
                    first_step_tokens = len(tokens.new_ids) - before
                if policy is not None and speculative is not None:
                    policy.update(len(draft.tokens), kept)
                    drafted, accepted = drafted + len(draft.tokens), accepted + kept
                    speculative.offered += len(draft.tokens)
                    speculative.accepted += kept
                for index in range(before, len(tokens.new_ids)):
                    if rng is not None:  # a rollback redoes the step's tokens from the RNG before it
                        rng_states.append(rng)
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    token = tokens.new_ids[index]
                    final = tokens.done and index == len(tokens.new_ids) - 1
                    # Hold back a trailing replacement character: the next token may complete it.
                    text = (self.head.decode(tokens.new_ids[:index + 1]) if index + 1 < len(tokens.new_ids)
                            else tokens.text) if decode_text else ""
                    stable = text if final or not text.endswith("\ufffd") else text[:-1]
                    if params.stop and not final:  # nor what may be the start of a stop string
                        stable = stable[:len(stable) - _stop_prefix_length(stable, params.stop)]
                    delta = stable[len(shown):] if stable.startswith(shown) else ""
                    shown = stable if stable.startswith(shown) else shown
                    if not (final and tokens.finish_reason == "eos"):
                        yield TokenEvent(token_id=token, text=delta, index=index, rewind=rewind)
                        yielded, rewind = yielded + 1, 0
                if tokens.done:
                    break
            if result_out is not None:
                result = self._result(tokens, chain, t0, first_token_at or time.perf_counter(), text=shown)
                result.steps, result.drafted, result.accepted = steps, drafted, accepted
                result.first_step_tokens = first_step_tokens or 1
                result_out.append(result)
        except HOP_FAILURES as exc:  # the chain fails over every hop failure; this is a safety net
            if isinstance(exc, LocalProtocolError):
                raise  # our own bug, not a hop's failure
            log.warning("a hop failure escaped the relay chain: %r", exc)
            raise AllCandidatesFailed(0, self.num_blocks, chain.failovers, exc) from exc
        finally:
            with trio.CancelScope(shield=True):
                await chain.aclose()

    async def _vet(self, route: Route) -> Route:
        """Check the route's peers against fraud proofs stored in the DHT (a peer that
        joined after a proof was gossiped learns of it here); re-plan around any that
        turn out banned."""
        for _ in range(self.max_failovers):
            if not await self._vet_peers([h.peer_id for h in route.hops]):
                return route
            route = await self.route()
        return route

    async def _vet_peers(self, peers: list[bytes]) -> list[bytes]:
        """Check ``peers`` not checked within ``VET_TTL`` against the DHT's fraud proofs;
        returns (and bans) those a stored proof convicts."""
        fraud = self.fraud
        if fraud is None:
            return []
        now = time.monotonic()
        unchecked = [p for p in dict.fromkeys(peers) if now - self._vetted.get(p, -VET_TTL) >= VET_TTL]
        banned: list[bytes] = []

        async def check(peer_id: bytes) -> None:
            if await fraud.check_peer(peer_id):
                banned.append(peer_id)

        async with trio.open_nursery() as nursery:
            for peer_id in unchecked:
                nursery.start_soon(check, peer_id)
        for peer_id in unchecked:
            self._vetted[peer_id] = now
        self.banned.update(banned)
        return banned

    async def _rebuild(self, chain: Chain, max_length: int) -> Chain:
        """A fresh chain on a fresh route (after a rollback: every hop's cache is suspect)."""
        with trio.CancelScope(shield=True):
            await chain.aclose()
        fresh = self._chain(max_length)
        fresh.failed |= chain.failed
        fresh.failovers = chain.failovers
        fresh.verification, fresh.disputed, fresh.unredoable = chain.verification, chain.disputed, chain.unredoable
        fresh.hedges = chain.hedges
        fresh.pushed_steps = chain.pushed_steps
        fresh.push_broken |= chain.push_broken
        await fresh.open(await self._vet(await self.route(exclude=frozenset(fresh.failed))))
        return fresh

    def _chain(self, max_length: int) -> Chain:
        return Chain(self.host, model=self.model, max_length=max_length, replan=self._replan,
                     wire_dtype=self.wire_dtype, step_timeout=self.step_timeout, max_failovers=self.max_failovers,
                     credit=self.credit, auditor=self.auditor, health=self.health, alternative=self.alternative,
                     spawn=self.spawn, relay=self.costs.relay)

    async def _replan(self, start: int, end: int, exclude: frozenset[bytes], *,
                      ignore_backoff: bool = False) -> Route:
        """``Chain``'s replan: ``route``; with ``ignore_backoff``, a plan that may use
        backed-off peers (a disputed hop with no other holder left)."""
        if not ignore_backoff:
            return await self.route(start, end, exclude=exclude)
        return await self.plan(start, end, exclude=exclude, ignore_backoff=True)

    def _result(self, tokens: TokenStream, chain: Chain, t0: float, first: float, *, text: str) -> GenerationResult:
        end = time.perf_counter()
        checks = chain.verification
        unverifiable = [RouteHop(peer_id=peer.hex(), address=checks.addresses.get(peer, ""), start=start, end=stop)
                        for peer, start, stop in checks.unverifiable]
        result = GenerationResult(
            text=text, token_ids=list(tokens.new_ids), prompt_tokens=len(tokens.prompt_ids),
            finish_reason=tokens.finish_reason or "length", route=[_route_hop(r.hop, r.conn.address) for r in chain.hops],
            failovers=chain.failovers, time_to_first_token=first - t0, total_seconds=end - t0,
            hop_latency={r.hop.peer_id.hex(): r.latency for r in chain.hops}, hop_steps=checks.hop_steps,
            audited_steps=checks.audited, verified_fraction=checks.verified_fraction,
            unverifiable_hops=unverifiable, hedges=chain.hedges, pushed_steps=chain.pushed_steps)
        warning = result.verification_warning()
        if warning is not None:
            log.warning("%s", warning)
        return result


def _route_hop(hop: Hop, address: str) -> RouteHop:
    # The address the hop announced (and was dialled at): the connection's remote end
    # is an ephemeral port when the connection in use is one the hop dialled, as a
    # server's own API does through its own host.
    shown = hop.addrs[0] if hop.addrs else address
    return RouteHop(peer_id=hop.peer_id.hex(), address=shown, start=hop.start, end=hop.end)


def _stable_text(tokens: TokenStream, decode_text: bool) -> str:
    text = tokens.text if decode_text else ""
    return text[:-1] if text.endswith("\ufffd") else text


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The longest tail of ``text`` that begins some stop string (and may complete it)."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


def _is_token_ids(prompt: str | list[dict[str, str]] | list[int]) -> TypeIs[list[int]]:
    """Whether ``prompt`` is token ids (a non-empty list of ints) rather than text or chat."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(type(t) is int for t in prompt)


def _rng_state(tokens: TokenStream) -> torch.Tensor:
    return tokens.sampler.get_state()


def _restore_rng(tokens: TokenStream, state: torch.Tensor) -> None:
    tokens.sampler.set_state(state)
