"""The ledger: verification, replay rejection, exchange and persistence across restarts."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from protocol import CreditReport, Identity, decode_message, encode_message
from protocol.errors import BadSignature, DecodeError, ErrorCode, RemoteProtocolError
from swarm.credit import (
    LEDGER_FORMAT,
    Ledger,
    LedgerError,
    StaleReceipt,
    countersign,
    make_receipt,
)

HH = bytes(range(32))


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(32, "big"))


S, C, X, Y = ident(1), ident(2), ident(3), ident(4)


def rec(client: Identity, server: Identity, seq: int, work: int):
    return countersign(server, make_receipt(client, server.public_key, HH, seq, work))


def test_store_keeps_latest_and_tracks_given_received() -> None:
    ledger = Ledger(S.public_key)
    assert ledger.store(rec(C, S, 1, 10))  # S did work for C: given
    assert ledger.store(rec(S, X, 1, 7))  # X did work for S: received
    assert ledger.store(rec(C, S, 2, 25))
    assert not ledger.store(rec(C, S, 2, 25))  # the very same record: idempotent
    assert [r.work for r in ledger.given()] == [25]
    assert [r.work for r in ledger.received()] == [7]
    assert ledger.latest(C.public_key, S.public_key).seq == 2
    assert ledger.credit(X.public_key).direct == 7
    assert ledger.credit_of_peer(X.peer_id).direct == 7
    assert ledger.credit_of_peer(Y.peer_id).total == 0


def test_replay_and_decreasing_work_are_stale() -> None:
    ledger = Ledger(S.public_key)
    ledger.store(rec(C, S, 5, 100))
    with pytest.raises(StaleReceipt) as info:
        ledger.store(rec(C, S, 4, 200))  # an older seq, even with more work
    assert info.value.code == ErrorCode.STALE_RECORD
    with pytest.raises(StaleReceipt):
        ledger.store(rec(C, S, 5, 101))  # same seq, different record
    with pytest.raises(StaleReceipt):
        ledger.store(rec(C, S, 6, 99))  # work never decreases
    assert ledger.latest(C.public_key, S.public_key).work == 100


def test_forged_and_unsigned_records_are_rejected() -> None:
    ledger = Ledger(S.public_key)
    good = rec(C, S, 1, 10)
    inflated = replace(good, work=10**9)  # signatures no longer match
    with pytest.raises(BadSignature):
        ledger.store(inflated)
    by_impostor = countersign(Y, make_receipt(C, S.public_key, HH, 1, 10))  # Y countersigns for S
    with pytest.raises(BadSignature):
        ledger.store(by_impostor)
    with pytest.raises(DecodeError):
        ledger.store(make_receipt(C, S.public_key, HH, 1, 10))  # client signature only
    assert len(ledger) == 0
    assert not ledger.dirty
    assert issubclass(BadSignature, RemoteProtocolError)


def test_exchange_round_trip_through_credit_report() -> None:
    # X's ledger: X did work for S (own) and C did work for X (own).
    x_ledger = Ledger(X.public_key)
    x_ledger.store(rec(S, X, 1, 50))
    x_ledger.store(rec(X, C, 3, 30))
    report = CreditReport(records=x_ledger.records_for_exchange())
    _, decoded = decode_message(encode_message(report, 1))
    s_ledger = Ledger(S.public_key)
    result = s_ledger.merge_remote(decoded.records)
    assert (result.accepted, result.rejected) == (2, ())
    # C -> X -> S: C's transitive credit at S is min(30, 50).
    assert s_ledger.credit(C.public_key).transitive == 30
    again = s_ledger.merge_remote(decoded.records)
    assert (again.accepted, again.unchanged) == (0, 2)


def test_merge_rejects_forged_records_but_keeps_the_rest() -> None:
    s_ledger = Ledger(S.public_key)
    forged = replace(rec(S, X, 1, 50), work=5000)
    result = s_ledger.merge_remote([forged, rec(S, Y, 1, 8), replace(rec(S, C, 1, 5), server_signature=None)])
    assert result.accepted == 1
    assert [type(e) for e in result.rejected] == [BadSignature, DecodeError]
    assert s_ledger.credit(X.public_key).total == 0
    assert s_ledger.credit(Y.public_key).total == 8


def test_irrelevant_third_party_records_are_ignored_and_capped() -> None:
    s_ledger = Ledger(S.public_key, max_records=1)
    s_ledger.store(rec(S, X, 1, 50))  # X works for S: records where X benefits are relevant
    result = s_ledger.merge_remote([rec(Y, C, 1, 9), rec(X, C, 1, 9), rec(X, Y, 1, 4)])
    # Y never worked for S: C -> Y is irrelevant; C -> X is kept; Y -> X is over the cap.
    assert (result.accepted, result.ignored) == (1, 2)
    assert s_ledger.credit(C.public_key).transitive == 9


def test_exchange_puts_own_records_first_and_respects_limit() -> None:
    s_ledger = Ledger(S.public_key)
    s_ledger.store(rec(S, X, 1, 50))
    s_ledger.merge_remote([rec(X, C, 1, 900)])
    s_ledger.store(rec(C, S, 1, 5))
    out = s_ledger.records_for_exchange()
    assert [r.work for r in out] == [50, 5, 900]
    assert len(s_ledger.records_for_exchange(limit=2)) == 2


def test_restart_keeps_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.cbor"
    ledger = Ledger.open(path, S.public_key)
    assert len(ledger) == 0
    ledger.store(rec(C, S, 3, 40))
    ledger.store(rec(S, X, 2, 70))
    ledger.merge_remote([rec(X, C, 1, 9)])
    assert ledger.dirty
    ledger.save()
    assert not ledger.dirty
    assert os.stat(path).st_mode & 0o077 == 0
    reopened = Ledger.open(path, S.public_key)
    assert sorted(reopened.records(), key=lambda r: r.work) == sorted(ledger.records(), key=lambda r: r.work)
    assert reopened.credit(C.public_key) == ledger.credit(C.public_key)
    assert not reopened.dirty
    with pytest.raises(StaleReceipt):  # replay protection survives the restart
        reopened.store(rec(C, S, 3, 40 + 1))
    assert [p.name for p in path.parent.iterdir()] == ["ledger.cbor"]  # no temp files left


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated mid-write by some other tool
        lambda data: b"\xff" + data[1:],
        lambda data: b"",
        lambda data: data.replace(LEDGER_FORMAT.encode(), b"x" * len(LEDGER_FORMAT)),
    ],
)
def test_corrupt_file_is_a_typed_error(tmp_path: Path, damage) -> None:
    path = tmp_path / "ledger.cbor"
    ledger = Ledger(S.public_key, path=path)
    ledger.store(rec(C, S, 1, 10))
    ledger.save()
    path.write_bytes(damage(path.read_bytes()))
    before = path.read_bytes()
    with pytest.raises(LedgerError):
        Ledger.open(path, S.public_key)
    assert path.read_bytes() == before  # loading never rewrites the file


def test_a_ledger_of_another_identity_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.cbor"
    Ledger(S.public_key, path=path).save()
    with pytest.raises(LedgerError, match="another identity"):
        Ledger.open(path, C.public_key)


def test_failed_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.cbor"
    ledger = Ledger(S.public_key, path=path)
    ledger.store(rec(C, S, 1, 10))
    ledger.save()
    before = path.read_bytes()
    ledger.store(rec(C, S, 2, 20))

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        ledger.save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.cbor"]
    assert ledger.dirty
