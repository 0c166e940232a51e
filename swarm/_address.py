"""Peer addresses: ``host:port`` or ``[ipv6]:port`` (spec/SPEC.md, "Handshake", listen
addresses).

The textual form is the one peers put in their handshake and announcements, so parsing
is strict: a bare IPv6 address without brackets is ambiguous (``::1:80``) and refused,
the port is 1-65535 in ASCII decimal (``int()`` alone would accept ``"8_0"`` or
Unicode digits), and a host name is letters, digits, ``.``, ``-`` and ``_``. IPv6 zone
ids (``fe80::1%eth0``) are refused because the handshake's address check refuses them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import InvalidAddress

__all__ = ["PeerAddress", "address_group", "host_group"]

_BRACKETED = re.compile(r"\[([^\[\]]*)\]:([^:]*)")
_PLAIN = re.compile(r"([^:\[\]]*):([^:]*)")
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_HOST_LENGTH = 253  # the DNS limit for a name


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAddress:
    """Where a peer listens. ``host`` is a name, an IPv4 or an IPv6 address (no brackets)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise InvalidAddress(f"{self.host}:{self.port}", "the port must be an integer in 1-65535")
        if not isinstance(self.host, str) or not self.host:
            raise InvalidAddress(self.host, "the host is empty")
        if ":" in self.host:
            if "%" in self.host:
                raise InvalidAddress(self.host, "IPv6 zone ids are not supported")
            try:
                ipaddress.IPv6Address(self.host)
            except ValueError:
                raise InvalidAddress(self.host, "the host is not a valid IPv6 address") from None
        elif len(self.host) > MAX_HOST_LENGTH or _HOSTNAME.fullmatch(self.host) is None:
            raise InvalidAddress(self.host, "the host may hold only letters, digits, '.', '-' and '_'")

    @classmethod
    def parse(cls, text: str | PeerAddress) -> PeerAddress:
        """Parse ``host:port`` or ``[ipv6]:port``; a ``PeerAddress`` is returned as is.

        Raises:
            InvalidAddress: anything else, with the reason in its message.
        """
        if isinstance(text, PeerAddress):
            return text
        if not isinstance(text, str):
            raise InvalidAddress(text, "an address is a text string")
        match = _BRACKETED.fullmatch(text)
        if match is None:
            match = _PLAIN.fullmatch(text)
            if match is None:
                if text.startswith("["):
                    reason = "expected [ipv6]:port"
                elif text.count(":") > 1:
                    reason = "an IPv6 address needs brackets"
                else:
                    reason = "expected host:port"
                raise InvalidAddress(text, reason)
            if not match[1]:
                raise InvalidAddress(text, "the host is empty")
        elif ":" not in match[1]:
            raise InvalidAddress(text, "brackets are only for IPv6 addresses")
        host, port = match[1], match[2]
        if _PORT.fullmatch(port) is None or not 1 <= int(port) <= 65535:
            raise InvalidAddress(text, "the port must be a number in 1-65535")
        try:
            return cls(host=host, port=int(port))
        except InvalidAddress as exc:
            raise InvalidAddress(text, exc.reason) from None

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def format_sockaddr(sockaddr: tuple) -> str:
    """``host:port`` or ``[v6]:port`` for a socket address tuple (as getsockname gives)."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
