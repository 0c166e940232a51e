"""The request multiplexer, sans-IO: ids, matching, response types, limits, unknown types
(spec/SPEC.md section 6, "Connections and requests")."""

import pytest

from protocol import (
    Channel,
    DecodeError,
    Error,
    FindNode,
    LimitExceeded,
    Limits,
    LocalProtocolError,
    Nodes,
    Ping,
    Pong,
    RemoteError,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    Stored,
    UnexpectedMessage,
    cbor_encode,
    decode_message,
    encode_message,
    error_for,
)
from protocol.errors import ErrorCode


def test_requests_are_numbered_per_channel_and_responses_matched_by_id():
    channel = Channel()
    first = channel.send_request(Ping(), "first")
    second = channel.send_request(FindNode(target=bytes(20)), "second")
    assert (first[0], second[0]) == (1, 2) and decode_message(first[1]) == (1, Ping())
    assert channel.outstanding == channel.awaited == 2 and channel.next_id == 3
    # answered out of order
    event = channel.receive(encode_message(Nodes(nodes=()), 2))
    assert event == ResponseReceived(2, "second", response=Nodes(nodes=()))
    assert channel.receive(encode_message(Pong(), 1)) == ResponseReceived(1, "first", response=Pong())
    assert channel.outstanding == 0
    assert channel.receive(encode_message(Pong(), 1)) is None  # nothing outstanding with that id: ignored


def test_a_response_of_the_wrong_type_or_error_fails_the_request():
    channel = Channel()
    for _ in range(3):
        channel.send_request(Ping(), "token")
    wrong = channel.receive(encode_message(Stored(), 1))
    assert isinstance(wrong.error, UnexpectedMessage) and "answered Ping with Stored" in str(wrong.error)
    error = channel.receive(encode_message(Error(code=202, message="busy", retry_after=1.5), 2))
    assert isinstance(error.error, RemoteError) and (error.error.code, error.error.retry_after) == (202, 1.5)
    unknown = channel.receive(cbor_encode([99, 3, {}]))  # odd: a response of a type from the future
    assert isinstance(unknown.error, UnexpectedMessage) and unknown.error.code == ErrorCode.UNKNOWN_MESSAGE
    assert channel.outstanding == 0


def test_an_abandoned_request_keeps_its_slot_until_answered():
    channel = Channel(limits=Limits(max_concurrent_requests=1))
    request_id, _ = channel.send_request(Ping(), "waiter")
    channel.abandon(request_id)
    assert channel.outstanding == 1 and channel.awaited == 0 and not channel.can_request
    with pytest.raises(LocalProtocolError):
        channel.send_request(Ping(), "another")  # the peer still counts it
    assert channel.receive(encode_message(Pong(), request_id)) == ResponseReceived(request_id, None, response=Pong())
    assert channel.can_request


def test_requests_received_are_counted_against_the_limit():
    channel = Channel(limits=Limits(max_concurrent_requests=2))
    for request_id in (5, 6):
        event = channel.receive(encode_message(Ping(), request_id))
        assert event == RequestReceived(request_id, Ping())
    assert channel.incoming == 2
    with pytest.raises(LimitExceeded):
        channel.receive(encode_message(Ping(), 7))
    payload, problem = channel.answer(RequestReceived(5, Ping()), Pong())
    assert decode_message(payload) == (5, Pong()) and problem is None
    channel.answered()
    assert channel.incoming == 1
    assert isinstance(channel.receive(encode_message(Ping(), 7)), RequestReceived)


def test_unknown_and_unserved_request_types_are_refused_with_unknown_message():
    channel = Channel(serves=lambda request_type: request_type is Ping)
    refused = channel.receive(cbor_encode([98, 4, {0: "from a later version"}]))
    assert isinstance(refused, RequestRefused) and refused.request_id == 4
    request_id, error = decode_message(refused.payload)
    assert request_id == 4 and error.code == ErrorCode.UNKNOWN_MESSAGE and "98" in error.message
    unserved = channel.receive(encode_message(FindNode(target=bytes(20)), 5))
    assert "FindNode is not served" in decode_message(unserved.payload)[1].message
    assert channel.incoming == 2  # answered once written, like any request


def test_answers_map_exceptions_and_refuse_wrong_or_oversized_responses():
    channel = Channel(limits=Limits(max_message_size=200))
    request = RequestReceived(9, FindNode(target=bytes(20)))
    busy = RemoteError("downstream is busy", code=ErrorCode.BUSY, retry_after=2.0)
    assert decode_message(channel.answer(request, busy)[0]) == (9, Error(code=202, message="downstream is busy",
                                                                          retry_after=2.0))
    payload, problem = channel.answer(request, ValueError("secret internals"))
    assert decode_message(payload)[1] == Error(code=int(ErrorCode.INTERNAL), message="internal error")
    assert problem is None
    payload, problem = channel.answer(request, Stored())
    assert decode_message(payload)[1].code == ErrorCode.INTERNAL and "returned Stored" in problem
    payload, problem = channel.answer(request, Error(code=1, message="x" * 300))
    assert decode_message(payload)[1].code == ErrorCode.INTERNAL and "exceeds" in problem


