"""Tensor wire codecs (spec/SPEC.md, "Tensors").

The one protocol module that imports torch.

Theory of operation: a tensor travels as the CBOR map
``{0: dtype, 1: shape, 2: data[, 3: absmax, 4: blocksize]}``. ``f32``/``f16``/``bf16``
carry the raw little-endian IEEE bits of every element in row-major order. ``q8``
and ``nf4`` split the flattened tensor into blocks of ``blocksize`` elements (the
last one may be short), store each block's largest magnitude as a float32 in
``absmax`` and each element as the index of a codebook value: the 256-value
bitsandbytes "dynamic" map for ``q8`` (one byte per element), the 16 NF4 values of
QLoRA for ``nf4`` (two elements per byte, the even element in the high nibble).

The codebooks are kept here as float32 bit patterns, exactly as the spec prints
them, so decoding is bit-exact in any language: a decoded element is the float32
product ``codebook[code] * absmax`` (one IEEE multiplication). Encoding is made
deterministic too, so that equal inputs give equal bytes and equal digests: each
element is divided by its block's absmax in float32 and mapped to the number of
codebook thresholds strictly below it, where threshold ``i`` is the float32
midpoint of codebook values ``i`` and ``i + 1``. A value exactly on a threshold
therefore takes the lower code, as ``torch.bucketize`` (right=False) and
bitsandbytes' portable backend do.

All work on elements is vectorized torch; validation of a received map happens
before anything the size of the tensor is allocated.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from . import _cbor
from ._limits import DEFAULT_LIMITS, Limits
from .errors import DecodeError, LimitExceeded, LocalProtocolError

__all__ = [
    "DTYPES",
    "LOSSLESS",
    "QUANTIZED",
    "BLOCKSIZES",
    "WireTensor",
    "encode_tensor",
    "decode_tensor",
]

DTYPES = ("f32", "f16", "bf16", "q8", "nf4")
#: Exact for tensors already in that dtype; encoding another float dtype rounds.
LOSSLESS = frozenset({"f32", "f16", "bf16"})
QUANTIZED = frozenset({"q8", "nf4"})
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)

_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_KEY_DTYPE, _KEY_SHAPE, _KEY_DATA, _KEY_ABSMAX, _KEY_BLOCKSIZE = range(5)
_REQUIRED_KEYS = frozenset({_KEY_DTYPE, _KEY_SHAPE, _KEY_DATA})
_ALL_KEYS = _REQUIRED_KEYS | {_KEY_ABSMAX, _KEY_BLOCKSIZE}
_MAX_DIM = 2**63 - 1  # torch sizes are int64

# The bitsandbytes dynamic map, create_dynamic_map(signed=True), sorted ascending.
# Equal to _derive_dynamic_map() and to bitsandbytes' own output (both tested).
_Q8_BITS = (
    0xBF7E3333, 0xBF7A999A, 0xBF770000, 0xBF736666, 0xBF6FCCCD, 0xBF6C3333, 0xBF68999A, 0xBF650000,
    0xBF616666, 0xBF5DCCCD, 0xBF5A3333, 0xBF56999A, 0xBF530000, 0xBF4F6666, 0xBF4BCCCD, 0xBF483333,
    0xBF44999A, 0xBF410000, 0xBF3D6666, 0xBF39CCCD, 0xBF363334, 0xBF32999A, 0xBF2F0000, 0xBF2B6666,
    0xBF27CCCD, 0xBF243334, 0xBF20999A, 0xBF1D0000, 0xBF196666, 0xBF15CCCD, 0xBF123334, 0xBF0E999A,
    0xBF0B0000, 0xBF076666, 0xBF03CCCC, 0xBF003333, 0xBEF93332, 0xBEF20000, 0xBEEACCCC, 0xBEE3999A,
    0xBEDC6666, 0xBED53333, 0xBECE0000, 0xBEC6CCCC, 0xBEBF999A, 0xBEB86666, 0xBEB13333, 0xBEAA0000,
    0xBEA2CCCC, 0xBE9B999A, 0xBE946666, 0xBE8D3334, 0xBE860000, 0xBE7D9999, 0xBE6F3333, 0xBE60CCCD,
    0xBE526666, 0xBE440000, 0xBE35999A, 0xBE273333, 0xBE18CCCD, 0xBE0A6666, 0xBDF80000, 0xBDDB3334,
    0xBDC9EB85, 0xBDC428F7, 0xBDBE6667, 0xBDB8A3D7, 0xBDB2E148, 0xBDAD1EB8, 0xBDA75C2A, 0xBDA1999A,
    0xBD9BD70A, 0xBD96147B, 0xBD9051EB, 0xBD8A8F5D, 0xBD84CCCD, 0xBD7E147B, 0xBD728F5D, 0xBD670A3D,
    0xBD5B851F, 0xBD500000, 0xBD447AE1, 0xBD38F5C3, 0xBD2D70A3, 0xBD21EB85, 0xBD166667, 0xBD0AE148,
    0xBCFEB852, 0xBCE7AE15, 0xBCD0A3D7, 0xBCB9999A, 0xBCA28F5D, 0xBC8B851F, 0xBC68F5C3, 0xBC3AE148,
    0xBC1F3B64, 0xBC160418, 0xBC0CCCCD, 0xBC039581, 0xBBF4BC6A, 0xBBE24DD3, 0xBBCFDF3B, 0xBBBD70A4,
    0xBBAB020D, 0xBB989374, 0xBB8624DD, 0xBB676C8A, 0xBB428F5C, 0xBB1DB22D, 0xBAF1A9FC, 0xBAA7EF9D,
    0xBA7765FF, 0xBA59E83E, 0xBA3C6A80, 0xBA1EECC1, 0xBA016F01, 0xB9C7E283, 0xB98CE705, 0xB923D70B,
    0xB8BA1F4B, 0xB88AEFB3, 0xB8378034, 0xB7B24206, 0xB70205FF, 0xB65A1A94, 0xB513A3B7, 0x00000000,
    0x3513A3B7, 0x365A1A94, 0x370205FF, 0x37B24206, 0x38378034, 0x388AEFB3, 0x38BA1F4B, 0x3923D70B,
    0x398CE705, 0x39C7E283, 0x3A016F01, 0x3A1EECC1, 0x3A3C6A80, 0x3A59E83E, 0x3A7765FF, 0x3AA7EF9D,
    0x3AF1A9FC, 0x3B1DB22D, 0x3B428F5C, 0x3B676C8A, 0x3B8624DD, 0x3B989374, 0x3BAB020D, 0x3BBD70A4,
    0x3BCFDF3B, 0x3BE24DD3, 0x3BF4BC6A, 0x3C039581, 0x3C0CCCCD, 0x3C160418, 0x3C1F3B64, 0x3C3AE148,
    0x3C68F5C3, 0x3C8B851F, 0x3CA28F5D, 0x3CB9999A, 0x3CD0A3D7, 0x3CE7AE15, 0x3CFEB852, 0x3D0AE148,
    0x3D166667, 0x3D21EB85, 0x3D2D70A3, 0x3D38F5C3, 0x3D447AE1, 0x3D500000, 0x3D5B851F, 0x3D670A3D,
    0x3D728F5D, 0x3D7E147B, 0x3D84CCCD, 0x3D8A8F5D, 0x3D9051EB, 0x3D96147B, 0x3D9BD70A, 0x3DA1999A,
    0x3DA75C2A, 0x3DAD1EB8, 0x3DB2E148, 0x3DB8A3D7, 0x3DBE6667, 0x3DC428F7, 0x3DC9EB85, 0x3DDB3334,
    0x3DF80000, 0x3E0A6666, 0x3E18CCCD, 0x3E273333, 0x3E35999A, 0x3E440000, 0x3E526666, 0x3E60CCCD,
    0x3E6F3333, 0x3E7D9999, 0x3E860000, 0x3E8D3334, 0x3E946666, 0x3E9B999A, 0x3EA2CCCC, 0x3EAA0000,
    0x3EB13333, 0x3EB86666, 0x3EBF999A, 0x3EC6CCCC, 0x3ECE0000, 0x3ED53333, 0x3EDC6666, 0x3EE3999A,
    0x3EEACCCC, 0x3EF20000, 0x3EF93332, 0x3F003333, 0x3F03CCCC, 0x3F076666, 0x3F0B0000, 0x3F0E999A,
    0x3F123334, 0x3F15CCCD, 0x3F196666, 0x3F1D0000, 0x3F20999A, 0x3F243334, 0x3F27CCCD, 0x3F2B6666,
    0x3F2F0000, 0x3F32999A, 0x3F363334, 0x3F39CCCD, 0x3F3D6666, 0x3F410000, 0x3F44999A, 0x3F483333,
    0x3F4BCCCD, 0x3F4F6666, 0x3F530000, 0x3F56999A, 0x3F5A3333, 0x3F5DCCCD, 0x3F616666, 0x3F650000,
    0x3F68999A, 0x3F6C3333, 0x3F6FCCCD, 0x3F736666, 0x3F770000, 0x3F7A999A, 0x3F7E3333, 0x3F800000,
)
# NF4 (QLoRA, bitsandbytes get_4bit_type("nf4")), ascending; index 7 is 0.0.
_NF4_BITS = (
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
)
#: The nibble that pads an odd element count in nf4: the code of 0.0, as in bitsandbytes.
NF4_PAD_CODE = 7


def _f32(x: float) -> float:
    """Round a Python float (double) to the nearest float32, ties to even."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _bits_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _derive_dynamic_map() -> tuple[float, ...]:
    """The q8 codebook rebuilt from its definition, in exact float32 steps.

    For i = 0..6: 2**i + 1 points evenly spaced on [0.1, 1] (float32 step
    RN32(RN32(1 - 0.1) / 2**i), point j = RN32(0.1 + j * step) for j below half, else
    RN32(1 - (2**i - j) * step), as torch.linspace computes them), the float32
    midpoints of neighbouring points, each times RN32(10 ** (i - 6)) in float32,
    with both signs; then 0.0 and 1.0. Sorted: 127 negative values, 0, 128 positive.
    Used by the tests and the spec generator; the codec uses the literal table.
    """
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i + 1
        start, end = _f32(0.1), 1.0
        step = _f32(_f32(end - start) / (n - 1))
        # The products and sums below are exact in double, so each _f32 is one rounding.
        points = [
            _f32(start + step * j) if j < n // 2 else _f32(end - step * (n - 1 - j))
            for j in range(n)
        ]
        scale = _f32(10.0 ** (i - 6))
        for lo, hi in zip(points, points[1:]):
            v = _f32(_f32(lo + hi) / 2 * scale)
            values += [v, -v]
    return tuple(sorted(values))


