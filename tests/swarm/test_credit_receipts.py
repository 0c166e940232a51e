"""The receipt flow between a client's wallet and a server's desk, messages included."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from protocol import Identity, Receipt, ReceiptAck, decode_message, encode_message
from protocol.errors import BadSignature
from swarm.credit import InvalidReceipt, Ledger, ReceiptDesk, ReceiptWallet, StaleReceipt, make_receipt

HH1 = b"\x01" * 32
HH2 = b"\x02" * 32


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(32, "big"))


SERVER, CLIENT, OTHER = ident(1), ident(2), ident(3)


def pair(tmp_path: Path | None = None) -> tuple[ReceiptWallet, ReceiptDesk]:
    c_path = tmp_path / "client.cbor" if tmp_path else None
    s_path = tmp_path / "server.cbor" if tmp_path else None
    wallet = ReceiptWallet(CLIENT, Ledger.open(c_path, CLIENT.public_key) if c_path else Ledger(CLIENT.public_key))
    desk = ReceiptDesk(SERVER, Ledger.open(s_path, SERVER.public_key) if s_path else Ledger(SERVER.public_key),
                       grace_units=100)
    return wallet, desk


def step(wallet: ReceiptWallet, desk: ReceiptDesk, units: int, hh: bytes = HH1):
    """One served step and its receipt round trip, through the wire encoding."""
    desk.served(CLIENT.public_key, units)
    wallet.received(SERVER.public_key, units)
    _, request = decode_message(encode_message(Receipt(receipt=wallet.issue(SERVER.public_key, hh)), 1))
    ack = ReceiptAck(receipt=desk.accept(request.receipt, handshake_hash=hh))
    record = decode_message(encode_message(ack, 1))[1].receipt
    assert wallet.acknowledged(record)
    return record


def test_steps_accumulate_and_both_sides_store_the_same_record() -> None:
    wallet, desk = pair()
    for units in (24, 24, 48):
        record = step(wallet, desk, units)
    assert (record.seq, record.work) == (3, 96)
    record.verify(require_countersignature=True)
    assert desk.ledger.latest(CLIENT.public_key, SERVER.public_key) == record
    assert wallet.ledger.latest(CLIENT.public_key, SERVER.public_key) == record
    assert desk.ledger.given() == (record,) and wallet.ledger.received() == (record,)
    assert desk.unreceipted(CLIENT.public_key) == 0 and wallet.pending(SERVER.public_key) == 0
    # Serving earns the server credit at the client.
    assert wallet.ledger.credit(SERVER.public_key).direct == 96


def test_overclaim_is_rejected() -> None:
    wallet, desk = pair()
    desk.served(CLIENT.public_key, 10)
    greedy = make_receipt(CLIENT, SERVER.public_key, HH1, 1, 11)
    with pytest.raises(InvalidReceipt, match="claims 11"):
        desk.accept(greedy, handshake_hash=HH1)
    assert desk.ledger.latest(CLIENT.public_key, SERVER.public_key) is None


def test_receipt_for_another_connection_or_server_is_rejected() -> None:
    wallet, desk = pair()
    desk.served(CLIENT.public_key, 10)
    with pytest.raises(InvalidReceipt, match="another connection"):
        desk.accept(make_receipt(CLIENT, SERVER.public_key, HH2, 1, 10), handshake_hash=HH1)
    with pytest.raises(InvalidReceipt, match="another server"):
        desk.accept(make_receipt(CLIENT, OTHER.public_key, HH1, 1, 10), handshake_hash=HH1)


def test_replayed_and_forged_receipts_are_rejected() -> None:
    wallet, desk = pair()
    step(wallet, desk, 10)
    desk.served(CLIENT.public_key, 10)
    same = make_receipt(CLIENT, SERVER.public_key, HH1, 1, 10)  # the same receipt again: its ACK was lost
    assert desk.accept(same, handshake_hash=HH2) == desk.ledger.latest(CLIENT.public_key, SERVER.public_key)
    old = make_receipt(CLIENT, SERVER.public_key, HH1, 1, 9)  # seq 1 again, other work
    with pytest.raises(StaleReceipt):
        desk.accept(old, handshake_hash=HH1)
    forged = replace(make_receipt(CLIENT, SERVER.public_key, HH1, 2, 15), work=20)
    with pytest.raises(BadSignature):
        desk.accept(forged, handshake_hash=HH1)
    impostor = make_receipt(OTHER, SERVER.public_key, HH1, 2, 20)
    with pytest.raises(BadSignature):
        desk.accept(replace(impostor, client=CLIENT.public_key), handshake_hash=HH1)
    assert desk.ledger.latest(CLIENT.public_key, SERVER.public_key).work == 10


def test_client_that_stops_receipting_becomes_delinquent_after_grace() -> None:
    wallet, desk = pair()
    step(wallet, desk, 60)
    desk.served(CLIENT.public_key, 60)  # one step in flight: within the grace
    assert desk.unreceipted(CLIENT.public_key) == 60 and not desk.delinquent(CLIENT.public_key)
    desk.served(CLIENT.public_key, 60)
    assert desk.delinquent(CLIENT.public_key)
    wallet.received(SERVER.public_key, 120)
    record = desk.accept(wallet.issue(SERVER.public_key, HH1), handshake_hash=HH1)
    wallet.acknowledged(record)
    assert not desk.delinquent(CLIENT.public_key)
    assert not desk.delinquent(OTHER.public_key)


def test_counters_carry_across_connections() -> None:
    wallet, desk = pair()
    step(wallet, desk, 10, HH1)
    desk.served(CLIENT.public_key, 5)  # served, but the connection died before the receipt
    wallet.received(SERVER.public_key, 5)
    record = step(wallet, desk, 7, HH2)
    assert (record.seq, record.work, record.handshake_hash) == (2, 22, HH2)


def test_lost_ack_is_harmless_and_late_ack_ignored() -> None:
    wallet, desk = pair()
    desk.served(CLIENT.public_key, 10)
    wallet.received(SERVER.public_key, 10)
    first = desk.accept(wallet.issue(SERVER.public_key, HH1), handshake_hash=HH1)  # ack lost
    record = step(wallet, desk, 5)
    assert (record.seq, record.work) == (2, 15)
    assert not wallet.acknowledged(first)  # arrives late: ignored


def test_restarts_keep_counting_and_resync_recovers_lost_server_state(tmp_path: Path) -> None:
    wallet, desk = pair(tmp_path)
    step(wallet, desk, 10)
    desk.ledger.save()
    step(wallet, desk, 10)  # acknowledged, but the server crashes before saving it
    wallet.ledger.save()

    wallet, desk = pair(tmp_path)  # both restart from their files
    assert desk.ledger.latest(CLIENT.public_key, SERVER.public_key).work == 10
    desk.served(CLIENT.public_key, 5)
    wallet.received(SERVER.public_key, 5)
    with pytest.raises(InvalidReceipt):  # claims 25, the server only knows of 15
        desk.accept(wallet.issue(SERVER.public_key, HH2), handshake_hash=HH2)
    resend = wallet.rebase(SERVER.public_key)
    assert resend.work == 20
    assert desk.accept(resend, handshake_hash=HH2) == resend  # adopted: the server's own countersignature
    record = step(wallet, desk, 3, HH2)
    assert record.work == 23 and record.seq > resend.seq


def test_client_with_older_file_catches_up_from_credit_report(tmp_path: Path) -> None:
    wallet, desk = pair(tmp_path)
    step(wallet, desk, 10)
    wallet.ledger.save()
    step(wallet, desk, 10)  # the client crashes before saving this one
    wallet, _ = pair(tmp_path)
    desk.served(CLIENT.public_key, 4)
    wallet.received(SERVER.public_key, 4)
    with pytest.raises(StaleReceipt):
        desk.accept(wallet.issue(SERVER.public_key, HH2), handshake_hash=HH2)
    wallet.ledger.merge_remote(desk.ledger.records_for_exchange())  # CREDIT_QUERY / CREDIT_REPORT
    record = step(wallet, desk, 1, HH2)
    assert record.work == 21  # the 4 units of the refused receipt are forgone, not double counted


def test_resync_cannot_smuggle_a_forged_countersignature() -> None:
    wallet, desk = pair()
    fake = replace(make_receipt(CLIENT, SERVER.public_key, HH1, 9, 10**6), server_signature=bytes(64))
    with pytest.raises(BadSignature):
        desk.accept(fake, handshake_hash=HH1)
    assert not desk.delinquent(CLIENT.public_key) and desk.unreceipted(CLIENT.public_key) == 0
