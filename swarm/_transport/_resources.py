"""What a remote peer may make this host hold: connection slots and the memory of
incomplete messages (spec/SPEC.md section 15, "Connection limits" and "Incomplete
messages"). Pure: callers pass ``now`` and snapshots; nothing here reads a clock or
touches a socket.

Theory of operation, after libp2p's resource manager (hard limits per scope,
checked before the resource is spent) and its connection manager (watermarks and
trimming of the least valuable connections):

- A socket is *handshaking* from accept until its Noise handshake ends. Handshakes
  have their own budget (``max_handshaking``, and shares per source IP and per
  address group: a /24 for IPv4, a /64 for IPv6), so sockets that never speak cannot
  take the slots of peers that complete a handshake, and one subnet cannot take them
  all: when the budget is full, a newcomer from a less crowded group replaces the
  oldest handshake of the most crowded one (the DHT's replacement rule, section 10).
- Established inbound connections have shares per source IP and per group too,
  checked at accept (before the handshake is paid for), and the host as a whole
  has watermarks: above ``high_water`` connections, ``trim`` picks connections to
  close until ``low_water`` remain. Never trimmed: connections the application
  protects (open sessions), busy ones (a request outstanding either way) and ones
  younger than ``grace``. The rest go in this order: idle ones (no request either way
  for ``idle_after``) before active ones, inbound before outbound, the most crowded
  group first, the newest first. Beyond ``max_connections`` established, a new inbound
  connection that trimming cannot make room for is refused.
- An incomplete application message reserves its declared length from
  ``IncompleteBudget`` (per host, and per group at most a share of it) while it is
  being received; a reservation that does not fit fails and that connection is
  dropped. The shell also holds the sender to ``message_deadline(length)``.

The groups of the host's own addresses are exempt from the per-IP and per-group
shares (a local swarm, or peers behind one's own NAT, are not a remote operator's
Sybils), as the DHT exempts them from its diversity rule; they still count towards
every total.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["ResourceLimits", "DEFAULT_RESOURCES", "ConnectionManager", "ConnectionInfo", "IncompleteBudget"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceLimits:
    """A host's budgets for what remote peers make it hold (spec section 15)."""

    max_handshaking: int = 64  # sockets between accept and the end of their handshake
    max_handshaking_per_ip: int = 4
    max_handshaking_per_group: int = 16
    max_connections: int = 320  # established connections, hard limit
    high_water: int = 256  # above this many established, trim ...
    low_water: int = 192  # ... down to this many
    max_per_ip: int = 16  # established inbound connections (plus handshakes) from one IP
    max_per_group: int = 32  # ... from one /24 or /64
    grace: float = 10.0  # seconds a new connection is never trimmed
    idle_after: float = 10.0  # seconds without a request either way: idle, trimmed first
    max_incomplete_total: int = 256 * MiB  # declared bytes of incomplete messages, whole host
    max_incomplete_per_group: int = 64 * MiB  # ... from one group
    message_deadline: float = 20.0  # seconds to complete a message once started, plus ...
    message_min_rate: float = 1.0 * MiB  # ... its length at this many bytes per second

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"resource limit {name} must be positive")
        if not self.low_water <= self.high_water <= self.max_connections:
            raise ValueError("need low_water <= high_water <= max_connections")

    def message_deadline_for(self, length: int) -> float:
        """Seconds an application message of ``length`` bytes may take from its first byte."""
        return self.message_deadline + length / self.message_min_rate


DEFAULT_RESOURCES = ResourceLimits()


K = TypeVar("K", bound=Hashable)  # a connection's key: the caller's own handle on it


@dataclass(frozen=True, slots=True)
class ConnectionInfo(Generic[K]):
    """What ``trim`` needs to know of one established connection, at the moment."""

    key: K
    group: str
    inbound: bool
    opened: float  # when it was established
    last_request: float  # last request sent or received on it
    busy: bool  # a request outstanding either way
    protected: bool  # the application asked to keep it (e.g. open sessions)


