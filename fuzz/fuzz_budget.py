"""The strict decoder's item budget and its strictness (spec/SPEC.md sections 2 and 7.5).

Oracles:
- budget: no input of N bytes builds more than the budget allows. Whatever the bytes
  (item-dense ones above all: runs of empty arrays and maps, array heads claiming
  more than is there), ``decode(data, max_items=B)`` either raises the protocol's own
  error or returns a value of at most B items, and the memory it allocates on the
  way is bounded by B objects plus the bytes of the input, never by what a head claims;
- strictness (differential): the decoder accepts exactly what the spec's definition
  accepts, cbor2's decoding followed by the re-encoding check (the reference below),
  and returns the same value;
- messages: a message of any type decodes within its type's budget, and one holding
  more items than that is refused.
"""

from __future__ import annotations

import io
import tracemalloc

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as M
from protocol import DecodeError, LimitExceeded, ProtocolError, cbor_decode, cbor_encode
from protocol._fields import envelope_items

from strategies import STRATEGIES, cbor_values

#: Bytes a decoded item may cost in memory (a list, a dict slot, a small int): generous.
PER_ITEM = 200


def items(obj) -> int:
    if isinstance(obj, list):
        return 1 + sum(items(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(items(k) + items(v) for k, v in obj.items())
    return 1


def reference_decode(data: bytes):
    """The spec's definition of strict decoding: decode, re-encode, compare (what the
    decoder did before it counted items)."""
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream, tag_hook=_no_tags).decode()
        if stream.tell() != len(data):
            return DecodeError
        cbor_encode(obj)  # the subset (raises LocalProtocolError outside it)
        if cbor2.dumps(obj, canonical=True) != data:
            return DecodeError
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, ProtocolError):
        return DecodeError
    return obj


def _no_tags(decoder, tag):
    raise ValueError("tag")


dense_pieces = st.sampled_from([b"\x80", b"\xa0", b"\x81", b"\x82", b"\x00", b"\x40", b"\x60", b"\xa1\x00",
                                b"\x98\xff", b"\x99\x10\x00", b"\x9a\x00\x10\x00\x00", b"\xb9\x01\x00",
                                b"\xf6", b"\xf9\x3c\x00"])
dense = st.lists(dense_pieces, max_size=400).map(b"".join)
structured = cbor_values.map(cbor_encode)
hostile = dense | structured | st.binary(max_size=200) | st.builds(lambda n: b"\x99" + n.to_bytes(2, "big")
                                                                   + b"\x80" * n, st.integers(0, 3000))


@settings(max_examples=300)
@given(hostile, st.integers(1, 2000))
def test_no_input_builds_more_than_its_budget(data, budget):
    tracemalloc.start()
    try:
        try:
            obj = cbor_decode(data, max_size=len(data) + 1, max_items=budget)
        except (DecodeError, LimitExceeded):
            obj = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if obj is not None:
        assert items(obj) <= budget
    assert peak <= PER_ITEM * budget + 2 * len(data) + 16_384


@settings(max_examples=300)
@given(hostile)
def test_the_decoder_accepts_exactly_what_the_reference_accepts(data):
    expected = reference_decode(data)
    try:
        got = cbor_decode(data, max_size=len(data) + 1)
    except DecodeError:
        assert expected is DecodeError, data.hex()
        return
    assert expected is not DecodeError, data.hex()
    assert got == expected
    assert type(got) is type(expected)
    assert cbor_encode(got) == data


@settings(max_examples=200)
@given(st.data())
def test_every_message_decodes_within_its_budget_and_one_item_more_does_not(data):
    cls = data.draw(st.sampled_from(list(STRATEGIES)))
    message = data.draw(STRATEGIES[cls])
    wire = M.encode_message(message, 1)
    budget = envelope_items(cls.FIELDS, M.DEFAULT_LIMITS)
    assert items(cbor_decode(wire, max_size=len(wire))) <= budget
    assert M.decode_message(wire) == (1, message)
    # an unknown body key holding just enough empty arrays to pass the budget by one
    body = cbor_decode(wire, max_size=len(wire))[2]
    filler = budget - items([cls.TYPE, 1, body]) - 1  # the key itself counts one
    if filler >= 1:
        padded = cbor_encode([cls.TYPE, 1, {**body, 23: [[]] * (filler - 1)}])
        assert M.decode_message(padded)[1] == message
        over = cbor_encode([cls.TYPE, 1, {**body, 23: [[]] * filler}])
        try:
            M.decode_message(over)
        except LimitExceeded:
            pass
        else:
            raise AssertionError(f"{cls.__name__} with {budget + 1} items decoded")