def _thresholds(codebook: tuple[float, ...]) -> tuple[float, ...]:
    # RN32(a + b) / 2 equals RN32 of the exact midpoint: halving is exact here.
    return tuple(_f32(a + b) / 2 for a, b in zip(codebook, codebook[1:]))


Q8_CODEBOOK = tuple(_bits_f32(b) for b in _Q8_BITS)
NF4_CODEBOOK = tuple(_bits_f32(b) for b in _NF4_BITS)
_CODEBOOKS = {"q8": Q8_CODEBOOK, "nf4": NF4_CODEBOOK}
_THRESHOLDS = {name: _thresholds(book) for name, book in _CODEBOOKS.items()}


# Quantizing is a search of the thresholds. torch.bucketize does it by binary search,
# slowly (tens of ns per element, far worse with busy threads). Instead each float32
# is turned into an integer key with the same order, and its top 16 bits select a
# bucket; no bucket holds more than one threshold (checked when the tables are made),
# so the count of thresholds below a value is the count below its bucket plus one
# comparison. The tests check this against the definition at every bucket edge and
# around every threshold.
_BUCKET_SHIFT = 16
_BUCKETS = 1 << (32 - _BUCKET_SHIFT)
_NO_THRESHOLD = 2**31 - 1  # above every key of a value in [-1, 1]


