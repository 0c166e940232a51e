"""What a message can cost a receiver, bounded before it is paid (spec/SPEC.md section
2, section 6 "Application messages", section 7.5): the strict decoder's item budget,
the size cap of each message type read from the envelope head, and the channel's caps
per connection and per outstanding request."""

import struct

import pytest

from protocol import (
    UNSERVED_CAP,
    Channel,
    DecodeError,
    Error,
    FindNode,
    Forward,
    ForwardOnce,
    ForwardResult,
    LimitExceeded,
    Limits,
    MESSAGE_TYPES,
    Nodes,
    Ping,
    Pong,
    WireTensor,
    cbor_decode,
    cbor_encode,
    decode_message,
    encode_message,
    response_cap,
    type_cap,
)
from protocol._cbor import envelope_head
from protocol._fields import EXTENSION_ITEMS, envelope_items
from protocol._noise import CipherState
from protocol._transport import MessageDecoder, MessageEncoder

ATTACK_ITEMS = 1 << 16  # the attack had 16 Mi; the head alone decides either way


def empty_arrays(n: int) -> bytes:
    """A CBOR array of ``n`` empty arrays: n + 9 bytes that cbor2 would turn into n lists."""
    return b"\x9a" + n.to_bytes(4, "big") + b"\x80" * n


def test_an_array_head_over_the_budget_is_refused_before_any_item_is_built():
    data = empty_arrays(ATTACK_ITEMS)
    with pytest.raises(LimitExceeded, match="budget"):
        cbor_decode(data, max_size=len(data), max_items=1000)
    assert len(cbor_decode(data, max_size=len(data))) == ATTACK_ITEMS  # no budget: the old behaviour


@pytest.mark.parametrize(("obj", "items"), [
    (0, 1), (b"x" * 100, 1), ([], 1), ([1, 2], 3), ({0: 1, 1: [2, 3]}, 7), ([[[]]], 3), ({"a": None}, 3),
])
def test_every_item_counts_and_a_budget_one_short_fails(obj, items):
    data = cbor_encode(obj)
    assert cbor_decode(data, max_size=100_000, max_items=items) == obj
    with pytest.raises(LimitExceeded):
        cbor_decode(data, max_size=100_000, max_items=items - 1)


def test_lengths_beyond_the_bytes_left_are_decode_errors_not_budget_errors():
    for data in (b"\x9a\x00\x01\x00\x00\x80", b"\xba\x00\x01\x00\x00\x00\x00", b"\x5a\x00\x01\x00\x00\x00"):
        with pytest.raises(DecodeError):
            cbor_decode(data, max_size=100, max_items=10)


def test_envelope_head_reads_type_and_id_from_the_first_bytes():
    payload = encode_message(FindNode(target=bytes(20)), 2**40)
    assert envelope_head(payload[:19]) == (FindNode.TYPE, 2**40)
    assert envelope_head(payload[:3]) is None  # the id's head is cut
    assert envelope_head(b"") is None
    for bad in (b"\x82\x02\x01", b"\x83\x40", b"\x83\x18\x02\x01", b"\x83\x02\x1f"):
        with pytest.raises(DecodeError):
            envelope_head(bad)


def test_each_type_has_an_item_budget_from_its_field_table():
    limits = Limits()
    for cls in MESSAGE_TYPES.values():
        budget = envelope_items(cls.FIELDS, limits)
        assert EXTENSION_ITEMS < budget < 100_000, cls
    # a PING holding an unknown key whose value is a big array: over its budget
    ping = cbor_encode([Ping.TYPE, 1, {9: [[]] * 2000}])
    with pytest.raises(LimitExceeded):
        decode_message(ping)
    assert decode_message(cbor_encode([Ping.TYPE, 1, {9: [[]] * 100}])) == (1, Ping())  # within the allowance


def test_the_attack_message_is_refused_at_its_head_by_the_whole_decoder():
    attack = b"\x83\x02\x01" + empty_arrays(ATTACK_ITEMS)  # [PING, 1, [[], [], ...]]
    with pytest.raises(LimitExceeded):
        decode_message(attack)


def cipher_pair(limits, cap=None):
    return MessageEncoder(CipherState(bytes(32)), limits), MessageDecoder(CipherState(bytes(32)), limits, cap)


