"""Deterministic CBOR encoding and strict decoding (spec/SPEC.md, "Encoding").

Theory of operation: the wire uses a small CBOR subset: unsigned and negative
integers, byte and text strings, arrays, maps, false/true/null and floats. No tags.
Every map key is an integer 0..23 or a text string of at most 23 bytes, so cbor2's
``canonical=True`` ordering (length-first, RFC 7049) coincides with the bytewise
ordering of RFC 8949 section 4.2.1 (the first byte of such a key encodes its
length). The decoder is strict by re-encoding: it decodes with cbor2, re-encodes
the result deterministically and rejects the input unless the bytes are identical.
That one check rejects non-shortest integers and lengths, indefinite lengths,
duplicate or unsorted map keys, and non-shortest floats. Trailing bytes, tags and
values outside the subset are rejected explicitly.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from .errors import DecodeError, LimitExceeded, LocalProtocolError

__all__ = ["encode", "decode", "MAX_DEPTH"]

#: Deepest nesting of arrays and maps any message of the spec needs, with margin.
MAX_DEPTH = 16
# These keep cbor2's length-first key order identical to RFC 8949's bytewise order.
_MAX_KEY_INT = 23
_MAX_KEY_TEXT = 23
_INT_RANGE = (-(2**64), 2**64 - 1)  # CBOR major types 0 and 1; no bignum tags


def encode(obj: Any) -> bytes:
    """Encode ``obj`` deterministically. Raises LocalProtocolError outside the subset."""
    _check_subset(obj, 0, LocalProtocolError)
    return cbor2.dumps(obj, canonical=True)


def decode(data: bytes, *, max_size: int) -> Any:
    """Decode exactly one canonical CBOR item from ``data``.

    Raises:
        LimitExceeded: ``data`` is longer than ``max_size``.
        DecodeError: anything else wrong with the bytes.
    """
    if len(data) > max_size:
        raise LimitExceeded(f"CBOR item of {len(data)} bytes exceeds the limit of {max_size}")
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream, tag_hook=_reject_tag).decode()
    except DecodeError:
        raise
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"invalid CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise DecodeError(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    _check_subset(obj, 0, DecodeError)
    if cbor2.dumps(obj, canonical=True) != data:
        raise DecodeError("CBOR item is not in deterministic (canonical) form")
    return obj


def _reject_tag(decoder: object, tag: object) -> Any:
    raise DecodeError("CBOR tags are not allowed")


def _check_subset(obj: Any, depth: int, error: type[Exception]) -> None:
    if depth > MAX_DEPTH:
        raise error(f"CBOR nesting deeper than {MAX_DEPTH}")
    if obj is None or isinstance(obj, (bool, bytes, str)):
        return
    if isinstance(obj, int):
        if not _INT_RANGE[0] <= obj <= _INT_RANGE[1]:
            raise error("integer outside the 64-bit CBOR range")
        return
    if isinstance(obj, float):
        if obj != obj:  # NaN has several encodings and no meaning on this wire
            raise error("NaN is not allowed")
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _check_subset(item, depth + 1, error)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise error(f"map key of type {type(key).__name__} is not allowed")
            if isinstance(key, int) and not 0 <= key <= _MAX_KEY_INT:
                raise error(f"integer map keys must be 0..{_MAX_KEY_INT}")
            if isinstance(key, str) and len(key.encode()) > _MAX_KEY_TEXT:
                raise error(f"text map key longer than {_MAX_KEY_TEXT} bytes")
            _check_subset(value, depth + 1, error)
        return
    raise error(f"value of type {type(obj).__name__} is outside the CBOR subset")
