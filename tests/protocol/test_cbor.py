import json
from pathlib import Path

import pytest

from protocol import DecodeError, LimitExceeded, LocalProtocolError, cbor_decode, cbor_encode

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "cbor-strict.json"


@pytest.mark.parametrize(
    "obj",
    [0, 23, 24, 2**64 - 1, -(2**64), b"", b"\x00" * 300, "", "é", [], [1, [2, [3]]], {0: 1, 23: 2, "a": 3, "bb": 4},
     True, False, None, 1.5, -0.0, 1e300],
)
def test_round_trip(obj):
    assert cbor_decode(cbor_encode(obj), max_size=10_000) == obj


def test_map_keys_are_in_bytewise_order():
    # RFC 8949 4.2.1: keys sorted by their encoded bytes; int keys (0x00..0x17) before text (0x60..)
    assert cbor_encode({"b": 1, 1: 2, "a": 3, 0: 4}).hex() == "a400040102616103616201"


@pytest.mark.parametrize("bad", [{24: 1}, {-1: 1}, {b"k": 1}, {"x" * 24: 1}, float("nan"), 2**64, {1.0: 2}, {True: 1}, object()])
def test_encoder_refuses_values_outside_the_subset(bad):
    with pytest.raises(LocalProtocolError):
        cbor_encode(bad)


def test_rejection_vectors_replay():
    for case in json.loads(VECTORS.read_text())["reject"]:
        with pytest.raises(DecodeError):
            cbor_decode(bytes.fromhex(case["input_hex"]), max_size=1000)
        if case["canonical_hex"]:
            canonical = bytes.fromhex(case["canonical_hex"])
            assert cbor_encode(cbor_decode(canonical, max_size=1000)) == canonical


def test_acceptance_vectors_replay():
    # Nesting is counted from depth 0 at the top level (spec section 2): 16 is the deepest accepted.
    for case in json.loads(VECTORS.read_text())["accept"]:
        data = bytes.fromhex(case["input_hex"])
        assert cbor_encode(cbor_decode(data, max_size=1000)) == data, case["name"]


def test_budget_vectors_replay():
    outcomes = {"MALFORMED": DecodeError, "LIMIT_EXCEEDED": LimitExceeded}
    for case in json.loads(VECTORS.read_text())["budget"]:
        data = bytes.fromhex(case["input_hex"])
        if case["outcome"] == "accept":
            cbor_decode(data, max_size=len(data), max_items=case["max_items"])
        else:
            with pytest.raises(outcomes[case["outcome"]]):
                cbor_decode(data, max_size=len(data), max_items=case["max_items"])


def test_size_limit_checked_before_decoding():
    with pytest.raises(LimitExceeded):
        cbor_decode(cbor_encode(b"x" * 100), max_size=50)


def test_nesting_limit():
    deep = b"\x81" * 40 + b"\x00"
    with pytest.raises(DecodeError):
        cbor_decode(deep, max_size=1000)


@pytest.mark.parametrize("data", [b"", b"\x5b" + (2**62).to_bytes(8, "big"), b"\x9b" + (2**40).to_bytes(8, "big"), b"\xff"])
def test_truncated_or_huge_claims_are_decode_errors(data):
    with pytest.raises(DecodeError):
        cbor_decode(data, max_size=1000)
