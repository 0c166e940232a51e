"""Topologies: which emulated node sits where, and what each directed link costs.

A topology is a set of nodes (a name, a region, the loopback address the node listens
on and dials from) and the figures of every directed link between two of them: a
one-way delay and a bandwidth. The figures come, most specific first, from a link entry
for that pair of nodes, a link entry for their pair of regions, the built-in region
table (``REGION_RTT_MS``: the issue's realistic round-trip times), and the defaults.
Links are symmetric: a pair's round trip is split evenly into its two one-way delays.

The file format is TOML (``Topology.load`` / ``Topology.dumps``)::

    [defaults]
    bandwidth_mbit = 100      # every link unless a link entry says otherwise
    intra_rtt_ms = 3          # two nodes of one region (the table says 2-5 ms)
    unknown_source = "refuse" # a connection from an address no node has: "refuse" or "direct"

    [[node]]
    name = "client"
    region = "tokyo"
    ip = "127.0.0.10"         # optional: nodes without one get 127.0.0.10, .11, ... in order

    [[node]]
    name = "far"
    region = "virginia"

    [[link]]                  # optional overrides; a and b are node or region names
    a = "tokyo"
    b = "virginia"
    rtt_ms = 150
    bandwidth_mbit = 25

Everything here is pure data: the proxy (``_proxy.py``) and the launcher
(``_swarm.py``) read it.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["REGION_RTT_MS", "REGIONS", "Link", "Node", "Topology", "TopologyError", "region_rtt_ms", "regional"]

# Round-trip times between regions in milliseconds (issue 14, section 1): realistic
# figures for public clouds. Pairs the issue does not give are estimated from the
# great-circle distance the same way (about 1 ms of RTT per 100 km of fibre path).
REGION_RTT_MS: dict[frozenset[str], float] = {
    frozenset({"tokyo", "seoul"}): 30.0,
    frozenset({"tokyo", "virginia"}): 150.0,
    frozenset({"virginia", "frankfurt"}): 90.0,
    frozenset({"tokyo", "frankfurt"}): 230.0,
    frozenset({"seoul", "virginia"}): 180.0,
    frozenset({"seoul", "frankfurt"}): 250.0,
}
REGIONS = ("tokyo", "seoul", "virginia", "frankfurt")
DEFAULT_INTRA_RTT_MS = 3.0  # within one region: 2-5 ms
DEFAULT_BANDWIDTH_MBIT = 100.0  # 25-100 Mbit/s per link; Petals' stated minimum is 25
FIRST_AUTO_IP = ipaddress.IPv4Address("127.0.0.10")
_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "UNSET"})()  # a link entry without bandwidth_mbit


class TopologyError(ValueError):
    """A topology file or object is inconsistent (says which entry and why)."""


def region_rtt_ms(a: str, b: str, *, intra_rtt_ms: float = DEFAULT_INTRA_RTT_MS) -> float:
    """The built-in round trip between two regions (``intra_rtt_ms`` within one).

    Raises:
        TopologyError: a pair of distinct regions the table does not know.
    """
    if a == b:
        return intra_rtt_ms
    try:
        return REGION_RTT_MS[frozenset({a, b})]
    except KeyError:
        raise TopologyError(f"no round-trip time for regions {a!r} and {b!r}: add a [[link]] entry for them, "
                            f"or use the known regions {', '.join(REGIONS)}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """One direction of a link: one-way ``delay`` (s) and ``bandwidth`` (bytes/s; inf: unlimited)."""

    delay: float
    bandwidth: float = math.inf

    def __post_init__(self) -> None:
        if not (self.delay >= 0 and math.isfinite(self.delay)):
            raise TopologyError(f"a link's delay must be a finite number >= 0 s, got {self.delay!r}")
        if not self.bandwidth > 0:
            raise TopologyError(f"a link's bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")

    @classmethod
    def from_rtt(cls, rtt_ms: float, bandwidth_mbit: float | None = None) -> Link:
        """Half the round trip each way; ``bandwidth_mbit`` in Mbit/s (None: unlimited)."""
        bandwidth = math.inf if bandwidth_mbit is None else bandwidth_mbit * 1e6 / 8
        return cls(delay=rtt_ms / 2e3, bandwidth=bandwidth)

    @property
    def rtt_ms(self) -> float:
        return self.delay * 2e3

    @property
    def mbit(self) -> float:
        return self.bandwidth * 8 / 1e6


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """An emulated machine: ``ip`` is the loopback address it listens on and dials from."""

    name: str
    region: str
    ip: str

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise TopologyError(f"node name {self.name!r}: use letters, digits, '-', '_' and '.'")
        try:
            address = ipaddress.ip_address(self.ip)
        except ValueError:
            raise TopologyError(f"node {self.name}: {self.ip!r} is not an IP address") from None
        if not address.is_loopback:
            raise TopologyError(f"node {self.name}: {self.ip} is not a loopback address; the emulator keeps "
                                f"all traffic on this machine")


@dataclass(frozen=True, slots=True, kw_only=True)
class _LinkRule:
    a: str
    b: str
    rtt_ms: float | None = None
    bandwidth_mbit: Any = _UNSET  # Mbit/s, None (unlimited) or _UNSET (not given: the next rule decides)


@dataclass(frozen=True, slots=True)
class Topology:
    """Nodes and link figures (see the module docstring). Build with ``Topology.make``."""

    nodes: tuple[Node, ...]
    bandwidth_mbit: float | None = DEFAULT_BANDWIDTH_MBIT
    intra_rtt_ms: float = DEFAULT_INTRA_RTT_MS
    unknown_source: str = "refuse"
    rules: tuple[_LinkRule, ...] = ()
    _by_name: dict[str, Node] = field(init=False, repr=False, compare=False)
    _by_ip: dict[str, Node] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Node] = {}
        by_ip: dict[str, Node] = {}
        for node in self.nodes:
            if node.name in by_name:
                raise TopologyError(f"two nodes are named {node.name!r}")
            if node.ip in by_ip:
                raise TopologyError(f"nodes {by_ip[node.ip].name} and {node.name} share the address {node.ip}")
            by_name[node.name] = by_ip[node.ip] = node
        if self.unknown_source not in ("refuse", "direct"):
            raise TopologyError(f"unknown_source must be 'refuse' or 'direct', got {self.unknown_source!r}")
        regions = {n.region for n in self.nodes}
        if regions & set(by_name):
            raise TopologyError(f"{sorted(regions & set(by_name))}: a node may not be named like a region")
        names = set(by_name) | regions
        for rule in self.rules:
            for end in (rule.a, rule.b):
                if end not in names:
                    raise TopologyError(f"link {rule.a}-{rule.b}: {end!r} is neither a node nor a region here")
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_ip", by_ip)
        for a in self.nodes:  # fail now, not on the first connection, for a pair without figures
            for b in self.nodes:
                if a is not b:
                    self.link(a.name, b.name)

    @classmethod
    def make(cls, nodes: Iterable[tuple[str, str] | tuple[str, str, str] | Node], *,
             links: Iterable[Mapping[str, Any]] = (), bandwidth_mbit: float | None = DEFAULT_BANDWIDTH_MBIT,
             intra_rtt_ms: float = DEFAULT_INTRA_RTT_MS, unknown_source: str = "refuse") -> Topology:
        """A topology from ``(name, region[, ip])`` tuples; nodes without an ip get
        127.0.0.10, .11, ... (skipping those taken). ``links``: dicts with ``a``, ``b``
        and ``rtt_ms`` and/or ``bandwidth_mbit`` (``None`` bandwidth: unlimited)."""
        given = [n if isinstance(n, Node) else tuple(n) for n in nodes]
        taken = {n.ip if isinstance(n, Node) else n[2] for n in given if isinstance(n, Node) or len(n) == 3}
        auto = (str(FIRST_AUTO_IP + i) for i in range(240))
        built: list[Node] = []
        for item in given:
            if isinstance(item, Node):
                built.append(item)
                continue
            if len(item) == 3:
                name, region, ip = item
            else:
                name, region = item
                ip = next(a for a in auto if a not in taken)
            built.append(Node(name=name, region=region, ip=ip))
        rules = tuple(_rule(r) for r in links)
        return cls(tuple(built), bandwidth_mbit=bandwidth_mbit, intra_rtt_ms=intra_rtt_ms,
                   unknown_source=unknown_source, rules=rules)

    # -- lookups ---------------------------------------------------------------------

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise TopologyError(f"no node named {name!r} (nodes: {', '.join(self._by_name)})") from None

    def node_at(self, ip: str) -> Node | None:
        """The node that owns ``ip``, or None."""
        return self._by_ip.get(ip)

    def link(self, src: str, dst: str) -> Link:
        """The figures for traffic from node ``src`` to node ``dst`` (names)."""
        a, b = self.node(src), self.node(dst)
        rtt: float | None = None
        bandwidth: float | None | object = _UNSET
        # most specific first: node pair, node-region, region pair
        for ends in ((a.name, b.name), (a.name, b.region), (a.region, b.name), (a.region, b.region)):
            for rule in self.rules:
                if {rule.a, rule.b} == set(ends):
                    if rtt is None and rule.rtt_ms is not None:
                        rtt = rule.rtt_ms
                    if bandwidth is _UNSET and rule.bandwidth_mbit is not _UNSET:
                        bandwidth = rule.bandwidth_mbit
        if rtt is None:
            rtt = region_rtt_ms(a.region, b.region, intra_rtt_ms=self.intra_rtt_ms)
        if bandwidth is _UNSET:
            bandwidth = self.bandwidth_mbit
        return Link.from_rtt(float(rtt), None if bandwidth is None else float(bandwidth))  # type: ignore[arg-type]

    def table(self) -> str:
        """A printable matrix of RTT (ms) and bandwidth (Mbit/s) between the nodes."""
        names = [n.name for n in self.nodes]
        width = max(8, *(len(n) for n in names)) + 1
        lines = [" " * width + "".join(f"{n:>{width + 6}}" for n in names)]
        for a in names:
            cells = []
            for b in names:
                if a == b:
                    cells.append(f"{'-':>{width + 6}}")
                else:
                    link = self.link(a, b)
                    bw = "inf" if math.isinf(link.bandwidth) else f"{link.mbit:g}"
                    cells.append(f"{f'{link.rtt_ms:g}ms/{bw}M':>{width + 6}}")
            node = self.node(a)
            lines.append(f"{a:<{width}}" + "".join(cells) + f"   {node.region} {node.ip}")
        return "\n".join(lines)

    def with_nodes(self, nodes: Sequence[Node]) -> Topology:
        return replace(self, nodes=tuple(nodes))

    # -- the file format ---------------------------------------------------------------

    @classmethod
    def loads(cls, text: str) -> Topology:
        """Parse the TOML form (module docstring). Raises ``TopologyError``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TopologyError(f"not valid TOML: {exc}") from None
        unknown = set(data) - {"defaults", "node", "link"}
        if unknown:
            raise TopologyError(f"unknown sections {sorted(unknown)}; expected [defaults], [[node]], [[link]]")
        defaults = dict(data.get("defaults", {}))
        bad = set(defaults) - {"bandwidth_mbit", "intra_rtt_ms", "unknown_source"}
        if bad:
            raise TopologyError(f"unknown [defaults] keys {sorted(bad)}")
        nodes = []
        for entry in data.get("node", []):
            if set(entry) - {"name", "region", "ip"} or not {"name", "region"} <= set(entry):
                raise TopologyError(f"[[node]] {entry}: needs name and region, optionally ip, nothing else")
            nodes.append((entry["name"], entry["region"], entry["ip"]) if "ip" in entry
                         else (entry["name"], entry["region"]))
        bandwidth = defaults.get("bandwidth_mbit", DEFAULT_BANDWIDTH_MBIT)
        if bandwidth == "unlimited":
            bandwidth = None
        return cls.make(nodes, links=data.get("link", []), bandwidth_mbit=bandwidth,
                        intra_rtt_ms=float(defaults.get("intra_rtt_ms", DEFAULT_INTRA_RTT_MS)),
                        unknown_source=str(defaults.get("unknown_source", "refuse")))

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        return cls.loads(Path(path).read_text())

    def dumps(self) -> str:
        """The TOML form; ``Topology.loads(t.dumps()) == t``."""
        bw = '"unlimited"' if self.bandwidth_mbit is None else repr(float(self.bandwidth_mbit))
        out = ["[defaults]", f"bandwidth_mbit = {bw}", f"intra_rtt_ms = {float(self.intra_rtt_ms)!r}",
               f'unknown_source = "{self.unknown_source}"']
        for node in self.nodes:
            out += ["", "[[node]]", f'name = "{node.name}"', f'region = "{node.region}"', f'ip = "{node.ip}"']
        for rule in self.rules:
            out += ["", "[[link]]", f'a = "{rule.a}"', f'b = "{rule.b}"']
            if rule.rtt_ms is not None:
                out.append(f"rtt_ms = {float(rule.rtt_ms)!r}")
            if rule.bandwidth_mbit is not _UNSET:
                out.append("bandwidth_mbit = " + ('"unlimited"' if rule.bandwidth_mbit is None
                                                  else repr(float(rule.bandwidth_mbit))))  # type: ignore[arg-type]
        return "\n".join(out) + "\n"


