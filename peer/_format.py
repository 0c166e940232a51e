"""What people read: the status, credit and route tables, and their JSON forms.

One home for presenting a swarm view, shared by ``swarm-peer status`` (text and
``--json``), the demo, and the web page's ``/api/swarm`` (so the page and the CLI never
disagree). Pure functions of data and ``now``; imports neither torch nor trio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from protocol import peer_id_of

__all__ = ["READY_PREFIX", "format_route", "format_status", "format_credit", "coverage_runs", "gaps",
           "view_to_dict", "credit_to_dicts", "route_to_dicts", "ago", "format_models", "models_to_dicts",
           "seen", "backoff"]

#: The first words of the line ``swarm-peer serve`` prints once it serves (the demo and
#: tests wait for it).
READY_PREFIX = "swarm-peer: serving"


def format_route(route: Sequence[Any]) -> str:
    """``peer@address[S:E] -> ...`` of a ``GenerationResult.route``."""
    return " -> ".join(f"{h.peer_id[:8]}@{h.address}[{h.start}:{h.end}]" for h in route)


def route_to_dicts(route: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"peer_id": h.peer_id, "address": h.address, "blocks": [h.start, h.end]} for h in route]


def coverage_runs(num_blocks: int, announcements: Sequence[Any]) -> list[tuple[int, int, int, float]]:
    """``(start, end, servers, throughput)`` of maximal runs of blocks with equal coverage."""
    runs: list[tuple[int, int, int, float]] = []
    for b in range(num_blocks):
        covering = [a for a in announcements if a.span[0] <= b < a.span[1]]
        key = (len(covering), round(sum(a.throughput for a in covering), 3))
        if runs and runs[-1][1] == b and (runs[-1][2], runs[-1][3]) == key:
            runs[-1] = (runs[-1][0], b + 1, *key)
        else:
            runs.append((b, b + 1, *key))
    return runs


def gaps(num_blocks: int, announcements: Sequence[Any]) -> list[tuple[int, int]]:
    """The half-open block ranges nobody serves."""
    return [(s, e) for s, e, count, _ in coverage_runs(num_blocks, announcements) if count == 0]


def ago(seconds: float) -> str:
    """``12 s``, ``4 min``, ``3 h``: a rough duration for tables."""
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def seen(entry: Mapping[str, Any] | None) -> str:
    """When a server was last seen alive, from a ``PeerHealth.snapshot`` entry."""
    if not entry:
        return "?"
    if entry.get("last_seen_ago") is not None:
        rtt = entry.get("rtt")
        return f"{ago(entry['last_seen_ago'])} ago" + (f" ({rtt * 1000:.0f} ms)" if rtt is not None else "")
    return "no answer" if entry.get("failures") else "?"


def backoff(entry: Mapping[str, Any] | None) -> str:
    """A client's backoff of a server, from a ``PeerHealth.snapshot`` entry."""
    if not entry or not entry.get("backoff_left"):
        return "-"
    return f"{ago(entry['backoff_left'])} ({entry.get('streak', 0)} failed)"


def format_status(view: Any, *, now: float, health: Mapping[bytes, Mapping[str, Any]] | None = None,
                  backoffs: bool = False) -> str:
    """The ``swarm-peer status`` table: servers (with when each last renewed its
    announcement and when it expires: a server that died keeps its entry until then;
    with ``health``, a ``PeerHealth.snapshot``, when this peer last saw each alive and,
    with ``backoffs``, how long it still leaves each out after failures), then block
    coverage with gaps shown."""
    announcements = view.announcements
    published: Mapping[bytes, float] = getattr(view, "published", {}) or {}
    lines = [f"model {view.model} ({view.num_blocks} blocks), {len(announcements)} server(s)", ""]
    extra = f"  {'LAST SEEN ALIVE':<20}" if health is not None else ""
    extra += f"{'BACKOFF':<16}" if health is not None and backoffs else ""
    lines.append(f"{'PEER':<14}{'BLOCKS':<10}{'THROUGHPUT':>14}{'FREE':>6}  {'RENEWED':>9}  {'EXPIRES IN':>10}"
                 f"{extra}  ADDRESSES")
    for a in sorted(announcements, key=lambda a: (a.span, a.peer_id)):
        renewed = f"{ago(now - published[a.peer_id])} ago" if a.peer_id in published else "?"
        columns = ""
        if health is not None:
            columns = f"  {seen(health.get(a.peer_id)):<20}"
            if backoffs:
                columns += f"{backoff(health.get(a.peer_id)):<16}"
        lines.append(f"{a.peer_id.hex()[:12]:<14}{f'{a.span[0]}:{a.span[1]}':<10}{a.throughput:>10.1f} t/s"
                     f"{a.free_sessions:>6}  {renewed:>9}  {ago(a.expires - now):>10}{columns}  "
                     f"{', '.join(a.addrs)}")
    lines += ["", "coverage:"]
    for start, end, count, tput in coverage_runs(view.num_blocks, announcements):
        what = f"{count} server(s), {tput:.1f} tok/s" if count else "GAP: not served by anyone"
        lines.append(f"  blocks {start}:{end}".ljust(20) + what)
    return "\n".join(lines)


