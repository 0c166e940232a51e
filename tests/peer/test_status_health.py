"""``swarm-peer status`` shows when each server was last seen alive and, for a
long-lived client, the backoff it holds against each (peer/_format.py: pure)."""

from __future__ import annotations

from peer._format import format_status, view_to_dict
from protocol import Announcement
from swarm.announce import SwarmView
from swarm.health import PeerHealth

A, B, C = b"a" * 20, b"b" * 20, b"c" * 20


def _view(now):
    anns = {p: Announcement(peer_id=p, addrs=(f"127.0.0.1:{i}",), model="m", span=(0, 4), throughput=10.0,
                            free_sessions=3, expires=int(now) + 200) for i, p in enumerate((A, B, C), start=1)}
    return SwarmView(model="m", num_blocks=4, servers=anns, published={p: now - 30 for p in anns})


def test_last_seen_alive_and_backoff_columns():
    health = PeerHealth()
    health.observe_rtt(A, 0.004, 100.0)
    health.failed(B, 90.0)
    snapshot = health.snapshot(102.0)
    text = format_status(_view(1000.0), now=1000.0, health=snapshot, backoffs=True)
    rows = {line[:2]: line for line in text.splitlines() if line[:12] in (A.hex()[:12], B.hex()[:12], C.hex()[:12])}
    assert "2 s ago (4 ms)" in rows[A.hex()[:2]]
    assert "no answer" in rows[B.hex()[:2]]
    assert "3 s (1 failed)" in rows[B.hex()[:2]]
    assert "LAST SEEN ALIVE" in text
    assert "BACKOFF" in text
    body = view_to_dict(_view(1000.0), now=1000.0, health=snapshot)
    by_peer = {s["peer_id"]: s for s in body["servers"]}
    assert by_peer[A.hex()]["last_seen_ago"] == 2.0
    assert by_peer[A.hex()]["rtt"] == 0.004
    assert by_peer[B.hex()]["backoff_left"] == 3.0
    assert by_peer[B.hex()]["failures_in_a_row"] == 1
    assert by_peer[C.hex()]["last_seen_ago"] is None
    assert "LAST SEEN" not in format_status(_view(1000.0), now=1000.0)
