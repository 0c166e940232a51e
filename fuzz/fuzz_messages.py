"""Message codec conformance: round trips, and the decoder oracle (h11's): arbitrary
bytes give a message or a ProtocolError, never another exception, never more
allocation than the limits allow."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as M
from protocol import Limits, ProtocolError, cbor_decode, cbor_encode

from strategies import STRATEGIES, cbor_values, messages, request_ids

SMALL = Limits(max_message_size=4096, max_tensor_elements=64)


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_round_trip_every_message_type(cls):
    @settings(max_examples=40)
    @given(STRATEGIES[cls], request_ids)
    def check(msg, request_id):
        wire = M.encode_message(msg, request_id)
        assert M.decode_message(wire) == (request_id, msg)
        decoded_id, decoded = M.decode_message(wire)
        assert M.encode_message(decoded, decoded_id) == wire

    check()


def _oracle(data: bytes, limits: Limits = SMALL) -> None:
    try:
        _, msg = M.decode_message(data, limits=limits)
    except ProtocolError:
        return
    assert isinstance(msg, M.Message)
    assert len(data) <= limits.max_message_size
    # strict: only canonical bytes decode (the message may drop unknown body keys)
    assert cbor_encode(cbor_decode(data, max_size=len(data))) == data


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    _oracle(data)


@given(st.integers(0, 30), st.integers(0, 2**64 - 1), cbor_values)
def test_arbitrary_bodies(type_, id_, body):
    _oracle(cbor_encode([type_, id_, body]))


@given(messages, request_ids, st.data())
def test_mutated_valid_messages(msg, request_id, data):
    wire = bytearray(M.encode_message(msg, request_id))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    _oracle(bytes(wire[:cut]), Limits())
    _oracle(bytes(wire), Limits())


@given(st.integers(65, 2**40), st.sampled_from(["f32", "f16", "bf16", "q8", "nf4"]))
def test_tensor_claims_over_the_limit_fail_before_allocating(numel, dtype):
    body = {0: bytes(16), 1: 0, 2: 0, 3: {0: dtype, 1: [1, numel], 2: b""}, 4: bytes(64)}
    with pytest.raises(ProtocolError):
        M.decode_message(cbor_encode([12, 1, body]), limits=SMALL)


def _fold(digests):
    from protocol._statements import EMPTY_HISTORY, extend_history

    history = EMPTY_HISTORY
    for digest in digests:
        history = extend_history(history, digest)
    return history


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=6), st.data())
def test_the_signed_history_binds_every_input(digests, data):
    from protocol._statements import forward_result_statement

    i = data.draw(st.integers(0, len(digests) - 1))
    changed = list(digests)
    changed[i] = bytes([changed[i][0] ^ 1]) + changed[i][1:]
    assert _fold(changed) != _fold(digests)
    statement = forward_result_statement(server=b"s" * 20, session=b"x" * 16, step=len(digests) - 1, model="m@0",
                                         span=(0, 2), input_digest=digests[-1], output_digest=bytes(32),
                                         history=_fold(digests))
    assert cbor_decode(statement, max_size=len(statement))[-1] == _fold(digests)  # canonical, history last


@given(st.integers(0, 30), st.integers(0, 3), cbor_values)
def test_the_channel_turns_any_message_into_an_event_or_a_protocol_error(type_, id_, body):
    from protocol import Channel, ChannelEvent, Ping

    channel = Channel(limits=SMALL)
    channel.send_request(Ping(), "token")  # id 1 is outstanding: responses to it are matched
    try:
        event = channel.receive(cbor_encode([type_, id_, body]))
    except ProtocolError:
        return
    assert event is None or isinstance(event, ChannelEvent)
    assert channel.outstanding + channel.incoming in (1, 0, 2)


@given(messages)
def test_id_0_is_only_a_connection_level_error(msg):
    # Spec section 6: request ids start at 1; id 0 marks an ERROR about the connection.
    wire = cbor_encode([msg.TYPE, 0, msg.to_cbor()])
    if type(msg) is M.Error:
        assert M.decode_message(wire) == (0, msg)
    else:
        with pytest.raises(M.DecodeError):
            M.decode_message(wire)


@given(st.integers(0, 600), st.text(max_size=40))
def test_a_connection_level_error_ends_the_channel_with_its_code(code, text):
    from protocol import Channel, ConnectionAborted, Ping

    channel = Channel(limits=SMALL)
    channel.send_request(Ping(), "token")
    try:
        notice = M.encode_message(M.Error(code=code, message=text[:100]), 0)
    except ProtocolError:
        return  # text that is not valid UTF-8
    with pytest.raises(ConnectionAborted) as info:
        channel.receive(notice)
    assert info.value.code == code
