"""Parts 2-4 of ``bench/audit.py``: collusion on loopback swarms, framing attempts,
Sybil credit fan-out (see that module's docstring for what each measures)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import trio

import peer.node
from peer.api import Swarm
from peer.client import TokenEvent
from peer.node import ServeOptions, ServerNode, run_server
from peer.runtime import ClientHead, SpanExecutor, load_head, load_span
from peer.server import SpanServer
from protocol import Announcement, FraudProof, Identity, SessionState, accept_result, check_forward, decode_tensor, encode_tensor, \
    sign_forward, sign_result
from swarm.credit import Ledger, WorkGraph, countersign, make_receipt, max_flow_2hop
from swarm.transport import Host
from verify import AuditPolicy, AuditResult, History, InvalidProof, compare, proof_from_transcript, tolerance_for, verify_proof

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["OffsetExecutor", "TamperedJob", "collusion", "framing", "sybil_credit", "save_tiny"]

PROMPTS = [[1, 5, 9, 33, 7, 250], [900, 3, 14, 15], [42, 42, 7]]
#: Ways an honest server may compute a step (framing part): its session, the session
#: one token at a time, one pass, float64 rounded, float64 blocks with float32 between.
HONEST = ("session", "tokenwise", "once", "f64", "blockwise")
#: The cheaters' offset, relative to the row RMS: small next to the hidden state, large
#: enough that an undetected cheat usually changes the greedy tokens (so that "wrong
#: tokens" measures what got through; at 1 % the tiny model's tokens rarely change).
OFFSET = 0.2


def save_tiny(path: str, *, hidden: int = 64, layers: int = 6, init: float = 0.02, seed: int = 0) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, eos_token_id=2, bos_token_id=1,
                                         tie_word_embeddings=False, initializer_range=init)).eval()
    model.save_pretrained(path)
    return model


# -- Part 2: collusion ---------------------------------------------------------------------------


class TamperedJob:
    """A ForwardJob (how the server computes a step, in pieces) whose result passes
    through ``tamper``; with ``delay``, its first piece first sleeps that long (in the
    compute thread, like real work). Tests use it too."""

    def __init__(self, job: Any, tamper: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 delay: float = 0.0) -> None:
        self._job, self._tamper = job, tamper
        self.pieces = list(job.pieces)
        if delay and self.pieces:
            work, first = self.pieces[0]

            def slow_first() -> Any:
                time.sleep(delay)
                return first()

            self.pieces[0] = (work, slow_first)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def run(self) -> torch.Tensor:
        for _, piece in self.pieces:
            piece()
        return self.result()

    def result(self) -> torch.Tensor:
        out = self._job.result()
        return self._tamper(out) if self._tamper is not None else out


class OffsetExecutor:
    """FORWARD outputs (and, for colluders, FORWARD_ONCE outputs) plus ``offset`` times
    the row RMS along one fixed direction, the same for every cheater. Tests use it too."""

    def __init__(self, real: SpanExecutor, *, once_too: bool, offset: float = OFFSET) -> None:
        self._real = real
        self.once_too, self.offset = once_too, offset
        self.forwards = 0  # session steps served, each tampered with (what a client's chain used)
        self.cheats = 0  # every output tampered with, audits' FORWARD_ONCE included
        self._direction = torch.randn(real.hidden_size, generator=torch.Generator().manual_seed(1234))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _offset(self, out: torch.Tensor) -> torch.Tensor:
        self.cheats += 1
        return out + self.offset * out.pow(2).mean(dim=-1, keepdim=True).sqrt() * self._direction.to(out.dtype)

    def forward(self, session_id: bytes, hidden: torch.Tensor, position: int) -> torch.Tensor:
        self.forwards += 1
        return self._offset(self._real.forward(session_id, hidden, position))

    def forward_once(self, hidden: torch.Tensor, *, start: int | None = None, end: int | None = None) -> torch.Tensor:
        out = self._real.forward_once(hidden, start=start, end=end)
        return self._offset(out) if self.once_too else out

    # What the server calls: steps as jobs, decode steps of several sessions as a batch.
    def forward_job(self, session_id: bytes, hidden: torch.Tensor, position: int, **kw: Any) -> TamperedJob:
        self.forwards += 1
        return TamperedJob(self._real.forward_job(session_id, hidden, position, **kw), self._offset)

    def forward_batch(self, steps: list[Any]) -> list[torch.Tensor]:
        self.forwards += len(steps)
        return [self._offset(out) for out in self._real.forward_batch(steps)]

    def forward_once_job(self, hidden: torch.Tensor, **kw: Any) -> TamperedJob:
        return TamperedJob(self._real.forward_once_job(hidden, **kw), self._offset if self.once_too else None)


def _cheating_server(once_too: bool) -> type[SpanServer]:
    class Cheater(SpanServer):
        def __init__(self, host: Host, executor: SpanExecutor, **kw: Any) -> None:
            super().__init__(host, OffsetExecutor(executor, once_too=once_too), **kw)

        def make_announcement(self, expires: int, throughput: float) -> Announcement:
            return dataclasses.replace(super().make_announcement(expires, throughput), throughput=throughput * 1000)

    return Cheater


@dataclasses.dataclass(slots=True)
class Row:
    label: str
    trials: int = 0
    used: int = 0  # trials in which a dishonest hop served a step
    flagged: int = 0  # ... and was flagged by an audit and routed around
    tokens_to_flag: list[int] = dataclasses.field(default_factory=list)
    seconds_to_flag: list[float] = dataclasses.field(default_factory=list)
    convicted: int = 0  # ... and the client banned it on its own recomputation
    wrong_tokens: int = 0
    verified: list[float] = dataclasses.field(default_factory=list)
    unverified_trials: int = 0


async def _trial(nursery: trio.Nursery, row: Row, path: str, bootstrap: str, reference: dict, dishonest: list, honest: list,
                 policy: AuditPolicy, recompute: bool, established_cheaters: bool, tokens: int) -> None:
    swarm = await Swarm.connect(nursery, bootstrap=[bootstrap], model=path, audit=policy,
                                local_recompute_bytes=1 << 30 if recompute else 0)
    client = swarm.client
    client.fraud = None  # measure the audit itself, not the DHT's stored proofs
    now = time.time()
    seeded = ([] if recompute else honest) + (dishonest if established_cheaters else [])
    for node in seeded:
        client.reputation.history[node.identity.peer_id] = History(first_seen=now - 2 * 86400, passes=50.0,
                                                                   updated=now)
    bad = {n.identity.peer_id for n in dishonest}
    # Routing goes by what the client measured, not by announcements: the cheater is the
    # one it measured fastest and the honest ones slow, so that the cheater is routed
    # first (a cheater that really is faster would be); colluders are measured by probes.
    clock = trio.current_time()
    for node, seconds in [(dishonest[0], 0.0)] + [(n, 1.0) for n in honest]:
        client.health.observe_rtt(node.identity.peer_id, 0.001, clock)
        client.health.observe_step(node.identity.peer_id, clock, seconds=seconds, blocks=3, tokens=1, success=False)
    auditor = client.auditor
    state = {"tokens": 0, "flag": None}
    real_audit = auditor.audit

    async def audit(**kw: Any) -> AuditResult:
        result = await real_audit(**kw)
        flagged = (result.redo and kw["hop_peer"] in bad) or (result.suspect in bad)
        if flagged and state["flag"] is None:
            state["flag"] = (state["tokens"], time.perf_counter() - state["t0"])
        return result

    auditor.audit = audit
    for prompt in PROMPTS:
        before = sum(n.server.executor.forwards for n in dishonest)
        state.update(tokens=0, flag=None, t0=time.perf_counter())

        def on_token(event: TokenEvent) -> None:
            state["tokens"] = event.index + 1

        result = await swarm.generate(prompt, max_new_tokens=tokens, on_token=on_token)
        row.trials += 1
        expected = reference[tuple(prompt)]
        row.wrong_tokens += sum(a != b for a, b in zip(result.token_ids, expected)) + abs(
            len(result.token_ids) - len(expected))
        if result.verified_fraction is not None:
            row.verified.append(result.verified_fraction)
        row.unverified_trials += not result.fully_verified
        used = sum(n.server.executor.forwards for n in dishonest) > before
        if used:
            row.used += 1
            route_ids = {bytes.fromhex(h.peer_id) for h in result.route}
            if state["flag"] is not None and not route_ids & bad:
                row.flagged += 1
                row.tokens_to_flag.append(state["flag"][0])
                row.seconds_to_flag.append(state["flag"][1])
            row.convicted += any(client.reputation.is_banned(p) for p in bad)
    await swarm.aclose()


async def _configuration(holders: int, colluding: int, path: str, reference: dict, *, trials: int,
                         tokens: int) -> list[tuple[Row, int, bool]]:
    rows = []
    async with trio.open_nursery() as nursery:
        async def serve(blocks: tuple[int, int], *, cheater: bool = False, once_too: bool = False,
                        bootstrap: Sequence[str] = ()) -> ServerNode:
            if cheater:
                peer.node.SpanServer = _cheating_server(once_too)
            try:
                options = ServeOptions(model=path, blocks=blocks, bootstrap=tuple(bootstrap))
                return await nursery.start(functools.partial(run_server, Identity.generate(), options))
            finally:
                peer.node.SpanServer = SpanServer

        cheater = await serve((0, 3), cheater=True)
        colluders = [await serve((0, 3), cheater=True, once_too=True, bootstrap=[cheater.address])
                     for _ in range(colluding)]
        honest = [await serve((0, 3), bootstrap=[cheater.address]) for _ in range(holders - 1 - colluding)]
        tails = [await serve((3, 6), bootstrap=[cheater.address]) for _ in range(2)]
        tail = tails[0]
        dishonest = [cheater, *colluders]
        modes = [(policy_name, policy, recompute, False)
                 for policy_name, policy in (("default", AuditPolicy()), ("paranoid", AuditPolicy(rate=1.0, quorum=2)))
                 for recompute in (True, False)]
        if colluding == 0 and holders == 3:
            modes += [("default", AuditPolicy(), recompute, True) for recompute in (True, False)]
        for policy_name, policy, recompute, established in modes:
            label = (f"{holders} holders, {colluding} colluding, {policy_name}, "
                     f"{'recompute' if recompute else 'votes'}" + (", established cheater" if established else ""))
            row = Row(label)
            for _ in range(trials):
                await _trial(nursery, row, path, tail.address, reference, dishonest, honest + tails, policy,
                             recompute, established, tokens)
            # honest peers banned by honest parties (servers; the clients are gone, their
            # bans are counted in Row.convicted only for dishonest peers)
            honest_ids = {n.identity.peer_id for n in (*honest, *tails)}
            banned = sum(1 for n in (*honest, *tails) for p in honest_ids if n.fraud.reputation.is_banned(p))
            swarm_side = any(n.fraud.reputation.is_banned(cheater.identity.peer_id) for n in honest)
            rows.append((row, banned, swarm_side))
        nursery.cancel_scope.cancel()
    return rows


def collusion(tmp: str, *, trials: int, tokens: int) -> None:
    logging.disable(logging.WARNING)  # the audits' warnings would bury the table
    path = f"{tmp}/collusion"
    model = save_tiny(path)
    reference = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            ids = out[0, len(prompt):].tolist()
            reference[tuple(prompt)] = ids[:ids.index(2)] if 2 in ids else ids
    print(f"collusion on loopback: blocks 0:3 held by n servers (one cheater: +{OFFSET:.0%} offset on FORWARD, honest "
          f"FORWARD_ONCE; k colluders: the same offset on both; 3:6 by 2 honest), {trials} x {len(PROMPTS)} "
          f"generations of {tokens} tokens per row")
    header = (f"{'configuration':66} {'flagged':>8} {'tok->flag':>9} {'s->flag':>7} {'own conv':>8} "
              f"{'swarm ban':>9} {'wrong tok':>9} {'honest banned':>13} {'verified':>8}")
    print(header)
    t0 = time.perf_counter()
    totals = {"wrong": 0, "banned": 0}
    for holders, colluding in ((2, 0), (3, 0), (5, 0), (3, 1), (5, 2)):
        for row, banned, swarm_side in trio.run(functools.partial(_configuration, holders, colluding, path,
                                                                  reference, trials=trials, tokens=tokens)):
            used = max(row.used, 1)
            def mean(xs: list[int]) -> str:
                return f"{statistics.mean(xs):.1f}" if xs else "-"

            def mean_s(xs: list[float]) -> str:
                return f"{statistics.mean(xs):.2f}" if xs else "-"

            verified = f"{statistics.mean(row.verified):.2f}" if row.verified else "-"
            if "established" not in row.label:  # only sampling protects those: see the module docstring
                totals["wrong"] += row.wrong_tokens
            totals["banned"] += banned
            print(f"{row.label:66} {row.flagged:>3}/{row.used:<4} {mean(row.tokens_to_flag):>9} "
                  f"{mean_s(row.seconds_to_flag):>7} {row.convicted / used:8.2f} {'yes' if swarm_side else 'no':>9} "
                  f"{row.wrong_tokens:9d} {banned:13d} {verified:>8}")
    print(f"wrong tokens outside the established-cheater rows {totals['wrong']} (goal 0), honest servers banned "
          f"{totals['banned']} (goal 0); "
          f"{time.perf_counter() - t0:.0f} s\n")
    logging.disable(logging.NOTSET)


# -- Part 3: framing -----------------------------------------------------------------------------


def _signable_input(rng: random.Random, head: ClientHead, first: SpanExecutor, span: tuple[int, int],
                    n: int) -> tuple[str, torch.Tensor]:
    kind = rng.choice(("normal", "heavy", "huge-rows", "constant", "real"))
    scale = 10.0 ** rng.uniform(-3, 3)
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    hidden = head.hidden_size
    if kind == "real":
        x = head.embed(torch.randint(0, head.vocab_size, (n,), generator=g).tolist()).to(torch.float32)
        return kind, (first.forward_once(x) if span[0] else x)
    x = torch.randn(1, n, hidden, generator=g) * scale
    if kind == "heavy":
        x = x / (torch.distributions.Chi2(torch.tensor(1.5)).sample((1, n, 1)) / 1.5).sqrt()
    elif kind == "huge-rows":
        x[:, :: max(n // 3, 1)] *= 1e3
    elif kind == "constant":
        x = torch.full((1, n, hidden), scale) * torch.linspace(1.0, 2.0, n).view(1, n, 1)
    return kind, x


def _genuine_proof(executor: SpanExecutor, twin: SpanExecutor, span: tuple[int, int], x: torch.Tensor,
                   lengths: list[int], wire: str, how: str) -> FraudProof:
    client, server = Identity.generate(bits=0), Identity.generate(bits=0)  # no DHT: no puzzle
    total = sum(lengths)
    stateful = how in ("session", "tokenwise")
    sid = executor.open_session(total) if stateful else b"\0" * 16
    c_state, s_state = (SessionState(client=client.peer_id, server=server.peer_id, session=sid,
                                     model=executor.model_id, span=span, max_length=total, wire_dtype=wire)
                        for _ in range(2))
    c_state.open()
    s_state.open()
    position, received = 0, []
    try:
        for n in lengths:
            request = sign_forward(client, c_state, encode_tensor(x[:, position:position + n], wire))
            check_forward(s_state, request, client_public_key=client.public_key, hidden_size=executor.hidden_size)
            step = decode_tensor(request.hidden, out_dtype=torch.float32)
            received.append(step)
            prefix = torch.cat(received, dim=1)
            with torch.inference_mode():
                if how == "session":
                    out = executor.forward(sid, step, position)
                elif how == "once":
                    out = executor.forward_once(prefix)[:, -n:]
                elif how == "tokenwise":
                    out = torch.cat([executor.forward(sid, step[:, t:t + 1], position + t) for t in range(n)], dim=1)
                elif how == "blockwise":
                    out = prefix
                    for block in range(*span):
                        out = twin.forward_once(out.double(), start=block, end=block + 1).float()
                    out = out[:, -n:]
                else:
                    out = twin.forward_once(prefix.double())[:, -n:].float()
            accept_result(c_state, request, sign_result(server, s_state, request, encode_tensor(out, wire)),
                          server_public_key=server.public_key)
            position += n
    finally:
        if stateful:
            executor.close_session(sid)
    return proof_from_transcript(accused=server.public_key, client=client.public_key, model=executor.model_id,
                                 span=span, session=sid, transcript=c_state.transcript, index=len(lengths) - 1)


def framing(tmp: str, *, attempts: int, seed: int = 11) -> None:
    models = []
    for name, init in (("tiny", 0.02), ("large-weights", 1.0)):
        path = f"{tmp}/framing-{name}"
        save_tiny(path, init=init)
        head = load_head(path)
        spans = {}
        for span in ((0, 3), (3, 6)):
            twin = load_span(path, *span)
            twin.layers.to(torch.float64)
            twin.dtype = torch.float64
            spans[span] = (load_span(path, *span), twin)
        models.append((name, head, load_span(path, 0, 3), spans))
    rng = random.Random(seed)
    convicted = old_convicted = inconclusive = 0
    by_kind: dict[str, int] = {}
    t0 = time.perf_counter()
    for _ in range(attempts):
        name, head, first, spans = rng.choice(models)
        span = rng.choice(((0, 3), (3, 6)))
        executor, twin = spans[span]
        lengths = [rng.randint(1, 8)] + [rng.randint(1, 3) for _ in range(rng.randint(0, 4))]
        kind, x = _signable_input(rng, head, first, span, sum(lengths))
        wire = rng.choice(("f32", "f16", "bf16", "q8"))
        proof = _genuine_proof(executor, twin, span, x, lengths, wire, rng.choice(HONEST))
        try:
            verify_proof(proof, executor)
            convicted += 1
            by_kind[kind] = by_kind.get(kind, 0) + 1
        except InvalidProof as exc:
            inconclusive += "inconclusive" in str(exc)
        # the previous rule: the calibrated thresholds against one one-shot recomputation
        prefix = torch.cat([decode_tensor(r.hidden) for r in proof.requests], dim=1)
        rows = proof.output.shape[1]
        claimed = decode_tensor(proof.output)
        once = executor.forward_once(prefix)[:, -rows:]
        old = compare(claimed, once, tolerance=tolerance_for("f32", wire), depth=span[1] - span[0])
        old_convicted += not old.ok
    elapsed = time.perf_counter() - t0
    print(f"framing: {attempts} proofs of honest servers' genuine outputs on signable inputs "
          f"({elapsed:.0f} s, {1e3 * elapsed / attempts:.1f} ms each)")
    print(f"  honest servers convicted: {convicted} (goal 0; by input kind: {by_kind or 'none'}); "
          f"inconclusive (out of range): {inconclusive}")
    print(f"  baseline, previous rule (thresholds vs one recomputation): {old_convicted} convicted "
          f"({old_convicted / attempts:.1%})\n")


# -- Part 4: Sybil credit ----------------------------------------------------------------------


def sybil_credit() -> None:
    print("Sybil fan-out: X really did W units for S, then signs receipts that N fresh identities each served X "
          "W units; S merges them")
    print(f"{'N':>5} {'W':>6} {'credit of the N at S':>21} {'/ W':>6} {'old rule / W':>13}")
    s, x = Identity.generate(bits=0), Identity.generate(bits=0)
    work = 5000
    for n in (1, 10, 50, 200):
        ledger = Ledger(s.public_key)
        ledger.store(countersign(x, make_receipt(s, x.public_key, bytes(32), 1, work)))
        sybils = [Identity.generate(bits=0) for _ in range(n)]
        ledger.merge_remote([countersign(y, make_receipt(x, y.public_key, bytes(32), 1, work)) for y in sybils])
        total = sum(ledger.credit(y.public_key).total for y in sybils)
        graph = WorkGraph({(r.server, r.client): r.work for r in ledger.records()})
        old = sum(max_flow_2hop(graph, y.public_key, s.public_key) for y in sybils)
        print(f"{n:5d} {work:6d} {total:21d} {total / work:6.2f} {old / work:13.2f}")
    print("  (goal: <= 1.00; the old per-requester 2-hop flow gave each Sybil the whole W)\n")
