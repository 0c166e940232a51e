"""Deterministic CBOR encoding and strict, bounded decoding (spec/SPEC.md section 2).

Theory of operation: the wire uses a small CBOR subset: unsigned and negative
integers, byte and text strings, arrays, maps, false/true/null and floats. No tags.
Every map key is an integer 0..23 or a text string of at most 23 bytes, so cbor2's
``canonical=True`` ordering (length-first, RFC 7049) coincides with the bytewise
ordering of RFC 8949 section 4.2.1 (the first byte of such a key encodes its
length). Encoding is cbor2's.

Decoding is our own, one pass over the bytes that builds nothing it has not checked:

- every head must be in its shortest form and of definite length; a map's keys must
  be in strictly increasing bytewise order of their encodings (so no duplicates);
  a float must be in the shortest of half, single and double that holds it exactly
  (the same rule the encoder follows), and not NaN; tags, undefined and other simple
  values, and trailing bytes are rejected. Together these are the deterministic
  encoding's rules, so a decoded item re-encodes to exactly its bytes, as the
  spec's strictness rule demands, without the cost of re-encoding it.
- it counts data items against a budget (``max_items``; the message layer derives it
  from the message type's field table, spec section 7.5) and nesting against
  ``MAX_DEPTH``, and checks a declared length against both the budget and the bytes
  left before it builds the array, map or string. So no input builds more than
  ``max_items`` objects (plus the bytes of its strings), whatever it claims: an
  array head declaring 16 Mi items is refused at its head.

``envelope_head`` reads the type and id at the front of a message envelope
``[type, id, body]`` from its first few bytes, which is how a receiver picks the
message's size cap before buffering it (spec section 6, "Application messages").
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2

from .errors import DecodeError, LimitExceeded, LocalProtocolError

__all__ = ["encode", "decode", "envelope_head", "MAX_DEPTH", "ENVELOPE_HEAD_MAX", "head_size"]

#: Deepest nesting of arrays and maps any message of the spec needs, with margin.
MAX_DEPTH = 16
#: Bytes ``envelope_head`` needs at most: the array head, then type and id heads.
ENVELOPE_HEAD_MAX = 1 + 9 + 9
# These keep cbor2's length-first key order identical to RFC 8949's bytewise order.
_MAX_KEY_INT = 23
_MAX_KEY_TEXT = 23
_INT_RANGE = (-(2**64), 2**64 - 1)  # CBOR major types 0 and 1; no bignum tags
_HEAD_EXTRA = {24: 1, 25: 2, 26: 4, 27: 8}
_SHORTEST_MIN = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}
_FLOAT_FORMATS = {25: ">e", 26: ">f", 27: ">d"}
_SIMPLE = {20: False, 21: True, 22: None}


def encode(obj: Any) -> bytes:
    """Encode ``obj`` deterministically. Raises LocalProtocolError outside the subset."""
    _check_subset(obj, 0)
    return cbor2.dumps(obj, canonical=True)


def head_size(value: int) -> int:
    """Bytes of the shortest CBOR head carrying ``value`` (an argument or a length)."""
    if value < 24:
        return 1
    if value < 1 << 8:
        return 2
    if value < 1 << 16:
        return 3
    if value < 1 << 32:
        return 5
    return 9


def decode(data: bytes | bytearray | memoryview, *, max_size: int, max_items: int | None = None) -> Any:
    """Decode exactly one canonical CBOR item from ``data``.

    Args:
        max_size: the most bytes ``data`` may have.
        max_items: the most data items (every integer, string, float, simple value,
            array and map counts one; a map's keys count too) the item may hold;
            None: no budget beyond what ``max_size`` implies.

    Raises:
        LimitExceeded: ``data`` is longer than ``max_size``, or holds (or declares)
            more than ``max_items`` items.
        DecodeError: anything else wrong with the bytes.
    """
    if len(data) > max_size:
        raise LimitExceeded(f"CBOR item of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise DecodeError("invalid CBOR: no bytes")
    reader = _Reader(bytes(data) if not isinstance(data, bytes) else data, max_items)
    obj = reader.item(0)
    if reader.pos != len(data):
        raise DecodeError(f"{len(data) - reader.pos} trailing bytes after the CBOR item")
    return obj


def envelope_head(prefix: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(type, id)`` of a message envelope from its first bytes, or None if ``prefix``
    is too short to tell (``ENVELOPE_HEAD_MAX`` bytes always suffice).

    Raises:
        DecodeError: the bytes cannot start an envelope ``[uint, uint, ...]`` in
            deterministic form.
    """
    if not prefix:
        return None
    if prefix[0] != 0x83:
        raise DecodeError("a message is the array [type, id, body]")
    values = []
    pos = 1
    for what in ("type", "id"):
        if pos >= len(prefix):
            return None
        initial = prefix[pos]
        if initial >> 5 != 0:
            raise DecodeError(f"message {what} must be an unsigned integer")
        info = initial & 31
        extra = _HEAD_EXTRA.get(info, 0) if info >= 24 else 0
        if info > 27:
            raise DecodeError(f"invalid head for the message {what}")
        if pos + 1 + extra > len(prefix):
            return None
        value = info if info < 24 else int.from_bytes(prefix[pos + 1 : pos + 1 + extra], "big")
        if info >= 24 and value < _SHORTEST_MIN[info]:
            raise DecodeError("CBOR item is not in deterministic (canonical) form: non-shortest integer")
        values.append(value)
        pos += 1 + extra
    return values[0], values[1]


class _Reader:
    __slots__ = ("data", "pos", "left")

    def __init__(self, data: bytes, max_items: int | None) -> None:
        self.data = data
        self.pos = 0
        self.left = len(data) + 1 if max_items is None else max_items  # items still allowed

    def _take(self, count: int) -> None:
        if count > self.left:
            raise LimitExceeded("CBOR item holds more data items than its budget allows")
        self.left -= count

    def _head(self) -> tuple[int, int]:
        """(major type, argument) of the next head, which must be shortest and definite."""
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise DecodeError("invalid CBOR: truncated item")
        initial = data[pos]
        major, info = initial >> 5, initial & 31
        if info < 24:
            self.pos = pos + 1
            return major, info
        if info == 31:
            raise DecodeError("CBOR item is not in deterministic (canonical) form: indefinite length")
        extra = _HEAD_EXTRA.get(info)
        if extra is None:
            raise DecodeError(f"invalid CBOR: reserved additional information {info}")
        end = pos + 1 + extra
        if end > len(data):
            raise DecodeError("invalid CBOR: truncated head")
        value = int.from_bytes(data[pos + 1 : end], "big")
        if value < _SHORTEST_MIN[info]:
            raise DecodeError("CBOR item is not in deterministic (canonical) form: non-shortest head")
        self.pos = end
        return major, value

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise DecodeError(f"CBOR nesting deeper than {MAX_DEPTH}")
        self._take(1)
        if self.pos < len(self.data) and self.data[self.pos] >= 0xE0:
            return self._simple()  # major type 7: the argument is not a length
        major, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2 or major == 3:
            end = self.pos + arg
            if end > len(self.data):
                raise DecodeError("invalid CBOR: string longer than the bytes left")
            raw = self.data[self.pos : end]
            self.pos = end
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("invalid CBOR: text is not valid UTF-8") from None
        if major == 4:
            if arg > len(self.data) - self.pos:
                raise DecodeError("invalid CBOR: array longer than the bytes left")
            if arg > self.left:
                raise LimitExceeded(f"CBOR array of {arg} items exceeds the item budget")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            return self._map(arg, depth)
        raise DecodeError("CBOR tags are not allowed")  # major type 6

    def _map(self, count: int, depth: int) -> dict[Any, Any]:
        if 2 * count > len(self.data) - self.pos:
            raise DecodeError("invalid CBOR: map longer than the bytes left")
        if 2 * count > self.left:
            raise LimitExceeded(f"CBOR map of {count} pairs exceeds the item budget")
        out: dict[Any, Any] = {}
        previous = b""
        for _ in range(count):
            start = self.pos
            key = self.item(depth + 1)
            raw = self.data[start : self.pos]
            if type(key) is int:
                if not 0 <= key <= _MAX_KEY_INT:
                    raise DecodeError(f"integer map keys must be 0..{_MAX_KEY_INT}")
            elif type(key) is str:
                if len(raw) - 1 > _MAX_KEY_TEXT:
                    raise DecodeError(f"text map key longer than {_MAX_KEY_TEXT} bytes")
            else:
                raise DecodeError(f"map key of type {type(key).__name__} is not allowed")
            if raw <= previous:
                raise DecodeError("CBOR item is not in deterministic (canonical) form: "
                                  "map keys unsorted or duplicated")
            previous = raw
            out[key] = self.item(depth + 1)
        return out

    def _simple(self) -> Any:
        data, pos = self.data, self.pos
        info = data[pos] & 31
        if info in _SIMPLE:
            self.pos = pos + 1
            return _SIMPLE[info]
        fmt = _FLOAT_FORMATS.get(info)
        if fmt is None:
            raise DecodeError("CBOR simple values other than false, true and null are not allowed")
        end = pos + 1 + _HEAD_EXTRA[info]
        if end > len(data):
            raise DecodeError("invalid CBOR: truncated float")
        raw = data[pos:end]
        (value,) = struct.unpack(fmt, raw[1:])
        if value != value:
            raise DecodeError("NaN is not allowed")
        if cbor2.dumps(value, canonical=True) != raw:
            raise DecodeError("CBOR item is not in deterministic (canonical) form: non-shortest float")
        self.pos = end
        return value


def _check_subset(obj: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LocalProtocolError(f"CBOR nesting deeper than {MAX_DEPTH}")
    if obj is None or isinstance(obj, (bool, bytes, str)):
        return
    if isinstance(obj, int):
        if not _INT_RANGE[0] <= obj <= _INT_RANGE[1]:
            raise LocalProtocolError("integer outside the 64-bit CBOR range")
        return
    if isinstance(obj, float):
        if obj != obj:  # NaN has several encodings and no meaning on this wire
            raise LocalProtocolError("NaN is not allowed")
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _check_subset(item, depth + 1)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise LocalProtocolError(f"map key of type {type(key).__name__} is not allowed")
            if isinstance(key, int) and not 0 <= key <= _MAX_KEY_INT:
                raise LocalProtocolError(f"integer map keys must be 0..{_MAX_KEY_INT}")
            if isinstance(key, str) and len(key.encode()) > _MAX_KEY_TEXT:
                raise LocalProtocolError(f"text map key longer than {_MAX_KEY_TEXT} bytes")
            _check_subset(value, depth + 1)
        return
    raise LocalProtocolError(f"value of type {type(obj).__name__} is outside the CBOR subset")
