import dataclasses

import pytest

import protocol as M
from protocol import DecodeError, Identity, LimitExceeded, Limits, LocalProtocolError, UnexpectedMessage, cbor_encode
from protocol.errors import BadSignature, ErrorCode

ALICE = Identity.from_seed(b"a" * 32)


def _node(ident=ALICE, addrs=("127.0.0.1:1",)):
    return M.NodeInfo(peer_id=ident.peer_id, public_key=ident.public_key, addrs=addrs)


def test_every_registered_type_is_distinct_and_has_a_kind():
    assert len({cls.TYPE for cls in M.MESSAGE_TYPES.values()}) == len(M.MESSAGE_TYPES)
    for req, resp in M.RESPONSES.items():
        assert (req.KIND, resp.KIND) == ("request", "response")


def test_envelope_layout_is_type_id_body():
    assert M.encode_message(M.Ping(), 5).hex() == "830205a0"
    assert M.encode_message(M.FindNode(target=b"\x01" * 20), 1).hex() == "830401a10054" + "01" * 20
    for bad_id in (-1, True, 2**64, 1.0):
        with pytest.raises(LocalProtocolError):
            M.encode_message(M.Ping(), bad_id)


def test_constructor_validates_and_normalizes():
    assert M.Nodes(nodes=[_node()]).nodes == (_node(),)
    bad = [
        lambda: M.FindNode(target=b"short"),
        lambda: M.OpenSession(model="m", span=(2, 2), max_length=10),
        lambda: M.OpenSession(model="m" * 129, span=(0, 2), max_length=10),
        lambda: M.Error(code=1, message="x", retry_after=float("inf")),
        lambda: M.NodeInfo(peer_id=b"\x00" * 20, public_key=ALICE.public_key, addrs=()),
        lambda: M.Nodes(nodes=[_node()] * 21),
        lambda: M.Store(record="not a record"),
    ]
    for make in bad:
        with pytest.raises(LocalProtocolError):
            make()


def test_decoding_errors_are_typed():
    with pytest.raises(DecodeError):
        M.decode_message(cbor_encode([2, 1]))  # not [type, id, body]
    with pytest.raises(DecodeError):
        M.decode_message(cbor_encode([4, 1, {}]))  # missing field
    with pytest.raises(DecodeError):
        M.decode_message(cbor_encode([4, 1, {0: b"x" * 19}]))  # wrong size
    with pytest.raises(DecodeError):
        M.decode_message(cbor_encode([5, 1, {0: [{0: b"\x00" * 20, 1: ALICE.public_key, 2: []}]}]))  # id != H(key)
    with pytest.raises(UnexpectedMessage) as info:
        M.decode_message(cbor_encode([99, 7, {}]))
    assert info.value.code == ErrorCode.UNKNOWN_MESSAGE
    assert M.decode_envelope(cbor_encode([99, 7, {}])) == (99, 7, {})  # what a receiver answers by
    with pytest.raises(LimitExceeded):
        M.decode_message(M.encode_message(M.Error(code=1, message="x" * 500), 1), limits=Limits(max_message_size=100))


def test_unknown_body_keys_are_ignored():
    assert M.decode_message(cbor_encode([2, 3, {9: "future field"}])) == (3, M.Ping())


def test_signed_record_binds_every_field():
    rec = M.SignedRecord.create(ALICE, key=b"k" * 32, seq=1, expires=100, value=b"v")
    rec.verify_signature()
    assert rec.publisher_id == ALICE.peer_id
    for change in [dict(seq=2), dict(expires=101), dict(value=b"w"), dict(key=b"j" * 32),
                   dict(publisher=Identity.generate().public_key)]:
        with pytest.raises(BadSignature):
            dataclasses.replace(rec, **change).verify_signature()


def test_announcement_bytes_round_trip():
    ann = M.Announcement(peer_id=ALICE.peer_id, addrs=("[::1]:9",), model="m@1", span=(3, 7), throughput=12.0,
                         free_sessions=4, expires=10)
    assert M.Announcement.from_bytes(ann.to_bytes()) == ann
    with pytest.raises(DecodeError):
        M.Announcement.from_bytes(b"\xa0")


def test_receipt_signatures():
    bob = Identity.from_seed(b"b" * 32)
    base = M.ReceiptRecord(client=ALICE.public_key, server=bob.public_key, handshake_hash=b"h" * 32, seq=1, work=9,
                           client_signature=b"\x00" * 64)
    signed = dataclasses.replace(base, client_signature=ALICE.sign(base.statement()))
    signed.verify(require_countersignature=False)
    with pytest.raises(DecodeError):
        signed.verify()
    double = dataclasses.replace(signed, server_signature=bob.sign(signed.statement(countersign=True)))
    double.verify()
    # the client's signature does not verify as a countersignature (domain separation)
    with pytest.raises(BadSignature):
        dataclasses.replace(signed, server_signature=ALICE.sign(signed.statement())).verify()
    with pytest.raises(BadSignature):
        dataclasses.replace(double, work=10).verify()