def test_the_decoder_refuses_a_message_over_its_type_cap_from_the_envelope_head():
    caps = {Ping.TYPE: 100}
    encoder, decoder = cipher_pair(Limits(), cap=lambda type_, id_: caps.get(type_, 1 << 30))
    big = encode_message(Ping(), 7)[:-1] + b"\xa1\x09\x59\x10\x00" + bytes(4096)  # PING with a 4 KiB extension
    wire = encoder.encode(big)
    assert struct.unpack(">H", wire[:2])[0] == len(wire) - 2  # one Noise message
    # the cap is checked from the message's first 19 bytes, before the rest is buffered
    with pytest.raises(LimitExceeded, match="type 2 declaring"):
        decoder.feed_frame(wire[2:])
    assert decoder.buffered == 0


def test_the_cap_is_checked_when_the_head_arrives_split_across_noise_messages():
    seen = []
    encoder, decoder = cipher_pair(Limits(), cap=lambda type_, id_: (seen.append((type_, id_)), 50)[1])
    payload = encode_message(FindNode(target=bytes(20)), 3) + b""  # 26 bytes: under its cap of 50
    cipher = CipherState(bytes(32))
    for piece in (struct.pack(">I", len(payload)) + payload[:5], payload[5:12], payload[12:]):
        decoder.feed_frame(cipher.encrypt_with_ad(b"", piece))
    assert decoder.next_message() == payload
    assert seen == [(FindNode.TYPE, 3)]
    decoder.feed_frame(cipher.encrypt_with_ad(b"", struct.pack(">I", 60) + payload[:2]))
    with pytest.raises(LimitExceeded):  # declaring 60 bytes, with the head in the second piece
        decoder.feed_frame(cipher.encrypt_with_ad(b"", payload[2:20]))


def test_messages_shorter_than_a_head_and_no_cap_pass_as_before():
    encoder, decoder = cipher_pair(Limits(), cap=lambda type_, id_: 1)
    short = encode_message(Ping(), 1)
    for content in [encoder.encode(short)[2:]]:
        decoder.feed_frame(content)
    assert decoder.next_message() == short
    other, plain = cipher_pair(Limits())
    plain.feed_frame(other.encode(b"anything at all, not CBOR" * 10)[2:])
    assert plain.next_message() == b"anything at all, not CBOR" * 10


def tensor(n_tokens, hidden=64):
    return WireTensor(dtype="f32", shape=(1, n_tokens, hidden), data=bytes(4 * n_tokens * hidden))


def test_channel_caps_for_requests_served_unserved_and_raised_per_connection():
    limits = Limits()
    host_caps = {Forward: 10_000}
    channel = Channel(limits=limits, serves=lambda t: t is not ForwardOnce, caps=host_caps.get)
    assert channel.message_cap(Ping.TYPE, 1) == type_cap(Ping, limits) < 8192
    assert channel.message_cap(ForwardOnce.TYPE, 1) == UNSERVED_CAP  # not served: answered from its head
    assert channel.message_cap(98, 1) == UNSERVED_CAP  # unknown request type
    assert channel.message_cap(Forward.TYPE, 1) == 10_000
    channel.allow(Forward, 50_000)
    assert channel.message_cap(Forward.TYPE, 1) == 50_000
    channel.allow(Forward, 20_000)  # allow only raises
    assert channel.message_cap(Forward.TYPE, 1) == 50_000


def test_a_response_is_capped_by_what_its_request_called_for():
    limits = Limits()
    channel = Channel(limits=limits)
    request = Forward(session=bytes(16), step=0, position=0, hidden=tensor(3), signature=bytes(64))
    request_id, _ = channel.send_request(request, "waiter")
    cap = channel.message_cap(ForwardResult.TYPE, request_id)
    assert cap == response_cap(request, limits)
    answer = ForwardResult(session=bytes(16), step=0, hidden=tensor(3), signature=bytes(64))
    assert len(encode_message(answer, request_id)) <= cap < len(encode_message(answer, request_id)) + 8192
    assert channel.message_cap(ForwardResult.TYPE, request_id + 1) == UNSERVED_CAP  # answers nothing
    assert channel.message_cap(Error.TYPE, 12345) == type_cap(Error, limits)
    ping_id, _ = channel.send_request(Ping(), "waiter")
    assert channel.message_cap(Pong.TYPE, ping_id) == type_cap(Pong, limits)
    nodes_id, _ = channel.send_request(FindNode(target=bytes(20)), "waiter")
    assert channel.message_cap(Nodes.TYPE, nodes_id) == type_cap(Nodes, limits) < 20_000
