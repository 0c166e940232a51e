"""The FRAUD_PROOF service: verify, ban, gossip, store (spec "Verification",
"Fraud proofs", "Gossip and storage").

Theory of operation. Every peer of a verifying swarm runs one ``FraudProofService``
on its host. A proof reaches it as a FRAUD_PROOF notice from a connected peer, from
the DHT (``check_peer``), or from this peer's own auditor (``submit``). The service
verifies it once (results are cached by proof digest):

- a peer serving the proof's span runs ``verify_proof`` (signatures, then recompute
  on its own executor), through the peer's compute scheduler like any step, so
  verification takes its turn in the same credit order;
- a peer that can load the span itself (a client: ``local``, see
  ``LocalRecompute``) runs ``verify_proof`` on its own copy;
- any other peer checks the signatures and asks up to ``endorsers`` holders of the
  span of distinct operators (found in the DHT; never the accused, the client or the
  sender) to verify it, and *endorses* it if more of them accept than reject.

Only a proof this peer recomputed bans the accused (``Reputation.ban``, persisted)
and is stored in the DHT (``verify._store``): bans rest on evidence the banning peer
checked itself (spec 13.6), so holders that collude cannot get an honest peer banned
by peers that never recomputed. An endorsed proof only counts against the accused's
reputation (a mismatch: routing prefers others) and travels on. Accepted and
endorsed proofs are forwarded to every connected peer that has not seen them
(gossip; duplicates stop at the digest cache). A proof that does not verify is
answered INVALID_PROOF and counts against the peer that sent it
(``record_invalid_proof``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from protocol import FraudProof, FraudProofAck, FraudProofNotice, cbor_decode, peer_id_of
from protocol.errors import ErrorCode, ProtocolError, RemoteError, SwarmError
from swarm.announce import block_key, decode_block_value
from swarm.dht import DhtNode
from swarm.transport import Host, PeerConnection

from ._proofs import InvalidProof, LocalRecompute, SpanRecompute, check_proof, proof_digest, verify_proof
from ._reputation import Reputation
from ._voting import operator_of
from ._store import MAX_STORED_PROOF, fetch_proofs, proof_to_bytes, publish_proof

__all__ = ["Compute", "FraudProofService"]

log = logging.getLogger("swarm.verify")

T = TypeVar("T")


class Compute(Protocol):
    """The peer's compute, as verification uses it (``peer.scheduler.Scheduler``)."""

    async def run(self, requester: bytes, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread, once ``requester`` is granted a compute slot."""
        ...


class FraudProofService:
    """Handles FRAUD_PROOF for one peer; see the module docstring.

    Args:
        host, dht: the peer's transport and DHT node (running).
        reputation: where bans and penalties go (shared with routing and the server).
        executor: the span this peer serves, if any (it then verifies by recomputing).
        compute: the peer's compute scheduler; required with ``executor``: verification
            queues with the steps the peer serves, in the same order.
        local: spans this peer can load to verify proofs it does not hold (a client).
        reputation_path: if given, the reputation is saved there after every ban.
        endorsers: independent holders a non-holder asks.
        timeout: seconds for one notice to a peer.
    """

    def __init__(self, host: Host, dht: DhtNode, reputation: Reputation, *, executor: SpanRecompute | None = None,
                 compute: Compute | None = None, local: LocalRecompute | None = None, compute_dtype: str = "f32",
                 reputation_path: str | Path | None = None, endorsers: int = 3, timeout: float = 30.0,
                 store: bool = True, clock: Callable[[], float] = time.time) -> None:
        if executor is not None and compute is None:
            raise ValueError("a FraudProofService that recomputes needs the peer's compute scheduler")
        self.host = host
        self.dht = dht
        self.reputation = reputation
        self.executor = executor
        self.compute_dtype = compute_dtype
        self.reputation_path = reputation_path
        self.endorsers = endorsers
        self.timeout = timeout
        self.store = store
        self.clock = clock
        self.local = local
        self.accepted: dict[bytes, FraudProof] = {}  # digest -> proof this peer recomputed
        self.endorsed: dict[bytes, FraudProof] = {}  # digest -> proof vouched for by holders only
        self.rejected: set[bytes] = set()
        self.stored: dict[bytes, int] = {}  # digest -> DHT nodes holding the index
        self.compute = compute
        self._pending: dict[bytes, trio.Event] = {}
        self._seen_by: dict[bytes, set[bytes]] = {}  # digest -> peers known to have it
        self._send, self._receive = trio.open_memory_channel[tuple[Callable[..., Awaitable[object]], tuple]](64)
        host.add_handler(FraudProofNotice, self._on_notice)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Gossip, store and submit proofs in the background until cancelled."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            async for job, args in self._receive:
                nursery.start_soon(job, *args)

    def holds(self, proof: FraudProof) -> bool:
        """Whether this peer can verify ``proof`` by recomputing."""
        ex = self.executor
        return ex is not None and proof.model == ex.model_id and ex.start <= proof.span[0] < proof.span[1] <= ex.end

    # -- entry points ---------------------------------------------------------------------

    async def verify(self, proof: FraudProof, *, sender: bytes | None = None) -> bytes:
        """Verify ``proof`` (once per digest): recomputed, it bans the accused; endorsed
        by holders only, it counts against the accused's reputation. Either way it
        spreads. Returns the digest.

        Raises:
            InvalidProof: it does not verify (or no independent holder would vouch for it).
        """
        digest = proof_digest(proof)
        while digest in self._pending:  # someone else is verifying it right now
            await self._pending[digest].wait()
        if digest in self.accepted or digest in self.endorsed:
            return digest
        if digest in self.rejected:
            raise InvalidProof("this proof was already found invalid")
        self._pending[digest] = done = trio.Event()
        recomputed = True
        try:
            if self.holds(proof):
                executor, compute = self.executor, self.compute
                assert executor is not None and compute is not None  # holds() and the constructor
                verdict = await compute.run(sender or self.host.peer_id,
                                            lambda: verify_proof(proof, executor, compute_dtype=self.compute_dtype))
                log.warning("verified fraud proof against %s: %s", peer_id_of(proof.accused).hex()[:12], verdict)
            elif (verdict := await self._verify_locally(proof)) is not None:
                log.warning("verified fraud proof against %s on a local span: %s",
                            peer_id_of(proof.accused).hex()[:12], verdict)
            else:
                recomputed = False
                check_proof(proof)
                await self._endorse(proof, sender)
        except InvalidProof:
            self.rejected.add(digest)
            raise
        finally:
            del self._pending[digest]
            done.set()
        if recomputed:
            self._accept(digest, proof, sender)
        else:
            self._endorsed(digest, proof, sender)
        return digest

    async def _verify_locally(self, proof: FraudProof) -> object | None:
        """The verdict of ``verify_proof`` on a local copy of the span, or None if this
        peer cannot load it. Raises InvalidProof."""
        if self.local is None:
            return None
        compute_dtype = self.compute_dtype
        check_proof(proof)  # before loading anything
        try:
            outcome = await self.local.run(proof.model, proof.span,
                                           lambda ex: _verdict_or_error(proof, ex, compute_dtype))
        except SwarmError as exc:  # the span cannot be loaded here after all
            log.info("cannot load [%d, %d) to verify a proof: %s", *proof.span, exc)
            return None
        if isinstance(outcome, InvalidProof):
            raise outcome
        return outcome

    async def submit(self, proof: FraudProof, holders: list[tuple[bytes, tuple[str, ...]]]) -> bool:
        """Send this peer's own proof to ``holders`` ((peer id, addrs)) until one accepts it.
        The caller has banned the accused if its own evidence convicts it; a holder that
        accepts bans, stores and gossips it (a holder's acceptance does not ban here:
        it is not evidence this peer checked). Returns whether any holder accepted."""
        digest = proof_digest(proof)
        for peer_id, addrs in holders:
            verdict = await self._ask(peer_id, addrs, proof)
            if verdict:
                self._seen_by.setdefault(digest, set()).add(peer_id)  # the holder gossips it
                return True
        log.warning("no holder accepted our fraud proof %s against %s", digest.hex()[:12],
                    peer_id_of(proof.accused).hex()[:12])
        return False

    def convicted(self, proof: FraudProof, holders: list[tuple[bytes, tuple[str, ...]]]) -> None:
        """This peer's own recomputation convicted the accused of ``proof`` (its auditor's
        local check): ban, record it as verified (a copy gossiped back is not verified
        again), and submit it to ``holders`` in the background (they verify, store and
        gossip it)."""
        digest = proof_digest(proof)
        if digest in self.accepted:
            return
        self.accepted[digest] = proof
        self.reputation.ban(peer_id_of(proof.accused), self.clock(), reason="convicted by own recomputation",
                            proof=digest)
        self._save()
        self.submit_soon(proof, holders)

    def submit_soon(self, proof: FraudProof, holders: list[tuple[bytes, tuple[str, ...]]]) -> None:
        """``submit`` in the background (``run`` must be running), so a generation does
        not wait for a holder to recompute the proof."""
        self._queue(self.submit, proof, holders)

    def _queue(self, job: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            self._send.send_nowait((job, args))
        except trio.WouldBlock:
            log.warning("fraud proof queue full; dropping %s", getattr(job, "__name__", job))

    async def check_peer(self, peer_id: bytes) -> bool:
        """Look up proofs against ``peer_id`` in the DHT and verify them; True if it is
        (now) banned (a proof this peer could only have endorsed does not ban)."""
        if self.reputation.is_banned(peer_id):
            return True
        for proof in await fetch_proofs(self.dht, peer_id, limits=self.host.limits):
            if peer_id_of(proof.accused) != peer_id:
                continue
            try:
                await self.verify(proof)
            except InvalidProof as exc:
                log.info("a stored proof against %s does not verify: %s", peer_id.hex()[:12], exc)
                continue
            if self.reputation.is_banned(peer_id):  # recomputed here; an endorsement does not ban
                return True
        return False

    # -- internals ------------------------------------------------------------------------

    async def _on_notice(self, conn: PeerConnection, msg: FraudProofNotice) -> FraudProofAck:
        self._seen_by.setdefault(proof_digest(msg.proof), set()).add(conn.peer_id)
        try:
            await self.verify(msg.proof, sender=conn.peer_id)
        except InvalidProof as exc:
            self.reputation.record_invalid_proof(conn.peer_id, self.clock())
            self._save()
            raise RemoteError(str(exc), code=ErrorCode.INVALID_PROOF) from None
        return FraudProofAck(accepted=True)

    def _accept(self, digest: bytes, proof: FraudProof, sender: bytes | None) -> None:
        """A proof this peer recomputed: ban the accused, spread (and store) it."""
        accused = peer_id_of(proof.accused)
        self.accepted[digest] = proof
        if self.reputation.ban(accused, self.clock(), reason="verified fraud proof", proof=digest):
            log.warning("banned %s (fraud proof %s)", accused.hex()[:12], digest.hex()[:12])
        self._save()
        if sender is not None:
            self._seen_by.setdefault(digest, set()).add(sender)
        self._queue(self._spread, digest, proof)

    def _endorsed(self, digest: bytes, proof: FraudProof, sender: bytes | None) -> None:
        """A proof only holders vouched for: a mark against the accused, and gossip."""
        accused = peer_id_of(proof.accused)
        self.endorsed[digest] = proof
        self.reputation.record_mismatch(accused, self.clock())
        log.warning("fraud proof %s against %s endorsed by holders (not recomputed here: no ban)",
                    digest.hex()[:12], accused.hex()[:12])
        self._save()
        if sender is not None:
            self._seen_by.setdefault(digest, set()).add(sender)
        self._queue(self._spread, digest, proof)

    async def _spread(self, digest: bytes, proof: FraudProof) -> None:
        accused = peer_id_of(proof.accused)
        seen = self._seen_by.setdefault(digest, set())
        async with trio.open_nursery() as nursery:
            for peer_id, conn in list(self.host.connections.items()):
                if peer_id in seen or peer_id == accused or not conn.is_open:
                    continue
                seen.add(peer_id)
                nursery.start_soon(self._notify, conn, proof)
            if self.store and self.holds(proof) and len(proof_to_bytes(proof)) <= MAX_STORED_PROOF:
                nursery.start_soon(self._publish, digest, proof)

    async def _notify(self, conn: PeerConnection, proof: FraudProof) -> None:
        try:
            await conn.request(FraudProofNotice(proof=proof), timeout=self.timeout)
        except SwarmError as exc:
            log.debug("gossip to %s: %s", conn.peer_id.hex()[:12], exc)

    async def _publish(self, digest: bytes, proof: FraudProof) -> None:
        try:
            self.stored[digest] = await publish_proof(self.dht, proof, now=self.clock())
        except SwarmError as exc:
            log.warning("storing fraud proof %s in the DHT failed: %s", digest.hex()[:12], exc)

    async def _ask(self, peer_id: bytes, addrs: tuple[str, ...], proof: FraudProof) -> bool | None:
        """A holder's verdict on ``proof``: True, False (INVALID_PROOF) or None (no answer)."""
        for addr in addrs:
            try:
                conn = await self.host.connect(addr, peer_id=peer_id, timeout=min(self.timeout, 10.0))
                ack = await conn.request(FraudProofNotice(proof=proof), timeout=self.timeout)
                return bool(ack.accepted)
            except RemoteError as exc:
                return False if exc.code == ErrorCode.INVALID_PROOF else None
            except SwarmError:
                continue
        return None

    async def _endorse(self, proof: FraudProof, sender: bytes | None) -> None:
        exclude = {peer_id_of(proof.accused), peer_id_of(proof.client), self.host.peer_id}
        if sender is not None:
            exclude.add(sender)
        holders, operators = [], set()
        for peer_id, addrs in await self._holders(proof):  # one per operator (verify._voting)
            op = operator_of(peer_id, addrs[0] if addrs else None)
            if peer_id in exclude or self.reputation.is_banned(peer_id) or op in operators:
                continue
            operators.add(op)
            holders.append((peer_id, addrs))
        holders = holders[: self.endorsers]
        votes: list[bool] = []

        async def ask(peer_id: bytes, addrs: tuple[str, ...]) -> None:
            verdict = await self._ask(peer_id, addrs, proof)
            if verdict is not None:
                votes.append(verdict)

        async with trio.open_nursery() as nursery:
            for peer_id, addrs in holders:
                nursery.start_soon(ask, peer_id, addrs)
        yes, no = votes.count(True), votes.count(False)
        if not yes or yes <= no:
            raise InvalidProof(f"independent holders of the span did not vouch for the proof ({yes} for, {no} "
                               f"against, {len(holders)} asked)")

    async def _holders(self, proof: FraudProof) -> list[tuple[bytes, tuple[str, ...]]]:
        """Peers announcing a span that covers the proof's, from the DHT."""
        found: dict[bytes, tuple[str, ...]] = {}
        now = self.clock()
        for record in await self.dht.get(block_key(proof.model, proof.span[0])):
            try:
                _, ann = decode_block_value(cbor_decode(record.value, max_size=len(record.value)))
            except (ProtocolError, SwarmError, ValueError, TypeError):
                continue
            if ann.model == proof.model and ann.expires > now and ann.span[0] <= proof.span[0] \
                    and proof.span[1] <= ann.span[1]:
                found[ann.peer_id] = ann.addrs
        return sorted(found.items())

    def _save(self) -> None:
        if self.reputation_path is not None:
            try:
                self.reputation.save(self.reputation_path)
            except OSError as exc:
                log.warning("cannot save the reputation file %s: %s", self.reputation_path, exc)


def _verdict_or_error(proof: FraudProof, executor: SpanRecompute, compute_dtype: str) -> object:
    """``verify_proof``'s verdict, or the InvalidProof it raised (returned across the thread)."""
    try:
        return verify_proof(proof, executor, compute_dtype=compute_dtype)
    except InvalidProof as exc:
        return exc