def _order_key(bits: int) -> int:
    """Signed int whose order is the float32 order of ``bits`` (-0.0 just below +0.0)."""
    return -1 - (bits & 0x7FFFFFFF) if bits & 0x80000000 else bits


def _keys(x: torch.Tensor) -> torch.Tensor:
    """_order_key of every element of a float32 tensor, as int32."""
    u = x.view(torch.int32)
    return u ^ ((u >> 31) & 0x7FFFFFFF)


@lru_cache(maxsize=32)
def _tables(dtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebook float32, codes below each bucket uint8, threshold key in each bucket int32)."""
    keys = [_order_key(_f32_bits(c)) for c in _THRESHOLDS[dtype]]
    buckets = [(k >> _BUCKET_SHIFT) + _BUCKETS // 2 for k in keys]
    if len(set(buckets)) != len(buckets):  # a property of the codebook, not of input
        raise AssertionError(f"two {dtype} thresholds share a bucket")
    starts = (torch.arange(_BUCKETS, dtype=torch.int64) - _BUCKETS // 2) << _BUCKET_SHIFT
    below = torch.searchsorted(torch.tensor(keys, dtype=torch.int64), starts).to(torch.uint8)
    inside = torch.full((_BUCKETS,), _NO_THRESHOLD, dtype=torch.int32)
    inside[buckets] = torch.tensor(keys, dtype=torch.int32)
    book = torch.tensor(_CODEBOOKS[dtype], dtype=torch.float32)
    return book.to(device), below.to(device), inside.to(device)


@lru_cache(maxsize=8)
def _nf4_pairs(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the values of the high and the low nibble of each byte."""
    book = _tables("nf4", device)[0]
    byte = torch.arange(256, device=device)
    return torch.stack((book[byte >> 4], book[byte & 0x0F]), dim=1)


