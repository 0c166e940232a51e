"""Field codecs: one declaration per message field gives validation on construction,
CBOR encoding, strict decoding and the row of the spec's message table.

Theory of operation: a message class lists ``FIELDS = (Field(key, name, codec), ...)``.
``codec.check(value)`` validates (and normalizes lists to tuples) a Python value and
raises ``LocalProtocolError``; ``codec.to_cbor`` / ``codec.from_cbor`` convert to and
from the CBOR data model, the latter raising ``DecodeError``/``LimitExceeded``.
``codec.cddl`` is the type as written in spec/SPEC.md's message registry.

The same declarations bound what a message can cost a receiver (spec section 7.5):
``codec.max_items(limits)`` is the most CBOR data items a value of the field can
hold and ``codec.max_size(limits)`` the most bytes it can take besides the data
bytes of its tensors. ``envelope_items`` and ``envelope_size`` add the envelope and
the allowance for map keys a receiver does not know (forward compatibility, section
16), and ``envelope_size`` four bytes per tensor element: the strict decoder refuses
a message holding more items than ``envelope_items`` of its type, and the transport
refuses one declaring more bytes than its size cap before buffering it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._cbor import ENVELOPE_HEAD_MAX, head_size
from ._limits import Limits
from .errors import DecodeError, LocalProtocolError, ProtocolError

__all__ = [
    "Codec",
    "Field",
    "UInt",
    "Bytes",
    "Text",
    "Float",
    "Bool",
    "Span",
    "ListOf",
    "Struct",
    "TensorCodec",
    "fields_from_cbor",
    "fields_to_cbor",
    "fields_max_items",
    "fields_max_size",
    "envelope_items",
    "envelope_size",
    "envelope_fixed_size",
    "has_tensors",
    "tensor_max_size",
    "EXTENSION_ITEMS",
    "EXTENSION_BYTES",
]

#: Data items, and bytes, that map keys a receiver does not know may add to one message.
EXTENSION_ITEMS = 256
EXTENSION_BYTES = 4096
#: Items of an envelope besides its body: the array, the type and the id.
_ENVELOPE_ITEMS = 3
#: Bytes of a tensor map besides its data and absmax bytes (keys, dtype, shape, heads), per dimension.
_TENSOR_OVERHEAD = 64
_TENSOR_PER_DIM = 9

_UINT_MAX = 2**64 - 1


class Codec:
    @property
    def cddl(self) -> str:
        return "any"

    def check(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def max_items(self, limits: Limits) -> int:
        """The most CBOR data items a value can hold (a scalar is one)."""
        return 1

    def max_size(self, limits: Limits) -> int:  # pragma: no cover - abstract
        """The most bytes a value's encoding can take, not counting the data bytes of
        tensors (four an element at most: ``envelope_size`` adds them)."""
        raise NotImplementedError

    def to_cbor(self, value: Any) -> Any:
        return value

    def from_cbor(self, obj: Any, limits: Limits) -> Any:
        try:
            return self.check(obj)
        except LocalProtocolError as exc:
            raise DecodeError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class UInt(Codec):
    max: int = _UINT_MAX

    @property
    def cddl(self) -> str:
        return "uint" if self.max == _UINT_MAX else f"uint .le {self.max}"

    def max_size(self, limits: Limits) -> int:
        return head_size(self.max)

    def check(self, value: Any) -> int:
        if type(value) is not int or not 0 <= value <= self.max:
            raise LocalProtocolError(f"expected an unsigned integer <= {self.max}, got {_short(value)}")
        return value


@dataclass(frozen=True, slots=True)
class Bytes(Codec):
    size: int | None = None  # exact size, or None for "at most max"
    max: int = 1 << 20

    @property
    def cddl(self) -> str:
        return f"bstr .size {self.size}" if self.size is not None else f"bstr .size (0..{self.max})"

    def max_size(self, limits: Limits) -> int:
        n = self.size if self.size is not None else self.max
        return head_size(n) + n

    def check(self, value: Any) -> bytes:
        if type(value) is not bytes:
            raise LocalProtocolError(f"expected bytes, got {type(value).__name__}")
        if self.size is not None and len(value) != self.size:
            raise LocalProtocolError(f"expected {self.size} bytes, got {len(value)}")
        if len(value) > self.max:
            raise LocalProtocolError(f"byte string of {len(value)} bytes exceeds {self.max}")
        return value


@dataclass(frozen=True, slots=True)
class Text(Codec):
    max: int = 256
    nonempty: bool = False

    @property
    def cddl(self) -> str:
        return f"tstr .size ({1 if self.nonempty else 0}..{self.max})"

    def max_size(self, limits: Limits) -> int:
        return head_size(self.max) + self.max

    def check(self, value: Any) -> str:
        if type(value) is not str:
            raise LocalProtocolError(f"expected text, got {type(value).__name__}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > self.max or (self.nonempty and not value):
            raise LocalProtocolError(f"text of {size} bytes outside 1..{self.max}" if self.nonempty else f"text of {size} bytes exceeds {self.max}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError("text is not valid UTF-8") from None
        return value


@dataclass(frozen=True, slots=True)
class Float(Codec):
    min: float = 0.0
    cddl = "float (finite, >= 0)"

    def max_size(self, limits: Limits) -> int:
        return 9

    def check(self, value: Any) -> float:
        if type(value) is int:  # CBOR has no int/float distinction worth keeping here
            value = float(value)
        if type(value) is not float or not math.isfinite(value) or value < self.min:
            raise LocalProtocolError(f"expected a finite float >= {self.min}, got {_short(value)}")
        return value

    def from_cbor(self, obj: Any, limits: Limits) -> float:
        if type(obj) is not float:  # a canonical encoder never writes a float as an int
            raise DecodeError(f"expected a float, got {type(obj).__name__}")
        return super(Float, self).from_cbor(obj, limits)


@dataclass(frozen=True, slots=True)
class Bool(Codec):
    cddl = "bool"

    def max_size(self, limits: Limits) -> int:
        return 1

    def check(self, value: Any) -> bool:
        if type(value) is not bool:
            raise LocalProtocolError(f"expected a bool, got {type(value).__name__}")
        return value


@dataclass(frozen=True, slots=True)
class Span(Codec):
    """A half-open block range [start, end) with start < end."""

    max: int = 1 << 16
    cddl = "[start: uint, end: uint]  ; start < end"

    def max_items(self, limits: Limits) -> int:
        return 3

    def max_size(self, limits: Limits) -> int:
        return 1 + 2 * head_size(self.max)

    def check(self, value: Any) -> tuple[int, int]:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise LocalProtocolError(f"a span is [start, end], got {_short(value)}")
        start, end = value
        if type(start) is not int or type(end) is not int or not 0 <= start < end <= self.max:
            raise LocalProtocolError(f"invalid span [{_short(start)}, {_short(end)})")
        return (start, end)

    def to_cbor(self, value: tuple[int, int]) -> list[int]:
        return [value[0], value[1]]


@dataclass(frozen=True, slots=True)
class ListOf(Codec):
    item: Codec
    max: int = 64

    @property
    def cddl(self) -> str:
        return f"[* {self.item.cddl}]  ; at most {self.max}"

    def max_items(self, limits: Limits) -> int:
        return 1 + self.max * self.item.max_items(limits)

    def max_size(self, limits: Limits) -> int:
        return head_size(self.max) + self.max * self.item.max_size(limits)

    def check(self, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)):
            raise LocalProtocolError(f"expected a list, got {type(value).__name__}")
        if len(value) > self.max:
            raise LocalProtocolError(f"list of {len(value)} items exceeds {self.max}")
        return tuple(self.item.check(v) for v in value)

    def to_cbor(self, value: tuple[Any, ...]) -> list[Any]:
        return [self.item.to_cbor(v) for v in value]

    def from_cbor(self, obj: Any, limits: Limits) -> tuple[Any, ...]:
        if type(obj) is not list:
            raise DecodeError(f"expected an array, got {type(obj).__name__}")
        if len(obj) > self.max:
            raise DecodeError(f"array of {len(obj)} items exceeds {self.max}")
        return tuple(self.item.from_cbor(v, limits) for v in obj)


@dataclass(frozen=True, slots=True)
class Struct(Codec):
    """A nested structure: a class with ``FIELDS`` (encoded as a small-int-keyed map)."""

    cls: type[Any]  # a message or record class (it has FIELDS)

    @property
    def cddl(self) -> str:
        return self.cls.__name__

    def max_items(self, limits: Limits) -> int:
        return fields_max_items(self.cls.FIELDS, limits)

    def max_size(self, limits: Limits) -> int:
        return fields_max_size(self.cls.FIELDS, limits)

    def check(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            raise LocalProtocolError(f"expected {self.cls.__name__}, got {type(value).__name__}")
        return value

    def to_cbor(self, value: Any) -> dict[int, Any]:
        return fields_to_cbor(value, value.FIELDS)

    def from_cbor(self, obj: Any, limits: Limits) -> Any:
        kwargs = fields_from_cbor(obj, self.cls.FIELDS, limits)
        try:
            return self.cls(**kwargs)
        except LocalProtocolError as exc:  # fields valid one by one, but not together
            raise DecodeError(str(exc)) from None


class TensorCodec(Codec):
    """A tensor as protocol._tensor.WireTensor (imported lazily: only it needs torch)."""

    cddl = "Tensor"

    def max_items(self, limits: Limits) -> int:
        # the map, its five keys, dtype, the shape array and its dimensions, data,
        # absmax and blocksize
        return 1 + 5 + 1 + 1 + limits.max_tensor_dims + 3

    def max_size(self, limits: Limits) -> int:
        return tensor_max_size(0, limits)

    def check(self, value: Any) -> Any:
        from ._tensor import WireTensor

        if not isinstance(value, WireTensor):
            raise LocalProtocolError(f"expected a WireTensor, got {type(value).__name__}")
        return value

    def to_cbor(self, value: Any) -> Any:
        return value.to_cbor()

    def from_cbor(self, obj: Any, limits: Limits) -> Any:
        from ._tensor import WireTensor

        return WireTensor.from_cbor(obj, limits=limits)


@dataclass(frozen=True, slots=True)
class Field:
    key: int
    name: str
    codec: Codec
    optional: bool = False  # omitted from the map when None


def fields_to_cbor(obj: Any, fields: tuple[Field, ...]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for f in fields:
        value = getattr(obj, f.name)
        if value is None and f.optional:
            continue
        out[f.key] = f.codec.to_cbor(value)
    return out


def fields_from_cbor(body: Any, fields: tuple[Field, ...], limits: Limits) -> dict[str, Any]:
    """Decode a small-int-keyed map into constructor keyword arguments.

    Unknown keys are ignored (forward compatibility: spec "Versioning").
    """
    if type(body) is not dict:
        raise DecodeError(f"expected a map, got {type(body).__name__}")
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.key in body:
            try:
                kwargs[f.name] = f.codec.from_cbor(body[f.key], limits)
            except LocalProtocolError as exc:
                raise DecodeError(f"field {f.name!r}: {exc}") from None
            except ProtocolError as exc:
                raise type(exc)(f"field {f.name!r}: {exc}") from None
        elif f.optional:
            kwargs[f.name] = None
        else:
            raise DecodeError(f"missing field {f.name!r} (key {f.key})")
    return kwargs


def fields_max_items(fields: tuple[Field, ...], limits: Limits) -> int:
    """The most data items a map of these fields holds: the map, each key and value."""
    return 1 + sum(1 + f.codec.max_items(limits) for f in fields)


def fields_max_size(fields: tuple[Field, ...], limits: Limits) -> int:
    """The most bytes a map of these fields takes, not counting tensor data bytes."""
    return head_size(len(fields)) + sum(head_size(f.key) + f.codec.max_size(limits) for f in fields)


def has_tensors(codec_or_fields: Codec | tuple[Field, ...]) -> bool:
    """Whether values of a codec (or a map of fields) can carry tensors."""
    if isinstance(codec_or_fields, tuple):
        return any(has_tensors(f.codec) for f in codec_or_fields)
    if isinstance(codec_or_fields, TensorCodec):
        return True
    if isinstance(codec_or_fields, ListOf):
        return has_tensors(codec_or_fields.item)
    if isinstance(codec_or_fields, Struct):
        return has_tensors(codec_or_fields.cls.FIELDS)
    return False


def tensor_max_size(elements: int, limits: Limits) -> int:
    """The most bytes a tensor of at most ``elements`` elements takes in any dtype
    (f32's four bytes an element is the widest; q8 and nf4 add an absmax float per
    block of at least 64 elements, less than f32's extra bytes)."""
    return 4 * elements + _TENSOR_OVERHEAD + _TENSOR_PER_DIM * limits.max_tensor_dims


def envelope_items(fields: tuple[Field, ...] | None, limits: Limits) -> int:
    """The item budget of a message whose body has ``fields`` (None: a type the receiver
    does not know, whose body it never reads): envelope, body and extension allowance."""
    body = fields_max_items(fields, limits) if fields is not None else 1
    return _ENVELOPE_ITEMS + body + EXTENSION_ITEMS


def envelope_fixed_size(type_: int, fields: tuple[Field, ...], limits: Limits) -> int:
    """The most bytes a message of this type takes besides its tensors' data bytes:
    envelope, body, every tensor's map and the extension allowance."""
    return 1 + head_size(type_) + ENVELOPE_HEAD_MAX + fields_max_size(fields, limits) + EXTENSION_BYTES


def envelope_size(type_: int, fields: tuple[Field, ...], limits: Limits, elements: int | None = None) -> int:
    """The most bytes a message of this type and body takes when its tensors hold at
    most ``elements`` elements together (None: any number the limits allow), never
    above ``limits.max_message_size``: ``envelope_fixed_size`` plus four bytes an
    element (f32, the widest dtype)."""
    fixed = envelope_fixed_size(type_, fields, limits)
    if not has_tensors(fields):
        return min(fixed, limits.max_message_size)
    if elements is None:
        return limits.max_message_size
    return min(fixed + 4 * elements, limits.max_message_size)


def validate_fields(obj: Any) -> None:
    """Run in ``__post_init__``: check and normalize every field (frozen-safe)."""
    for f in obj.FIELDS:
        value = getattr(obj, f.name)
        if value is None and f.optional:
            continue
        try:
            object.__setattr__(obj, f.name, f.codec.check(value))
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"{type(obj).__name__}.{f.name}: {exc}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