def test_malformed_messages_end_the_connection():
    channel = Channel()
    channel.send_request(Ping(), "token")
    with pytest.raises(DecodeError):
        channel.receive(cbor_encode([2, 1]))
    with pytest.raises(DecodeError):
        channel.receive(cbor_encode([5, 1, {0: "not a list"}]))  # a known response type that does not decode


def test_close_hands_back_the_awaited_tokens():
    channel = Channel()
    channel.send_request(Ping(), "kept")
    abandoned, _ = channel.send_request(Ping(), "gone")
    channel.abandon(abandoned)
    assert channel.close() == ["kept"] and channel.outstanding == 0
    with pytest.raises(LocalProtocolError):
        channel.send_request(Ping(), "late")


def test_error_for_keeps_codes_and_clamps_what_does_not_fit():
    assert error_for(RemoteError("x", code=70000)).code == ErrorCode.INTERNAL
    assert len(error_for(RemoteError("é" * 1000, code=200)).message.encode()) <= 1024
    assert error_for(RemoteError("x", code=202, retry_after=float("nan"))).retry_after is None


# -- the error rule (section 14) and connection-level errors (section 6) -------------------


def test_request_ids_never_use_0_even_after_wrapping():
    channel = Channel()
    channel._next_id = 2**64 - 1  # the last id, then the space wraps to 1, never 0
    assert channel.send_request(Ping(), "last")[0] == 2**64 - 1
    assert channel.next_id == 1
    with pytest.raises(LocalProtocolError):
        encode_message(Ping(), 0)


@pytest.mark.parametrize("message", [Ping(), Pong(), FindNode(target=bytes(20)), Stored()])
def test_anything_but_error_with_id_0_is_malformed(message):
    with pytest.raises(DecodeError, match="id 0"):
        Channel().receive(cbor_encode([message.TYPE, 0, message.to_cbor()]))


def test_a_connection_level_error_ends_the_channel_and_says_why():
    from protocol import ConnectionAborted

    channel = Channel()
    channel.send_request(Ping(), "waiting")  # id 1: the notice is not its answer
    with pytest.raises(ConnectionAborted, match="MALFORMED") as info:
        channel.receive(encode_message(Error(code=100, message="a message is the array [type, id, body]"), 0))
    assert info.value.code == ErrorCode.MALFORMED
    assert channel.outstanding == 1  # the caller closes, which fails it


def test_abort_payload_only_for_codes_that_end_the_connection_and_can_be_told():
    channel = Channel()
    notice = channel.abort_payload(DecodeError("bad bytes"))
    assert decode_message(notice) == (0, Error(code=100, message="bad bytes"))
    assert decode_message(channel.abort_payload(LimitExceeded("too many")))[1].code == ErrorCode.LIMIT_EXCEEDED
    from protocol import ConnectionAborted, ConnectionClosed, HandshakeError

    for exc in (HandshakeError("x"), ConnectionClosed("x"), ConnectionAborted("x", code=100), UnexpectedMessage("x"),
                RemoteError("x", code=202), ValueError("x")):
        assert channel.abort_payload(exc) is None, exc


def test_handlers_never_answer_with_a_code_that_ends_connections():
    # A nested value that does not decode inside a request that did: the request's fault.
    assert error_for(DecodeError("the record value is not CBOR")).code == ErrorCode.INVALID_REQUEST
    assert error_for(LimitExceeded("a nested tensor")).code == ErrorCode.INVALID_REQUEST
    assert error_for(LocalProtocolError("our own misuse")).code == ErrorCode.INTERNAL
    from protocol import BadSignature

    assert error_for(BadSignature("forged")).code == ErrorCode.BAD_SIGNATURE  # answered, connection kept
    assert error_for(UnexpectedMessage("step 3, expected 2")).code == ErrorCode.BAD_STATE
    # retry_after only where the rule allows it
    assert error_for(RemoteError("x", code=ErrorCode.SHUTTING_DOWN, retry_after=3.0)).retry_after == 3.0
    assert error_for(RemoteError("x", code=ErrorCode.INVALID_REQUEST, retry_after=3.0)).retry_after is None


def test_unknown_codes_fail_the_request_only():
    from protocol import ERROR_RULES, rule_of

    assert rule_of(150) == ERROR_RULES[ErrorCode.INVALID_REQUEST] and not rule_of(150).ends_connection
    assert rule_of(299) == ERROR_RULES[ErrorCode.INVALID_REQUEST]
    assert rule_of(777) == ERROR_RULES[ErrorCode.INTERNAL]
    channel = Channel()
    channel.send_request(Ping(), "asked")
    event = channel.receive(encode_message(Error(code=150, message="from a newer peer"), 1))
    assert isinstance(event.error, RemoteError) and event.error.code == 150