def _codes_of(scaled: torch.Tensor, dtype: str) -> torch.Tensor:
    """uint8 codes: for each element, the number of thresholds strictly below it.

    ``scaled`` is a flat, contiguous float32 tensor that this call may overwrite
    (in-place steps: at this size the cost is memory traffic, not arithmetic).
    """
    _, below, inside = _tables(dtype, scaled.device)
    keys = scaled.view(torch.int32)
    work = keys >> 31
    keys ^= work.bitwise_and_(0x7FFFFFFF)  # keys = _keys(scaled), in place
    bucket = torch.bitwise_right_shift(keys, _BUCKET_SHIFT, out=work).add_(_BUCKETS // 2)
    codes = torch.index_select(below, 0, bucket)
    return codes.add_(torch.index_select(inside, 0, bucket) < keys)


def _data_length(dtype: str, numel: int) -> int:
    if dtype == "f32":
        return 4 * numel
    if dtype in ("f16", "bf16"):
        return 2 * numel
    if dtype == "q8":
        return numel
    return (numel + 1) // 2  # nf4


# Wire (little-endian) numpy dtypes; numpy converts byte order on big-endian hosts.
# bfloat16 has no numpy dtype and travels through int16 of the same bits.
_NP_WIRE = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("<i2"),
    torch.int32: np.dtype("<i4"),
    torch.uint8: np.dtype("u1"),
}


def _le_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a CPU tensor's elements in row-major order."""
    wire = _NP_WIRE[t.dtype]
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(wire, copy=False).tobytes()


