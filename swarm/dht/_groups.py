"""Address groups: the unit of diversity for DHT storage and contacts (spec "DHT",
"Storage" and "Routing table").

One operator can own many addresses of one subnet far more cheaply than addresses
in many subnets, so quotas and diversity rules count per group, as BitTorrent (BEP
42) and libp2p's peer diversity filter do: an IPv4 address belongs to its /24, an
IPv6 address to its /64 (an IPv4-mapped IPv6 address counts as IPv4), and a host
name that is not an IP literal is its own group.
"""

from __future__ import annotations

from .._address import address_group, host_group  # shared with the transport's connection limits

__all__ = ["address_group", "host_group"]
