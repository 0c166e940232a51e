"""The generating side of a peer: routing, the relay loop and sampling.

Theory of operation. ``SwarmClient`` holds the client head (tokenizer, embeddings,
final norm, LM head) of one model and a DHT node. ``stream`` looks up who serves
every block (``swarm.announce.fetch_swarm_view``), plans the cheapest chain
(``swarm.planning.plan_route``), opens a ``Chain`` of sessions and then loops: embed
the new tokens, send them through the chain, sample from the last hidden state. It is
an async generator with no nursery open across its ``yield`` (so it is safe to
iterate from any task); ``generate`` drains it into a ``GenerationResult``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from protocol.errors import ErrorCode, SwarmError
from swarm.announce import SwarmView, fetch_swarm_view
from swarm.dht import DhtNode
from swarm.planning import Hop, Route, RouteCosts, plan_route

from ._chain import Chain, RollbackRequired
from .credit import CreditService
from .runtime import ClientHead, InvalidArgument, ModelError, SamplingParams, TokenStream

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeIs

    from verify import Auditor, FraudProofService, Reputation

#: Age of the swarm view that audits may use to pick independent peers (seconds).
AUDIT_VIEW_TTL = 30.0
#: How long a peer checked against the DHT's fraud proofs stays checked (seconds).
VET_TTL = 300.0

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

    @property
    def tokens_per_second(self) -> float:
        decode = self.total_seconds - self.time_to_first_token
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "route": [{"peer_id": h.peer_id, "address": h.address, "blocks": [h.start, h.end]} for h in self.route],
            "failovers": self.failovers,
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
    """

    def __init__(self, dht: DhtNode, head: ClientHead, *, wire_dtype: str = "f32", step_timeout: float = 60.0,
                 max_failovers: int = 8, banned: set[bytes] | None = None,
                 view_ttl: float = 2.0, credit: CreditService | None = None, auditor: Auditor | None = None,
                 reputation: Reputation | None = None, fraud: FraudProofService | None = None) -> None:
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
        self._view: tuple[float, SwarmView] | None = None
        self.max_length = int(getattr(head.info.config, "max_position_embeddings", 0) or 1 << 20)

    async def swarm_view(self, *, fresh: bool = False) -> SwarmView:
        """Who serves which blocks of the model (cached for ``view_ttl`` seconds)."""
        now = trio.current_time()
        if fresh or self._view is None or now - self._view[0] > self.view_ttl:
            self._view = (now, await fetch_swarm_view(self.dht, self.model, self.num_blocks))
        return self._view[1]

    async def plan(self, start: int = 0, end: int | None = None, *, exclude: frozenset[bytes] = frozenset(),
                   fresh: bool = False) -> Route:
        """The cheapest route for blocks [start, end). Raises NoRoute naming the gap."""
        view = await self.swarm_view(fresh=fresh)
        if not view.servers:
            raise ModelNotServed(f"no peer in the swarm serves {self.model}; start servers with "
                                 f"'swarm-peer serve --model ...' for the same model")
        rtts = None
        if self.reputation is not None:
            rtts = self.reputation.route_rtts(view.servers, time.time(), base=ROUTE_COSTS.default_rtt)
        return plan_route(view.announcements, num_blocks=self.num_blocks, start=start, end=end, rtts=rtts,
                          banned=self.banned, exclude=exclude, model=self.model, costs=ROUTE_COSTS)

    async def audit_candidates(self, span: tuple[int, int]) -> list[tuple[bytes, tuple[str, ...]]]:
        """Peers announcing a span that covers ``span`` (the auditor filters them). A view
        up to ``AUDIT_VIEW_TTL`` old will do: an audit only needs some independent holder."""
        cached = self._view
        if cached is not None and trio.current_time() - cached[0] <= AUDIT_VIEW_TTL:
            view = cached[1]
        else:
            view = await self.swarm_view()
        return [(a.peer_id, tuple(a.addrs)) for a in view.announcements
                if a.span[0] <= span[0] and span[1] <= a.span[1]]

    async def generate(self, prompt: str | list[dict[str, str]] | list[int], params: SamplingParams | None = None, *,
                       chat: bool = True, on_token: Callable[[TokenEvent], None] | None = None) -> GenerationResult:
        """Generate a completion of ``prompt``; see ``stream`` for arguments and errors."""
        result: list[GenerationResult] = []
        async for event in self.stream(prompt, params, chat=chat, result_out=result):
            if on_token is not None:
                on_token(event)
        return result[0]

    async def stream(self, prompt: str | list[dict[str, str]] | list[int], params: SamplingParams | None = None, *,
                     chat: bool = True, result_out: list[GenerationResult] | None = None
                     ) -> AsyncIterator[TokenEvent]:
        """Yield tokens as they are generated.

        Args:
            prompt: text, chat messages ``[{"role": ..., "content": ...}]``, or token ids.
            params: sampling parameters (default: greedy, 64 new tokens).
            chat: wrap a text prompt in the model's chat template.
            result_out: if given, the final ``GenerationResult`` is appended to it.

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
        route = await self._vet(await self.plan())
        chain = Chain(self.host, model=self.model, max_length=max_length, replan=self._replan,
                      wire_dtype=self.wire_dtype, step_timeout=self.step_timeout, max_failovers=self.max_failovers,
                      credit=self.credit, auditor=self.auditor)
        first_token_at = None
        yielded = rewind = 0
        rng_states: list[torch.Tensor] = []  # the sampler's RNG before each token, for rollbacks
        try:
            await chain.open(route)
            hidden = self.head.embed(prompt_ids)
            position = 0
            shown = ""
            while True:
                try:
                    out = await chain.step(hidden, position)
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
                    hidden = self.head.embed(prompt_ids + tokens.new_ids)
                    position = 0
                    continue
                position += hidden.shape[1]
                if self.auditor is not None:
                    rng_states.append(_rng_state(tokens))
                token = tokens.push(self.head.logits(out[:, -1]))
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                # Hold back a trailing replacement character: the next token may complete it.
                text = tokens.text if decode_text else ""
                stable = text if tokens.done or not text.endswith("\ufffd") else text[:-1]
                if params.stop and not tokens.done:  # nor what may be the start of a stop string
                    stable = stable[:len(stable) - _stop_prefix_length(stable, params.stop)]
                delta = stable[len(shown):] if stable.startswith(shown) else ""
                shown = stable if stable.startswith(shown) else shown
                if tokens.finish_reason != "eos":
                    yield TokenEvent(token_id=token, text=delta, index=len(tokens.new_ids) - 1, rewind=rewind)
                    yielded, rewind = yielded + 1, 0
                if tokens.done:
                    break
                hidden = self.head.embed([token])
            if result_out is not None:
                result_out.append(self._result(tokens, chain, t0, first_token_at or time.perf_counter(),
                                               text=shown))
        finally:
            with trio.CancelScope(shield=True):
                await chain.aclose()

    async def _vet(self, route: Route) -> Route:
        """Check the route's peers against fraud proofs stored in the DHT (a peer that
        joined after a proof was gossiped learns of it here); re-plan around any that
        turn out banned."""
        fraud = self.fraud
        if fraud is None:
            return route
        for _ in range(self.max_failovers):
            now = time.monotonic()
            unchecked = [h.peer_id for h in route.hops if now - self._vetted.get(h.peer_id, -VET_TTL) >= VET_TTL]
            if not unchecked:
                return route
            banned: list[bytes] = []

            async def check(peer_id: bytes) -> None:
                if await fraud.check_peer(peer_id):
                    banned.append(peer_id)

            async with trio.open_nursery() as nursery:
                for peer_id in unchecked:
                    nursery.start_soon(check, peer_id)
            for peer_id in unchecked:
                self._vetted[peer_id] = now
            if not banned:
                return route
            self.banned.update(banned)
            route = await self.plan()
        return route

    async def _rebuild(self, chain: Chain, max_length: int) -> Chain:
        """A fresh chain on a fresh route (after a rollback: every hop's cache is suspect)."""
        with trio.CancelScope(shield=True):
            await chain.aclose()
        fresh = Chain(self.host, model=self.model, max_length=max_length, replan=self._replan,
                      wire_dtype=self.wire_dtype, step_timeout=self.step_timeout, max_failovers=self.max_failovers,
                      credit=self.credit, auditor=self.auditor)
        fresh.failed |= chain.failed
        fresh.failovers = chain.failovers
        fresh.verification, fresh.disputed, fresh.unredoable = chain.verification, chain.disputed, chain.unredoable
        await fresh.open(await self._vet(await self.plan(fresh=True)))
        return fresh

    async def _replan(self, start: int, end: int, exclude: frozenset[bytes]) -> Route:
        return await self.plan(start, end, exclude=exclude, fresh=True)

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
            unverifiable_hops=unverifiable)
        warning = result.verification_warning()
        if warning is not None:
            log.warning("%s", warning)
        return result


def _route_hop(hop: Hop, address: str) -> RouteHop:
    return RouteHop(peer_id=hop.peer_id.hex(), address=address, start=hop.start, end=hop.end)


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