def _from_le(data: bytes, dtype: torch.dtype, shape: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """A fresh CPU tensor of ``shape`` from little-endian bytes (never aliases ``data``)."""
    wire = _NP_WIRE[dtype]
    # astype copies (bytes are immutable, and torch must own writable memory) and
    # swaps to native order where that differs.
    array = np.frombuffer(data, dtype=wire).astype(wire.newbyteorder("=")).reshape(shape)
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _check_absmax(absmax: bytes) -> None:
    # Canonical scales: finite and not negative (sign bit clear), so one tensor
    # value has one encoding and decoding never yields NaN from the scale alone.
    # As unsigned ints, exactly those bit patterns lie below the one of +infinity.
    if (np.frombuffer(absmax, dtype="<u4") >= 0x7F800000).any():
        raise DecodeError("absmax values must be finite and not negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class WireTensor:
    """A tensor as it travels (spec/SPEC.md, "Tensors"); validated on construction.

    ``shape`` dimensions are non-negative ints (at most ``DEFAULT_LIMITS.max_tensor_dims``
    of them), ``data`` is exactly as long as dtype and shape require, and ``absmax``
    (little-endian float32, one per block) and ``blocksize`` are present exactly for
    the quantized dtypes. Raises DecodeError on any violation.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    absmax: bytes | None = None
    blocksize: int | None = None

    def __post_init__(self) -> None:
        if type(self.dtype) is not str or self.dtype not in DTYPES:
            raise DecodeError(f"unknown tensor dtype {self.dtype!r}")
        if not isinstance(self.shape, tuple):
            raise DecodeError("tensor shape must be a tuple")
        if len(self.shape) > DEFAULT_LIMITS.max_tensor_dims:
            most = DEFAULT_LIMITS.max_tensor_dims
            raise DecodeError(f"tensor has {len(self.shape)} dimensions, at most {most}")
        for dim in self.shape:
            if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
                raise DecodeError(f"tensor dimension {dim!r} is not a non-negative integer")
        if type(self.data) is not bytes:
            raise DecodeError("tensor data must be bytes")
        numel = self.numel
        expected = _data_length(self.dtype, numel)
        if len(self.data) != expected:
            raise DecodeError(
                f"{self.dtype} tensor of {numel} elements needs {expected} data bytes, got {len(self.data)}"
            )
        if self.dtype not in QUANTIZED:
            if self.absmax is not None or self.blocksize is not None:
                raise DecodeError(f"{self.dtype} tensors carry no absmax or blocksize")
            return
        if type(self.blocksize) is not int or self.blocksize not in BLOCKSIZES:
            raise DecodeError(f"blocksize {self.blocksize!r} is not one of {BLOCKSIZES}")
        if type(self.absmax) is not bytes:
            raise DecodeError(f"{self.dtype} tensors need absmax bytes")
        blocks = -(-numel // self.blocksize)
        if len(self.absmax) != 4 * blocks:
            raise DecodeError(f"{blocks} blocks need {4 * blocks} absmax bytes, got {len(self.absmax)}")
        _check_absmax(self.absmax)
        if self.dtype == "nf4" and numel % 2 and self.data[-1] & 0x0F != NF4_PAD_CODE:
            raise DecodeError(f"the padding nibble of an odd-length nf4 tensor must be {NF4_PAD_CODE}")

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar, shape ())."""
        return math.prod(self.shape)

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR map of the spec; encode with ``protocol._cbor.encode``."""
        obj: dict[int, Any] = {_KEY_DTYPE: self.dtype, _KEY_SHAPE: list(self.shape), _KEY_DATA: self.data}
        if self.absmax is not None:
            obj[_KEY_ABSMAX] = self.absmax
        if self.blocksize is not None:
            obj[_KEY_BLOCKSIZE] = self.blocksize
        return obj

    @classmethod
    def from_cbor(cls, obj: Any, *, limits: Limits = DEFAULT_LIMITS) -> WireTensor:
        """Validate a decoded CBOR map and build the tensor it describes.

        Dimension count and element count are checked against ``limits`` before
        anything is built. Raises LimitExceeded for a tensor over the limits and
        DecodeError for anything malformed (wrong types, unknown keys, bad lengths).
        """
        if type(obj) is not dict:
            raise DecodeError("a tensor must be a CBOR map")
        for key in obj:
            if type(key) is not int or key not in _ALL_KEYS:
                raise DecodeError(f"unknown tensor map key {key!r}")
        if not _REQUIRED_KEYS <= obj.keys():
            raise DecodeError("a tensor map needs keys 0 (dtype), 1 (shape) and 2 (data)")
        shape = obj[_KEY_SHAPE]
        if type(shape) is not list:
            raise DecodeError("tensor shape must be an array")
        for dim in shape:  # spec 8.6: step 1 (types) for every dimension before step 2 (limits)
            if type(dim) is not int or dim < 0:
                raise DecodeError(f"tensor dimension {dim!r} is not a non-negative integer")
        if len(shape) > limits.max_tensor_dims:
            raise LimitExceeded(f"tensor has {len(shape)} dimensions, the limit is {limits.max_tensor_dims}")
        for dim in shape:
            if dim > limits.max_tensor_elements:
                raise LimitExceeded(f"tensor dimension {dim} exceeds {limits.max_tensor_elements} elements")
        numel = math.prod(shape)
        if numel > limits.max_tensor_elements:
            raise LimitExceeded(f"tensor of {numel} elements exceeds the limit {limits.max_tensor_elements}")
        absmax = obj.get(_KEY_ABSMAX)
        blocksize = obj.get(_KEY_BLOCKSIZE)
        # Present keys must hold real values: null would re-encode differently.
        if _KEY_ABSMAX in obj and type(absmax) is not bytes:
            raise DecodeError("tensor absmax must be bytes")
        if _KEY_BLOCKSIZE in obj and type(blocksize) is not int:
            raise DecodeError("tensor blocksize must be an integer")
        return cls(
            dtype=obj[_KEY_DTYPE], shape=tuple(shape), data=obj[_KEY_DATA], absmax=absmax, blocksize=blocksize
        )

    def digest(self) -> bytes:
        """BLAKE2b-256 of the deterministic CBOR encoding: H(tensor) in signed statements.

        Hashed piece by piece in the encoding's order (keys 0..4 are one byte each and
        sorted), so the data is never copied into an encoding first: the same bytes as
        ``blake2b(_cbor.encode(self.to_cbor()))``, at the cost of the hash alone.
        """
        h = hashlib.blake2b(digest_size=32)
        quantized = self.absmax is not None
        h.update(bytes([0xA0 + (5 if quantized else 3)]))  # a map of 3 or 5 pairs
        h.update(b"\x00" + _cbor.encode(self.dtype) + b"\x01" + _cbor.encode(list(self.shape)) + b"\x02")
        h.update(_bstr_header(len(self.data)))
        h.update(self.data)
        if quantized:
            assert self.absmax is not None and self.blocksize is not None
            h.update(b"\x03" + _bstr_header(len(self.absmax)))
            h.update(self.absmax)
            h.update(b"\x04" + _cbor.encode(self.blocksize))
        return h.digest()


def _bstr_header(length: int) -> bytes:
    """The CBOR head of a byte string of ``length`` bytes, in its shortest form."""
    if length < 24:
        return bytes([0x40 + length])
    for marker, size in ((0x58, 1), (0x59, 2), (0x5A, 4), (0x5B, 8)):
        if length < 1 << (8 * size):
            return bytes([marker]) + length.to_bytes(size, "big")
    raise LocalProtocolError("byte string too long for CBOR")


def encode_tensor(t: torch.Tensor, dtype: str = "f32", *, blocksize: int = 4096) -> WireTensor:
    """Encode a floating-point tensor (any device) in a wire dtype.

    Lossless when ``t`` already has the dtype (f32/f16/bf16). Otherwise the values
    are rounded to nearest, ties to even: first to float32 (when ``t`` is neither
    float32 nor the target), then to the target; f16 overflows to infinity. ``q8`` and
    ``nf4`` quantize blockwise with ``blocksize`` (one of BLOCKSIZES) and need finite
    values. Raises LocalProtocolError for a bad argument.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise LocalProtocolError("encode_tensor needs a floating-point torch.Tensor")
    if dtype not in DTYPES:
        raise LocalProtocolError(f"unknown tensor dtype {dtype!r}")
    if t.dim() > DEFAULT_LIMITS.max_tensor_dims:
        raise LocalProtocolError(f"tensor has {t.dim()} dimensions, at most {DEFAULT_LIMITS.max_tensor_dims}")
    shape = tuple(int(d) for d in t.shape)
    x = t.detach()
    if dtype in LOSSLESS:
        target = _TORCH_DTYPES[dtype]
        if x.dtype not in (target, torch.float32):
            x = x.to(torch.float32)  # one documented path: never round twice by accident
        x = x.to(target).contiguous().cpu()
        return WireTensor(dtype=dtype, shape=shape, data=_le_bytes(x))
    if type(blocksize) is not int or blocksize not in BLOCKSIZES:
        raise LocalProtocolError(f"blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    codes, absmax = _quantize(x.to(torch.float32).reshape(-1), dtype, blocksize)
    if dtype == "nf4":
        codes = _pack_nibbles(codes)
    return WireTensor(
        dtype=dtype,
        shape=shape,
        data=_le_bytes(codes.cpu()),
        absmax=_le_bytes(absmax.cpu()),
        blocksize=blocksize,
    )


def _quantize(x: torch.Tensor, dtype: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per element) and per-block absmax (float32) of a flat float32 x."""
    n = x.numel()
    blocks = -(-n // blocksize)
    if not blocks:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.empty(0, device=x.device)
    # Zero padding changes no block's max |x|; the padded codes are dropped.
    if n % blocksize:
        x = torch.nn.functional.pad(x, (0, blocks * blocksize - n))
    x = x.view(blocks, blocksize)
    absmax = x.abs().amax(dim=1)  # abs: +0.0 for an all-zero block, never -0.0
    if not bool(torch.isfinite(absmax).all()):  # amax propagates NaN; a cheap check per block
        raise LocalProtocolError("q8 and nf4 can only encode finite values")
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # all-zero block: codes of 0.0
    scaled = (x / scale.unsqueeze(1)).view(-1)
    return _codes_of(scaled, dtype)[:n], absmax


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_PAD_CODE)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]  # even element in the high nibble


def decode_tensor(
    wt: WireTensor,
    *,
    limits: Limits = DEFAULT_LIMITS,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode a WireTensor into a new tensor on ``device``.

    f32/f16/bf16 decode to that torch dtype and q8/nf4 to float32, unless
    ``out_dtype`` (a floating dtype) is given; the conversion rounds to nearest.
    Allocates nothing larger than the tensor's element count. Raises LimitExceeded
    if ``wt`` is over ``limits``, LocalProtocolError for bad arguments.
    """
    if not isinstance(wt, WireTensor):
        raise LocalProtocolError("decode_tensor needs a WireTensor")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise LocalProtocolError(f"out_dtype {out_dtype!r} is not a floating-point torch dtype")
    if len(wt.shape) > limits.max_tensor_dims:
        raise LimitExceeded(f"tensor has {len(wt.shape)} dimensions, the limit is {limits.max_tensor_dims}")
    n = wt.numel
    if n > limits.max_tensor_elements:
        raise LimitExceeded(f"tensor of {n} elements exceeds the limit of {limits.max_tensor_elements}")
    natural = _TORCH_DTYPES.get(wt.dtype, torch.float32)
    if n == 0:
        return torch.empty(wt.shape, dtype=out_dtype or natural, device=device)
    if wt.dtype in LOSSLESS:
        t = _from_le(wt.data, natural, wt.shape)
        if device != "cpu":  # the common case skips a no-op call that costs microseconds
            t = t.to(device)
    else:
        t = _dequantize(wt, n, torch.device(device)).view(wt.shape)
    if out_dtype is not None and out_dtype != t.dtype:
        t = t.to(out_dtype)
    return t


def _dequantize(wt: WireTensor, n: int, device: torch.device) -> torch.Tensor:
    assert wt.absmax is not None and wt.blocksize is not None  # validated on construction
    raw = _from_le(wt.data, torch.uint8)
    absmax = _from_le(wt.absmax, torch.float32)
    if device.type != "cpu":
        raw, absmax = raw.to(device), absmax.to(device)
    raw = raw.to(torch.int32)
    if wt.dtype == "nf4":  # one lookup per byte yields both of its elements
        out = torch.index_select(_nf4_pairs(device), 0, raw).view(-1)[:n]
    else:
        out = torch.index_select(_tables(wt.dtype, device)[0], 0, raw)
    bs = wt.blocksize
    full = n // bs
    if full:
        out[: full * bs].view(full, bs).mul_(absmax[:full].unsqueeze(1))
    if n > full * bs:
        out[full * bs :].mul_(absmax[full])
    return out