class ConnectionManager:
    """Admission of sockets and trimming of connections; see the module docstring."""

    def __init__(self, limits: ResourceLimits = DEFAULT_RESOURCES, *, exempt_groups: Iterable[str] = ()) -> None:
        self.limits = limits
        self.exempt_groups = set(exempt_groups)
        self._handshaking: dict[Hashable, tuple[str, str, float]] = {}  # key -> (ip, group, since)
        self._established: dict[Hashable, tuple[str, str, bool]] = {}  # key -> (ip, group, inbound)
        self._per_ip: dict[str, int] = {}  # handshakes plus established inbound, per IP
        self._per_group: dict[str, int] = {}
        self._hs_ip: dict[str, int] = {}
        self._hs_group: dict[str, int] = {}

    # -- inspection -------------------------------------------------------------------

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    @property
    def established(self) -> int:
        return len(self._established)

    # -- handshakes -------------------------------------------------------------------

    def accept(self, key: Hashable, ip: str, group: str, *, now: float) -> tuple[bool, Hashable | None, str]:
        """Whether a socket just accepted from ``ip`` may start its handshake.

        Returns ``(admitted, evict, reason)``: ``evict`` is the key of a handshake to
        abort to make room (or None); ``reason`` says why a socket is refused.
        """
        lim = self.limits
        if group not in self.exempt_groups:
            if self._per_ip.get(ip, 0) >= lim.max_per_ip:
                return False, None, f"{lim.max_per_ip} connections from {ip} already"
            if self._per_group.get(group, 0) >= lim.max_per_group:
                return False, None, f"{lim.max_per_group} connections from {group} already"
            if self._hs_ip.get(ip, 0) >= lim.max_handshaking_per_ip:
                return False, None, f"{lim.max_handshaking_per_ip} handshakes from {ip} under way"
            if self._hs_group.get(group, 0) >= lim.max_handshaking_per_group:
                return False, None, f"{lim.max_handshaking_per_group} handshakes from {group} under way"
        evict = None
        if len(self._handshaking) >= lim.max_handshaking:
            crowded = max(self._hs_group, key=lambda g: (self._hs_group[g], g))
            if self._hs_group[crowded] <= self._hs_group.get(group, 0) + 1:
                return False, None, f"{lim.max_handshaking} handshakes under way"
            evict = min((k for k, (_, g, _) in self._handshaking.items() if g == crowded),
                        key=lambda k: self._handshaking[k][2])
            self.handshake_ended(evict)
        self._handshaking[key] = (ip, group, now)
        self._hs_ip[ip] = self._hs_ip.get(ip, 0) + 1
        self._hs_group[group] = self._hs_group.get(group, 0) + 1
        _inc(self._per_ip, ip)
        _inc(self._per_group, group)
        return True, evict, ""

    def handshake_ended(self, key: Hashable) -> None:
        """The handshake of ``key`` finished, failed or was aborted (idempotent)."""
        entry = self._handshaking.pop(key, None)
        if entry is None:
            return
        ip, group, _ = entry
        _dec(self._hs_ip, ip)
        _dec(self._hs_group, group)
        _dec(self._per_ip, ip)
        _dec(self._per_group, group)

    # -- established connections -------------------------------------------------------

    def opened(self, key: Hashable, ip: str, group: str, *, inbound: bool) -> None:
        """``key`` is now an established connection (call ``handshake_ended`` first)."""
        if key in self._established:
            return
        self._established[key] = (ip, group, inbound)
        if inbound:
            _inc(self._per_ip, ip)
            _inc(self._per_group, group)

    def closed(self, key: Hashable) -> None:
        """An established connection is gone (idempotent)."""
        entry = self._established.pop(key, None)
        if entry is None:
            return
        ip, group, inbound = entry
        if inbound:
            _dec(self._per_ip, ip)
            _dec(self._per_group, group)

    def over_limit(self) -> bool:
        """Whether established connections are above the hard limit."""
        return len(self._established) > self.limits.max_connections

    def trim(self, connections: Iterable[ConnectionInfo[K]], *, now: float) -> list[K]:
        """Keys to close, least valuable first, to bring the established connections
        down to ``low_water`` once they are above ``high_water`` (empty otherwise)."""
        lim = self.limits
        infos = list(connections)
        if len(infos) <= lim.high_water:
            return []
        crowd: dict[str, int] = {}
        for info in infos:
            crowd[info.group] = crowd.get(info.group, 0) + 1
        candidates = [c for c in infos if not c.protected and not c.busy and now - c.opened >= lim.grace]
        candidates.sort(key=lambda c: (
            0 if now - c.last_request >= lim.idle_after else 1,  # idle first
            0 if c.inbound else 1,  # then inbound
            -crowd[c.group] if c.group not in self.exempt_groups else 0,  # then the most crowded group
            -c.opened,  # then the newest
        ))
        return [c.key for c in candidates[: len(infos) - lim.low_water]]


class IncompleteBudget:
    """Bytes that incomplete application messages may reserve, in total and per group."""

    def __init__(self, limits: ResourceLimits = DEFAULT_RESOURCES, *, exempt_groups: Iterable[str] = ()) -> None:
        self.limits = limits
        self.exempt_groups = set(exempt_groups)
        self._held: dict[Hashable, tuple[str, int]] = {}
        self._group: dict[str, int] = {}
        self.total = 0

    def held(self, key: Hashable) -> int:
        entry = self._held.get(key)
        return entry[1] if entry is not None else 0

    def reserve(self, key: Hashable, group: str, size: int) -> bool:
        """Reserve ``size`` bytes for ``key``'s message in progress (replacing what it
        held); False, reserving nothing, if that exceeds the total or the group's share."""
        self.release(key)
        lim = self.limits
        if self.total + size > lim.max_incomplete_total:
            return False
        if group not in self.exempt_groups and self._group.get(group, 0) + size > lim.max_incomplete_per_group:
            return False
        self._held[key] = (group, size)
        self._group[group] = self._group.get(group, 0) + size
        self.total += size
        return True

    def release(self, key: Hashable) -> None:
        """Free what ``key`` reserved (idempotent)."""
        entry = self._held.pop(key, None)
        if entry is None:
            return
        group, size = entry
        self.total -= size
        left = self._group[group] - size
        if left:
            self._group[group] = left
        else:
            del self._group[group]


def _inc(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _dec(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
