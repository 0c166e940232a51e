"""Block announcements (spec section 10, "Block announcements"): every valid
announcement, next_pings included, round-trips through its block value bit-exactly;
hostile announcement maps give an ``Announcement`` or the protocol's own error, never
another exception; what decodes is canonical and keeps next_pings sorted and unique."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as M
from protocol import ProtocolError, SwarmError, cbor_decode, cbor_encode
from swarm.announce import decode_block_value, encode_block_value

from strategies import IDENTITIES, cbor_values, for_codec

PEER_IDS = st.binary(min_size=20, max_size=20)


@st.composite
def next_pings(draw):
    ids = draw(st.lists(PEER_IDS, max_size=M.MAX_NEXT_PINGS, unique=True))
    rtts = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(ids), max_size=len(ids)))
    return tuple(M.NextPing(peer_id=p, rtt=r) for p, r in sorted(zip(ids, rtts)))


@st.composite
def announcements(draw):
    ident = draw(st.sampled_from(IDENTITIES))
    start = draw(st.integers(0, 30))
    end = draw(st.integers(start + 1, 32))
    return M.Announcement(peer_id=ident.peer_id, addrs=draw(for_codec(M.Announcement.FIELDS[1].codec)),
                          model=draw(st.sampled_from(["m", "tiny-llama@00112233"])), span=(start, end),
                          throughput=draw(st.floats(0, 1e300, allow_nan=False)),
                          free_sessions=draw(st.integers(0, 2**32)), expires=draw(st.integers(0, 2**40)),
                          next_pings=draw(st.none() | next_pings()))


@settings(max_examples=60)
@given(announcements(), st.data())
def test_block_values_round_trip(ann, data):
    block = data.draw(st.integers(ann.span[0], ann.span[1] - 1))
    value = encode_block_value(block, ann)
    assert decode_block_value(cbor_decode(value, max_size=len(value))) == (block, ann)
    assert M.Announcement.from_bytes(ann.to_bytes()) == ann


def _oracle(body) -> None:
    try:
        _, ann = decode_block_value(["swarm/1/block", 0, body])
    except (ProtocolError, SwarmError):
        return
    assert isinstance(ann, M.Announcement)
    ids = [p.peer_id for p in ann.next_pings or ()]
    assert ids == sorted(set(ids))
    assert len(ids) <= M.MAX_NEXT_PINGS
    assert cbor_encode(ann.to_cbor()) == cbor_encode(cbor_decode(cbor_encode(ann.to_cbor()), max_size=1 << 16))


@given(announcements(), st.lists(st.tuples(st.integers(0, 1), cbor_values), max_size=8))
def test_hostile_next_pings(ann, entries):
    """Key 7 of any shape: decoded strictly or refused with a protocol error."""
    body = ann.to_cbor()
    body[7] = [{k: v} for k, v in entries]
    _oracle(body)
    body[7] = entries
    _oracle(body)


@given(st.dictionaries(st.integers(0, 23), cbor_values, max_size=10))
def test_arbitrary_announcement_maps(body):
    _oracle(body)
