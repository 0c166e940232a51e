import pytest
from hypothesis import given, strategies as st

from protocol.errors import SwarmError
from swarm._address import PeerAddress, format_sockaddr
from swarm.errors import InvalidAddress


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8000", "127.0.0.1", 8000),
        ("localhost:1", "localhost", 1),
        ("peer-7.example.org:65535", "peer-7.example.org", 65535),
        ("[::1]:4000", "::1", 4000),
        ("[2001:db8::ff00:42:8329]:443", "2001:db8::ff00:42:8329", 443),
        ("[::ffff:192.0.2.1]:80", "::ffff:192.0.2.1", 80),
    ],
)
def test_parse_valid(text, host, port):
    address = PeerAddress.parse(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text
    assert PeerAddress.parse(address) is address


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected host:port"),
        ("localhost", "expected host:port"),
        ("localhost:", "port"),
        (":80", "host is empty"),
        ("host:0", "1-65535"),
        ("host:65536", "1-65535"),
        ("host:123456", "1-65535"),
        ("host:8_0", "port"),
        ("host:+80", "port"),
        ("host: 80", "port"),
        ("host:\u0663\u0663", "port"),  # Arabic-Indic digits, which int() accepts
        ("::1:80", "brackets"),
        ("::1", "brackets"),
        ("[::1]", "expected [ipv6]:port"),
        ("[::1]:", "port"),
        ("[1.2.3.4]:80", "only for IPv6"),
        ("[localhost]:80", "only for IPv6"),
        ("[::g]:80", "not a valid IPv6"),
        ("[fe80::1%eth0]:80", "zone"),
        ("ho st:80", "letters, digits"),
        ("host/x:80", "letters, digits"),
        ("h\u00e9:80", "letters, digits"),
        ("a" * 254 + ":80", "letters, digits"),
    ],
)
def test_parse_invalid(text, reason):
    with pytest.raises(InvalidAddress) as info:
        PeerAddress.parse(text)
    message = str(info.value)
    assert reason in message
    assert "host:port" in message  # says what to write instead
    assert "\n" not in message
    assert isinstance(info.value, SwarmError)


@pytest.mark.parametrize("value", [None, 80, b"host:80", ("host", 80)])
def test_parse_non_text(value):
    with pytest.raises(InvalidAddress, match="text string"):
        PeerAddress.parse(value)


@pytest.mark.parametrize(
    ("host", "port"),
    [("h", 0), ("h", True), ("h", 8.0), ("h", 70000), ("", 80), (b"h", 80), ("a:b", 80), ("x y", 80)],
)
def test_constructor_validates(host, port):
    with pytest.raises(InvalidAddress):
        PeerAddress(host=host, port=port)


def test_frozen_and_hashable():
    a, b = PeerAddress.parse("[::1]:9"), PeerAddress(host="::1", port=9)
    assert a == b
    assert hash(a) == hash(b)
    assert a.is_ipv6
    with pytest.raises(AttributeError):
        a.port = 10  # type: ignore[misc]


def test_format_sockaddr():
    assert format_sockaddr(("127.0.0.1", 5)) == "127.0.0.1:5"
    assert format_sockaddr(("::1", 5, 0, 0)) == "[::1]:5"


_label = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
_hostnames = st.lists(_label, min_size=1, max_size=4).map(".".join)
_ipv6 = st.ip_addresses(v=6).map(str)


@given(host=st.one_of(_hostnames, _ipv6, st.ip_addresses(v=4).map(str)), port=st.integers(1, 65535))
def test_round_trip(host, port):
    address = PeerAddress(host=host, port=port)
    assert PeerAddress.parse(str(address)) == address


@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_invalid_address(text):
    try:
        address = PeerAddress.parse(text)
    except InvalidAddress:
        return
    assert str(address) == text