def _rule(entry: Mapping[str, Any]) -> _LinkRule:
    bad = set(entry) - {"a", "b", "rtt_ms", "bandwidth_mbit"}
    if bad or "a" not in entry or "b" not in entry:
        raise TopologyError(f"[[link]] {dict(entry)}: needs a and b, optionally rtt_ms and bandwidth_mbit")
    rtt = entry.get("rtt_ms")
    if rtt is not None and not (isinstance(rtt, (int, float)) and rtt >= 0):
        raise TopologyError(f"[[link]] {entry['a']}-{entry['b']}: rtt_ms must be a number >= 0")
    bandwidth = entry.get("bandwidth_mbit", _UNSET)
    if bandwidth == "unlimited":
        bandwidth = None
    elif bandwidth is not _UNSET and bandwidth is not None and not (
            isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise TopologyError(f"[[link]] {entry['a']}-{entry['b']}: bandwidth_mbit must be > 0 or \"unlimited\"")
    return _LinkRule(a=str(entry["a"]), b=str(entry["b"]), rtt_ms=None if rtt is None else float(rtt),
                     bandwidth_mbit=bandwidth)


def regional(clients: Mapping[str, str], servers: Mapping[str, int], *,
             bandwidth_mbit: float | None = DEFAULT_BANDWIDTH_MBIT, **kwargs: Any) -> Topology:
    """Clients by name -> region, and ``servers`` region -> how many: nodes named
    ``<region>-0``, ``<region>-1``, ... (the issue's replicated swarms in one line).

    ``regional({"client": "tokyo"}, {"tokyo": 3, "seoul": 3, "virginia": 3})``
    """
    nodes = [(name, region) for name, region in clients.items()]
    nodes += [(f"{region}-{i}", region) for region, count in servers.items() for i in range(count)]
    return Topology.make(nodes, bandwidth_mbit=bandwidth_mbit, **kwargs)
