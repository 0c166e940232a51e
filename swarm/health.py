"""What a client knows of each server from its own dealings with it: failure memory
with exponential backoff, last sign of life, round-trip time and measured compute
(spec section 10, "Routing"; DESIGN.md "Routing and sessions").

Theory of operation. ``PeerHealth`` is one object per client, shared by every plan
and every generation of that client (routing used to forget a dead peer at the end
of each generation and retried it in the next). It is pure: every method takes
``now`` (any monotonic clock, seconds) and nothing here sleeps or sends.

* Failure memory (Petals bans a failed peer for 15 s, doubling). A failure starts or
  extends a backoff of ``base_backoff * 2 ** (streak - 1)`` seconds, capped at
  ``max_backoff``; a success (a request the peer completed) ends the streak. When the
  peer itself said when to come back (``ERROR`` with ``retry_after``: BUSY, LOADING),
  the backoff is what it asked, and the streak does not grow: an honest busy server
  is not punished for being busy. A backed-off peer is left out of every plan until
  the backoff ends, or until the peer publishes a new announcement after the failure
  (``republished``: a restarted server is routable again as soon as it says so).
* Liveness: ``last_seen`` is when the peer last answered anything (a PING, a step).
  An answered PING does not end a failure streak: a peer that answers PING but not
  FORWARD (a tarpit) stays backed off.
* RTT: an exponentially weighted mean of measured round trips, with the time of the
  last sample; ``needs_rtt`` says when it is missing or older than ``rtt_max_age``
  (the client then PINGs: "on first contact, refreshed with age").
* Compute: seconds per block per token, an exponentially weighted mean of what the
  peer's one-token steps took minus the RTT (``observe_step``; a probe before first
  use is such a step). Routing clamps a server's announced throughput by this: a
  server is never planned faster than this client measured it (``block_seconds``).
* Timeouts: ``step_timeout`` derives a request's deadline from the RTT and the
  expected compute (``slack`` times the expectation plus ``floor``, at most ``cap``)
  instead of one fixed minute; ``hedge_delay`` is when a slow step or open is
  raced against another candidate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PeerHealth", "PeerRecord", "TimeoutPolicy", "BASE_BACKOFF", "MAX_BACKOFF"]

#: Petals' ban for a failed peer, doubled on each failure in a row, and its cap.
BASE_BACKOFF = 15.0
MAX_BACKOFF = 240.0  # one announcement lifetime: by then a dead peer has left the DHT
#: Weight of a new RTT or compute sample in its running mean.
EWMA = 0.3
#: An RTT older than this is refreshed before it is relied on.
RTT_MAX_AGE = 60.0


@dataclass(slots=True)
class PeerRecord:
    """What one client knows of one peer (times on the health's clock)."""

    streak: int = 0  # failures in a row
    backoff_until: float = -math.inf
    failures: int = 0  # in total
    successes: int = 0
    last_failure: float | None = None
    last_error: str = ""
    last_seen: float | None = None  # it last answered anything
    rtt: float | None = None  # seconds, running mean
    rtt_at: float | None = None
    block_seconds: float | None = None  # compute per block per token, running mean


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutPolicy:
    """How deadlines derive from measurements: ``slack * expected + floor``, at most ``cap``.

    ``floor`` absorbs what the measurement cannot see (a loaded machine, a GC pause,
    the peer's queue); ``hedge_slack`` and ``hedge_floor`` give the (earlier) moment a
    slow request is raced against another candidate.
    """

    slack: float = 4.0
    floor: float = 2.0
    cap: float = 60.0
    hedge_slack: float = 2.0
    hedge_floor: float = 1.0
    unmeasured: float = 10.0  # a peer never measured: no expectation to derive from

    def __post_init__(self) -> None:
        if min(self.slack, self.floor, self.hedge_slack, self.hedge_floor) < 0 or self.cap <= 0:
            raise ValueError("timeout parameters must be non-negative and the cap positive")


class PeerHealth:
    """Failure memory, liveness, RTT and compute per peer; see the module docstring.

    Args:
        base_backoff: seconds a peer is left out after its first failure in a row.
        max_backoff: the longest backoff.
        rtt_max_age: seconds after which an RTT sample is stale.
        timeouts: how deadlines derive from the measurements.
    """

    def __init__(self, *, base_backoff: float = BASE_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 rtt_max_age: float = RTT_MAX_AGE, timeouts: TimeoutPolicy = TimeoutPolicy()) -> None:
        if not 0 < base_backoff <= max_backoff:
            raise ValueError("need 0 < base_backoff <= max_backoff")
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.rtt_max_age = rtt_max_age
        self.timeouts = timeouts
        self.peers: dict[bytes, PeerRecord] = {}

    def record(self, peer: bytes) -> PeerRecord:
        held = self.peers.get(peer)
        if held is None:
            held = self.peers[peer] = PeerRecord()
        return held

    # -- failures and successes -----------------------------------------------------

    def failed(self, peer: bytes, now: float, *, retry_after: float | None = None, reason: str = "") -> float:
        """A request to ``peer`` failed; returns the backoff in seconds from ``now``."""
        r = self.record(peer)
        r.failures += 1
        r.last_failure = now
        r.last_error = reason[:200]
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            backoff = min(retry_after, self.max_backoff)  # what the peer asked for
        else:
            r.streak += 1
            backoff = min(self.base_backoff * 2.0 ** (r.streak - 1), self.max_backoff)
        r.backoff_until = max(r.backoff_until, now + backoff)
        return backoff

    def succeeded(self, peer: bytes, now: float) -> None:
        """``peer`` completed a request: its failure streak ends (a running backoff too)."""
        r = self.record(peer)
        r.successes += 1
        r.streak = 0
        r.backoff_until = -math.inf
        r.last_seen = now

    def republished(self, peer: bytes, now: float, *, published_ago: float) -> bool:
        """``peer`` published a (signed) announcement ``published_ago`` seconds before
        ``now``. If that was after its last failure, it has come back since (a
        restarted server publishes at once; a dead or hung one cannot): its backoff
        ends, and its streak stays, so that failing again backs it off for longer.
        Returns whether a backoff ended."""
        held = self.peers.get(peer)
        if held is None or held.last_failure is None or held.backoff_until <= now:
            return False
        if now - published_ago <= held.last_failure:
            return False
        held.backoff_until = -math.inf
        return True

    def alive(self, peer: bytes, now: float) -> None:
        """``peer`` answered something (a PING): seen alive, its backoff stands."""
        self.record(peer).last_seen = now

    def backed_off(self, peer: bytes, now: float) -> bool:
        held = self.peers.get(peer)
        return held is not None and held.backoff_until > now

    def backoff_left(self, peer: bytes, now: float) -> float:
        held = self.peers.get(peer)
        return 0.0 if held is None else max(held.backoff_until - now, 0.0)

    def excluded(self, now: float, peers: Iterable[bytes] | None = None) -> frozenset[bytes]:
        """The peers (of ``peers``, default all known) backed off at ``now``."""
        ids = self.peers if peers is None else peers
        return frozenset(p for p in ids if self.backed_off(p, now))

    # -- measurements -----------------------------------------------------------------

    def observe_rtt(self, peer: bytes, rtt: float, now: float) -> None:
        """A measured round trip (a PING answered ``rtt`` seconds after it was sent)."""
        r = self.record(peer)
        rtt = max(rtt, 0.0)
        r.rtt = rtt if r.rtt is None else (1 - EWMA) * r.rtt + EWMA * rtt
        r.rtt_at = now
        r.last_seen = now

    def rtt(self, peer: bytes) -> float | None:
        held = self.peers.get(peer)
        return None if held is None else held.rtt

    def needs_rtt(self, peer: bytes, now: float) -> bool:
        held = self.peers.get(peer)
        return held is None or held.rtt_at is None or now - held.rtt_at > self.rtt_max_age

    def observe_step(self, peer: bytes, now: float, *, seconds: float, blocks: int, tokens: int,
                     success: bool = True) -> None:
        """A completed step of ``tokens`` tokens through ``blocks`` blocks took ``seconds``
        (request to verified answer). One-token steps (decode, probes) update the
        compute estimate. A step of a session counts as a success; a probe
        (``success=False``) only as a sign of life, so that a peer answering probes but
        not sessions keeps its growing backoff."""
        if success:
            self.succeeded(peer, now)
        else:
            self.alive(peer, now)
        if tokens != 1 or blocks < 1:
            return  # a prefill's per-token cost says little of a decode step's
        r = self.record(peer)
        sample = max(seconds - (r.rtt or 0.0), 0.0) / blocks
        r.block_seconds = sample if r.block_seconds is None else (1 - EWMA) * r.block_seconds + EWMA * sample

    def block_seconds(self, peer: bytes) -> float | None:
        held = self.peers.get(peer)
        return None if held is None else held.block_seconds

    def measured(self, peer: bytes) -> bool:
        """Whether this client has measured ``peer``'s compute (by a probe or a step)."""
        return self.block_seconds(peer) is not None

    # -- deadlines ----------------------------------------------------------------------

    def expected(self, peer: bytes, *, blocks: int, tokens: int) -> float | None:
        """Seconds a step should take: RTT plus tokens x blocks x measured compute
        (linear in tokens: a batched prefill is cheaper, so this errs long)."""
        held = self.peers.get(peer)
        if held is None or held.block_seconds is None:
            return None
        return (held.rtt or 0.0) + max(tokens, 1) * max(blocks, 1) * held.block_seconds

    def step_timeout(self, peer: bytes, *, blocks: int, tokens: int, cap: float | None = None) -> float:
        """The deadline of a step (or probe) on ``peer``."""
        t = self.timeouts
        limit = t.cap if cap is None else min(cap, t.cap)
        expected = self.expected(peer, blocks=blocks, tokens=tokens)
        if expected is None:
            return min(t.unmeasured, limit)
        return min(t.slack * expected + t.floor, limit)

    def open_timeout(self, peer: bytes, *, cap: float | None = None) -> float:
        """The deadline of a connect plus OPEN_SESSION (no compute: the RTT's share)."""
        t = self.timeouts
        limit = t.cap if cap is None else min(cap, t.cap)
        rtt = self.rtt(peer)
        return min(t.unmeasured if rtt is None else t.slack * 2 * rtt + t.floor, limit)

    def open_hedge_delay(self, peer: bytes) -> float:
        """When to race a slow connect plus OPEN_SESSION on ``peer`` against another candidate."""
        return self.timeouts.hedge_slack * 2 * (self.rtt(peer) or 0.0) + self.timeouts.hedge_floor

    def hedge_delay(self, peer: bytes, *, blocks: int, tokens: int) -> float | None:
        """When to race a slow step on ``peer`` against another candidate (None: unmeasured)."""
        expected = self.expected(peer, blocks=blocks, tokens=tokens)
        if expected is None:
            return None
        return self.timeouts.hedge_slack * expected + self.timeouts.hedge_floor

    # -- reports ------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[bytes, dict[str, object]]:
        """Per peer: seconds since last seen, backoff left, streak, RTT, compute (status)."""
        return {p: {"last_seen_ago": None if r.last_seen is None else max(now - r.last_seen, 0.0),
                    "backoff_left": max(r.backoff_until - now, 0.0), "streak": r.streak, "failures": r.failures,
                    "last_error": r.last_error, "rtt": r.rtt, "block_seconds": r.block_seconds}
                for p, r in self.peers.items()}
