"""Per-peer reputation and the ban list (spec "Verification", "Reputation").

Theory of operation. For every peer it dealt with, a peer keeps four exponentially
decayed counts: successes (an answered request, an audit passed), timeouts (no
answer, a refusal: availability), mismatches (an audit the peer lost in a 2-vs-1
vote: honesty) and invalid proofs (a fraud proof it submitted that did not verify:
honesty). Counts halve every ``half_life`` seconds, so an old failure fades and a
peer can recover; a verified fraud proof instead bans the peer for good (bans are
kept until removed by hand; the ban list is what routing and servers consult).

``score`` is a smoothed success rate in (0, 1] with honesty failures weighing far
more than availability failures; ``penalty`` turns it into extra seconds of route
cost for the planner (a perfect peer costs nothing extra).

Beside the hour-scale counts, a long-lived *history* per peer: when this peer first
met it and how many of its hop-steps passed an audit (decaying over
``long_half_life``, 30 days). ``establishment`` in [0, 1] says how far a peer is from
a fresh identity (both enough passed audits and enough time known), and ``weight``
is what its answer counts in an audit vote: ``FRESH_WEIGHT`` for a fresh identity, up
to 1 for an established peer, times ``score``. So ten fresh identities are needed
to outweigh one established peer, more than an audit ever asks (spec 13.6).

Pure code: every method takes ``now`` (unix seconds); ``save``/``load`` write the
state atomically as CBOR.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from protocol import atomic_write, cbor_decode, cbor_encode
from protocol.errors import DecodeError, SwarmError

__all__ = ["Ban", "History", "PeerStanding", "Reputation", "ReputationFileError"]

_VERSION = 2
#: Weights of each failure kind against one success in ``score``.
TIMEOUT_WEIGHT = 1.0
MISMATCH_WEIGHT = 20.0
INVALID_PROOF_WEIGHT = 20.0
#: Pseudo-successes every peer starts with (a newcomer scores PRIOR / (PRIOR + 0) = 1).
PRIOR = 2.0
#: Route cost added for a peer of score s: PENALTY_SECONDS * (1 / s - 1), capped.
PENALTY_SECONDS = 0.05
MAX_PENALTY = 10.0
#: Long-lived history: half-life of passed audits, and what "established" takes.
LONG_HALF_LIFE = 30 * 86400.0
ESTABLISHED_PASSES = 20.0
ESTABLISHED_AGE = 86400.0
#: Vote weight of a fresh identity (an established one weighs 1).
FRESH_WEIGHT = 0.1
#: Reputation file size bound when loading (hostile or corrupt files).
MAX_FILE_SIZE = 16 * 1024 * 1024


class ReputationFileError(SwarmError):
    """The reputation file cannot be read; the message says which file and why."""


@dataclass(slots=True)
class PeerStanding:
    """Decayed counts of one peer as of ``updated`` (unix seconds)."""

    successes: float = 0.0
    timeouts: float = 0.0
    mismatches: float = 0.0
    invalid_proofs: float = 0.0
    updated: float = 0.0

    def decayed(self, now: float, half_life: float) -> PeerStanding:
        factor = 0.5 ** (max(now - self.updated, 0.0) / half_life)
        return PeerStanding(successes=self.successes * factor, timeouts=self.timeouts * factor,
                            mismatches=self.mismatches * factor, invalid_proofs=self.invalid_proofs * factor,
                            updated=max(now, self.updated))


@dataclass(slots=True)
class History:
    """What this peer knows of another over the long run (unix seconds)."""

    first_seen: float
    passes: float = 0.0  # audits passed, decayed over the long half-life
    updated: float = 0.0

    def decayed_passes(self, now: float, half_life: float) -> float:
        return self.passes * 0.5 ** (max(now - self.updated, 0.0) / half_life)


@dataclass(frozen=True, slots=True)
class Ban:
    since: float
    reason: str
    proof: bytes | None = None  # digest of the verified fraud proof, when there is one


@dataclass(slots=True)
class Reputation:
    """Standings and bans of the peers this peer knows; see the module docstring.

    ``banned`` is a plain set shared with routing (``SwarmClient(banned=...)``) and the
    server, so a ban takes effect everywhere at once.
    """

    half_life: float = 3600.0
    standings: dict[bytes, PeerStanding] = field(default_factory=dict)
    bans: dict[bytes, Ban] = field(default_factory=dict)
    banned: set[bytes] = field(default_factory=set)
    history: dict[bytes, History] = field(default_factory=dict)
    long_half_life: float = LONG_HALF_LIFE

    def __post_init__(self) -> None:
        if not (self.half_life > 0 and self.long_half_life > 0):
            raise ValueError("half-lives must be positive")
        self.banned.update(self.bans)

    # -- events -------------------------------------------------------------------------

    def record_success(self, peer: bytes, now: float, n: float = 1.0) -> None:
        self._bump(peer, now, "successes", n)

    def record_audit_pass(self, peer: bytes, now: float, n: float = 1.0) -> None:
        """A hop-step (or an auditor's answer) of ``peer`` was confirmed by an audit:
        a success, and long-lived history."""
        self._bump(peer, now, "successes", n)
        h = self._history(peer, now)
        h.passes = h.decayed_passes(now, self.long_half_life) + n
        h.updated = now

    def record_timeout(self, peer: bytes, now: float) -> None:
        """No answer or a refusal: availability, never honesty."""
        self._bump(peer, now, "timeouts", 1.0)

    def record_mismatch(self, peer: bytes, now: float) -> None:
        """The peer was the minority of an audit vote."""
        self._bump(peer, now, "mismatches", 1.0)

    def record_invalid_proof(self, peer: bytes, now: float) -> None:
        """The peer submitted a fraud proof that did not verify (it framed someone)."""
        self._bump(peer, now, "invalid_proofs", 1.0)

    def ban(self, peer: bytes, now: float, *, reason: str, proof: bytes | None = None) -> bool:
        """Ban ``peer`` for good. Returns False if it was already banned."""
        if peer in self.bans:
            return False
        self.bans[peer] = Ban(since=now, reason=reason, proof=proof)
        self.banned.add(peer)
        return True

    def unban(self, peer: bytes) -> None:
        self.bans.pop(peer, None)
        self.banned.discard(peer)

    # -- queries ------------------------------------------------------------------------

    def is_banned(self, peer: bytes) -> bool:
        return peer in self.banned

    def standing(self, peer: bytes, now: float) -> PeerStanding:
        held = self.standings.get(peer)
        return PeerStanding(updated=now) if held is None else held.decayed(now, self.half_life)

    def score(self, peer: bytes, now: float) -> float:
        """Smoothed success rate in [0, 1]; 0 for a banned peer, 1 for a newcomer."""
        if peer in self.banned:
            return 0.0
        s = self.standing(peer, now)
        good = PRIOR + s.successes
        bad = TIMEOUT_WEIGHT * s.timeouts + MISMATCH_WEIGHT * s.mismatches + INVALID_PROOF_WEIGHT * s.invalid_proofs
        return good / (good + bad)

    def audits_passed(self, peer: bytes, now: float) -> float:
        """Audits ``peer`` passed (long-lived, decayed)."""
        h = self.history.get(peer)
        return 0.0 if h is None else h.decayed_passes(now, self.long_half_life)

    def establishment(self, peer: bytes, now: float) -> float:
        """0 for a fresh or unknown identity, 1 for an established one: at least
        ``ESTABLISHED_PASSES`` passed audits and known for ``ESTABLISHED_AGE``."""
        h = self.history.get(peer)
        if h is None or peer in self.banned:
            return 0.0
        passes = min(h.decayed_passes(now, self.long_half_life) / ESTABLISHED_PASSES, 1.0)
        age = min(max(now - h.first_seen, 0.0) / ESTABLISHED_AGE, 1.0)
        return passes * age

    def weight(self, peer: bytes, now: float) -> float:
        """What ``peer``'s answer counts in an audit vote (module docstring); 0 if banned."""
        return (FRESH_WEIGHT + (1.0 - FRESH_WEIGHT) * self.establishment(peer, now)) * self.score(peer, now)

    def penalty(self, peer: bytes, now: float) -> float:
        """Seconds of route cost to add for ``peer`` (0 for a spotless one)."""
        score = self.score(peer, now)
        if score <= 0:
            return math.inf
        return min(PENALTY_SECONDS * (1.0 / score - 1.0), MAX_PENALTY)

    def route_rtts(self, peers: Iterable[bytes], now: float, *, base: float) -> dict[bytes, float]:
        """``plan_route``'s ``rtts``: ``base`` plus each peer's penalty (banned peers are
        left out: routing skips them through ``banned``)."""
        return {p: base + self.penalty(p, now) for p in peers if p not in self.banned}

    # -- persistence --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        standings = [[p, s.successes, s.timeouts, s.mismatches, s.invalid_proofs, s.updated]
                     for p, s in sorted(self.standings.items())]
        bans = [[p, b.since, b.reason, b.proof] for p, b in sorted(self.bans.items())]
        history = [[p, h.first_seen, h.passes, h.updated] for p, h in sorted(self.history.items())]
        return cbor_encode([_VERSION, float(self.half_life), standings, bans, float(self.long_half_life), history])

    @classmethod
    def from_bytes(cls, data: bytes) -> Reputation:
        """Raises DecodeError on anything malformed. Reads versions 1 and 2."""
        obj = cbor_decode(data, max_size=MAX_FILE_SIZE)
        try:
            version = obj[0]
            if version == 1:
                _, half_life, standings, bans = obj
                long_half_life, history = LONG_HALF_LIFE, []
            elif version == _VERSION:
                _, half_life, standings, bans, long_half_life, history = obj
            else:
                raise DecodeError(f"reputation format version {version!r} is not 1 or {_VERSION}")
            rep = cls(half_life=float(half_life), long_half_life=_num(long_half_life))
            for peer, first_seen, passes, updated in history:
                rep.history[_peer(peer)] = History(first_seen=_num(first_seen), passes=_num(passes),
                                                   updated=_num(updated))
            for peer, succ, tout, mism, inval, updated in standings:
                rep.standings[_peer(peer)] = PeerStanding(
                    successes=_num(succ), timeouts=_num(tout), mismatches=_num(mism), invalid_proofs=_num(inval),
                    updated=_num(updated))
            for peer, since, reason, proof in bans:
                if type(reason) is not str or not (proof is None or type(proof) is bytes):
                    raise DecodeError("a ban is [peer, since, reason, proof digest or null]")
                rep.ban(_peer(peer), _num(since), reason=reason, proof=proof)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise DecodeError(f"malformed reputation state: {exc}") from None
        return rep

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to ``path`` atomically (readers see the old or the new file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_bytes(), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, half_life: float | None = None) -> Reputation:
        """The state saved at ``path``; a fresh one if the file does not exist.

        Raises:
            ReputationFileError: the file exists but is unreadable or corrupt.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls() if half_life is None else cls(half_life=half_life)
        except OSError as exc:
            raise ReputationFileError(f"cannot read reputation file {path}: {exc}") from None
        try:
            rep = cls.from_bytes(data)
        except DecodeError as exc:
            raise ReputationFileError(f"reputation file {path} is corrupt ({exc}); move it away to start afresh") \
                from None
        if half_life is not None:
            rep.half_life = half_life
        return rep

    # -- internals ----------------------------------------------------------------------

    def _bump(self, peer: bytes, now: float, name: str, n: float) -> None:
        standing = self.standing(peer, now)
        setattr(standing, name, getattr(standing, name) + n)
        self.standings[peer] = standing
        self._history(peer, now)

    def _history(self, peer: bytes, now: float) -> History:
        h = self.history.get(peer)
        if h is None:
            h = self.history[peer] = History(first_seen=now, updated=now)
        return h


def _peer(value: object) -> bytes:
    if type(value) is not bytes or len(value) != 20:
        raise DecodeError("a peer id is 20 bytes")
    return value


def _num(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise DecodeError("counts and times are finite numbers")
    return float(value)  # type: ignore[arg-type]