def format_models(models: Sequence[Any]) -> str:
    """The models part of ``swarm-peer status``: every model the swarm's index lists
    (and the one asked about), with its shape and how many servers list it."""
    lines = [f"models the swarm serves ({len(models)}):",
             f"  {'MODEL':<44}{'BLOCKS':>7}{'HIDDEN':>8}{'SERVERS':>9}  SOURCE"]
    for m in models:
        hidden = str(m.hidden_size) if m.hidden_size else "?"
        servers = str(m.servers) if m.servers else ("-" if m.origin == "configured" else "?")
        lines.append(f"  {m.model_id:<44}{m.num_blocks:>7}{hidden:>8}{servers:>9}  {m.source or '-'}")
    return "\n".join(lines)


def models_to_dicts(models: Sequence[Any]) -> list[dict[str, Any]]:
    """``served_models`` as JSON (``status --json``)."""
    return [{"name": m.name, "model_id": m.model_id, "num_blocks": m.num_blocks, "hidden_size": m.hidden_size,
             "source": m.source, "servers": m.servers, "origin": m.origin} for m in models]


def credit_to_dicts(rows: Iterable[tuple[bytes, Any, int, int]]) -> list[dict[str, Any]]:
    """``neighbour_rows`` as JSON: peer id, their credit here, work each way."""
    return [{"peer_id": peer_id_of(key).hex(), "credit": credit.total, "work_for_us": for_us,
             "work_for_them": for_them} for key, credit, for_us, for_them in rows]


def format_credit(rows: Sequence[tuple[bytes, Any, int, int]], receipts: int) -> str:
    """This peer's credit with its neighbours (work units = blocks x tokens)."""
    lines = [f"credit of this peer's neighbours ({receipts} receipts in the ledger):",
             f"  {'PEER':<14}{'THEIR CREDIT HERE':>18}{'WORK FOR US':>13}{'WORK FOR THEM':>15}"]
    lines += [f"  {peer_id_of(key).hex()[:12]:<14}{credit.total:>18}{for_us:>13}{for_them:>15}"
              for key, credit, for_us, for_them in rows]
    if not rows:
        lines.append("  (no receipts yet: serve blocks to earn credit)")
    return "\n".join(lines)


def view_to_dict(view: Any, *, now: float, reputation: Any = None, latency: Mapping[str, float] | None = None,
                 model_name: str | None = None, health: Mapping[bytes, Mapping[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """A swarm view as JSON (``status --json`` and the web page's swarm view).

    ``reputation`` (a ``verify.Reputation``) adds each server's score and ban;
    ``latency`` (peer id hex -> seconds) adds what this peer last measured per server;
    ``health`` (a ``PeerHealth.snapshot``) when it last saw each alive, its RTT and
    the backoff this peer holds against it.
    """
    announcements = view.announcements
    published: Mapping[bytes, float] = getattr(view, "published", {}) or {}
    servers = []
    for a in sorted(announcements, key=lambda a: (a.span, a.peer_id)):
        pid = a.peer_id.hex()
        entry: dict[str, Any] = {
            "peer_id": pid, "addrs": list(a.addrs), "blocks": list(a.span), "throughput": a.throughput,
            "free_sessions": a.free_sessions, "expires": a.expires, "expires_in": a.expires - now,
            "published": published.get(a.peer_id), "age": (now - published[a.peer_id]) if a.peer_id in published
            else None,
            "latency": (latency or {}).get(pid),
        }
        if reputation is not None:
            entry["reputation"] = reputation.score(a.peer_id, now)
            entry["banned"] = reputation.is_banned(a.peer_id)
        if health is not None:
            known = health.get(a.peer_id) or {}
            entry["last_seen_ago"] = known.get("last_seen_ago")
            entry["rtt"] = known.get("rtt")
            entry["backoff_left"] = known.get("backoff_left", 0.0)
            entry["failures_in_a_row"] = known.get("streak", 0)
        servers.append(entry)
    coverage = [sum(1 for a in announcements if a.span[0] <= b < a.span[1]) for b in range(view.num_blocks)]
    out: dict[str, Any] = {
        "model": view.model, "num_blocks": view.num_blocks, "servers": servers, "coverage": coverage,
        "gaps": [list(g) for g in gaps(view.num_blocks, announcements)],
    }
    if model_name is not None:
        out["name"] = model_name
    if reputation is not None:
        out["banned"] = [{"peer_id": p.hex(), "reason": b.reason, "since": b.since}
                         for p, b in sorted(reputation.bans.items())]
    return out
