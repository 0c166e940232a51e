"""Bootstrap addresses, checked before anything slow (no torch, no network here)."""

from __future__ import annotations

from collections.abc import Sequence

from swarm.dht import BootstrapFailed
from swarm.errors import InvalidAddress
from swarm.transport import PeerAddress

__all__ = ["check_bootstrap"]


def check_bootstrap(bootstrap: Sequence[str]) -> tuple[str, ...]:
    """The bootstrap addresses, each checked to be ``host:port`` (no network).

    Raises:
        BootstrapFailed: none given, or one is malformed (the message says which and why).
    """
    if isinstance(bootstrap, str):
        bootstrap = [bootstrap]
    if not bootstrap:
        raise BootstrapFailed("give at least one bootstrap address (host:port of a running peer)")
    for addr in bootstrap:
        try:
            PeerAddress.parse(addr)
        except InvalidAddress as exc:
            raise BootstrapFailed(f"bad bootstrap address: {exc}") from None
    return tuple(bootstrap)
