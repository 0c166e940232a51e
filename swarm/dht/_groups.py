"""Address groups: the unit of diversity for DHT storage and contacts (spec "DHT",
"Storage" and "Routing table").

One operator can own many addresses of one subnet far more cheaply than addresses
in many subnets, so quotas and diversity rules count per group, as BitTorrent (BEP
42) and libp2p's peer diversity filter do: an IPv4 address belongs to its /24, an
IPv6 address to its /64 (an IPv4-mapped IPv6 address counts as IPv4), and a host
name that is not an IP literal is its own group.
"""

from __future__ import annotations

import ipaddress

from ..errors import InvalidAddress
from .._address import PeerAddress

__all__ = ["address_group", "host_group"]


def host_group(host: str) -> str:
    """The group of a bare host: ``"v4:a.b.c.0/24"``, ``"v6:p:q:r:s::/64"`` or ``"name:host"``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"name:{host.lower()}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return f"v4:{ipaddress.IPv4Network((int(ip) & 0xFFFFFF00, 24))}"
    return f"v6:{ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))}"


def address_group(addr: str) -> str:
    """The group of ``host:port`` / ``[v6]:port`` (a socket address as the transport
    formats it, or a listen address). Something that does not parse is its own group."""
    try:
        return host_group(PeerAddress.parse(addr).host)
    except InvalidAddress:
        return f"name:{addr}"
