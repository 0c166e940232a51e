"""Tensor codec conformance (spec/SPEC.md, "Tensors"): round trips, a scalar reference
codec written straight from the spec text, and the decoder oracle: anything handed to
WireTensor.from_cbor gives a WireTensor or a ProtocolError, never another exception."""

from __future__ import annotations

import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Limits, ProtocolError, cbor_decode, cbor_encode
from protocol._tensor import (
    BLOCKSIZES,
    DTYPES,
    NF4_CODEBOOK,
    NF4_PAD_CODE,
    Q8_CODEBOOK,
    WireTensor,
    _data_length,
    _thresholds,
    decode_tensor,
    encode_tensor,
)

SMALL = Limits(max_message_size=1 << 16, max_tensor_elements=256)
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_BOOKS = {"q8": Q8_CODEBOOK, "nf4": NF4_CODEBOOK}


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --- strategies --------------------------------------------------------------------

shapes = st.lists(st.integers(0, 6), max_size=4).map(tuple)
small_blocksizes = st.sampled_from(BLOCKSIZES[:2])  # 64 and 128: several blocks in small tensors
absmax_values = st.floats(0, 2.0**100, width=32)


@st.composite
def wire_tensors(draw) -> WireTensor:
    """Any valid WireTensor: random data bytes, valid scales, canonical padding."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    numel = 1
    for dim in shape:
        numel *= dim
    length = _data_length(dtype, numel)
    data = bytearray(draw(st.binary(min_size=length, max_size=length)))
    if dtype not in _BOOKS:
        return WireTensor(dtype=dtype, shape=shape, data=bytes(data))
    if dtype == "nf4" and numel % 2:
        data[-1] = (data[-1] & 0xF0) | NF4_PAD_CODE
    blocksize = draw(small_blocksizes)
    blocks = -(-numel // blocksize)
    scales = draw(st.lists(absmax_values, min_size=blocks, max_size=blocks))
    return WireTensor(
        dtype=dtype,
        shape=shape,
        data=bytes(data),
        absmax=struct.pack(f"<{blocks}f", *scales),
        blocksize=blocksize,
    )


@st.composite
def float_tensors(draw, *, finite: bool) -> torch.Tensor:
    shape = draw(shapes)
    numel = 1
    for dim in shape:
        numel *= dim
    floats = st.floats(width=32, allow_nan=not finite, allow_infinity=not finite)
    values = draw(st.lists(floats, min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


_atoms = (
    st.integers(-(2**64), 2**64 - 1)
    | st.integers(-2, 70)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=8)
    | st.sampled_from(DTYPES)
)
cbor_values = st.recursive(
    _atoms,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(0, 23) | st.text(max_size=3), inner, max_size=6),
    max_leaves=12,
)
# Maps that look like tensors, so the oracle reaches the deep checks, not just the first.
near_tensors = st.dictionaries(
    st.sampled_from([0, 1, 2, 3, 4, 5]),
    st.sampled_from(DTYPES)
    | st.lists(st.integers(0, 300) | st.booleans(), max_size=5)
    | st.binary(max_size=40)
    | st.sampled_from([64, 128, True, 0, 100])
    | st.none(),
    min_size=2,
    max_size=6,
)


# --- a scalar reference codec, written from the spec text -------------------------------------


def _reference_decode(wt: WireTensor) -> list[float]:
    if wt.dtype == "f32":
        return list(struct.unpack(f"<{wt.numel}f", wt.data))
    if wt.dtype == "f16":
        return list(struct.unpack(f"<{wt.numel}e", wt.data))
    if wt.dtype == "bf16":  # the high half of a float32
        return [struct.unpack("<f", b"\0\0" + wt.data[i : i + 2])[0] for i in range(0, len(wt.data), 2)]
    assert wt.absmax is not None
    assert wt.blocksize is not None
    if wt.dtype == "q8":
        codes = list(wt.data)
    else:
        codes = [nibble for byte in wt.data for nibble in (byte >> 4, byte & 15)][: wt.numel]
    scales = struct.unpack(f"<{len(wt.absmax) // 4}f", wt.absmax)
    book = _BOOKS[wt.dtype]
    return [_f32(book[c] * scales[i // wt.blocksize]) for i, c in enumerate(codes)]


def _reference_codes(values: list[float], dtype: str, blocksize: int) -> tuple[list[int], list[float]]:
    cuts = _thresholds(_BOOKS[dtype])
    codes, scales = [], []
    for start in range(0, len(values), blocksize):
        block = values[start : start + blocksize]
        absmax = max(abs(v) for v in block)
        scales.append(absmax)
        for v in block:
            s = _f32(v / absmax) if absmax else 0.0  # double then float32: correctly rounded
            codes.append(sum(1 for c in cuts if c < s))
    return codes, scales


def _same_bits(a: list[float], b: list[float]) -> bool:
    return struct.pack(f"<{len(a)}f", *a) == struct.pack(f"<{len(b)}f", *b)


# --- properties ------------------------------------------------------------------------------


@given(wire_tensors())
def test_wire_tensor_round_trips_through_cbor(wt):
    assert WireTensor.from_cbor(wt.to_cbor()) == wt
    wire = cbor_encode(wt.to_cbor())
    assert WireTensor.from_cbor(cbor_decode(wire, max_size=len(wire))) == wt


@given(wire_tensors())
def test_decode_matches_the_scalar_reference(wt):
    out = decode_tensor(wt)
    assert tuple(out.shape) == wt.shape
    assert out.dtype == _TORCH.get(wt.dtype, torch.float32)
    got, want = out.float().reshape(-1).tolist(), _reference_decode(wt)
    if wt.dtype in _TORCH:
        # The element bits are the wire bits (struct converts NaN payloads on its way
        # through binary64, so NaNs are compared as NaNs).
        bits = torch.int16 if out.element_size() == 2 else torch.int32
        assert out.reshape(-1).view(bits).numpy().astype(f"<i{out.element_size()}").tobytes() == wt.data
        got = [0.0 if g != g and w != w else g for g, w in zip(got, want)]
        want = [0.0 if w != w else w for w in want]
    assert _same_bits(got, want)


@given(float_tensors(finite=False), st.sampled_from(sorted(_TORCH)))
def test_lossless_round_trip_is_exact(t, dtype):
    t = t.to(_TORCH[dtype])
    back = decode_tensor(encode_tensor(t, dtype))
    assert back.dtype == t.dtype
    assert back.shape == t.shape
    bits = torch.int16 if t.element_size() == 2 else torch.int32
    assert torch.equal(back.view(bits), t.view(bits))  # NaN payloads and -0.0 included


@given(float_tensors(finite=True), st.sampled_from(["q8", "nf4"]), small_blocksizes)
def test_quantized_encoding_matches_the_scalar_reference(t, dtype, blocksize):
    wt = encode_tensor(t, dtype, blocksize=blocksize)
    values = t.reshape(-1).tolist()
    codes, scales = _reference_codes(values, dtype, blocksize)
    assert wt.absmax == struct.pack(f"<{len(scales)}f", *scales)
    packed = codes
    if dtype == "nf4":
        padded = codes + [NF4_PAD_CODE] * (len(codes) % 2)
        packed = [(hi << 4) | lo for hi, lo in zip(padded[::2], padded[1::2])]
    assert wt.data == bytes(packed)
    assert WireTensor.from_cbor(wt.to_cbor()) == wt


def _oracle(obj) -> None:
    try:
        wt = WireTensor.from_cbor(obj, limits=SMALL)
    except ProtocolError:
        return
    assert isinstance(wt, WireTensor)
    assert wt.numel <= SMALL.max_tensor_elements
    assert wt.to_cbor() == obj  # what is accepted is canonical
    decode_tensor(wt, limits=SMALL)


@settings(max_examples=100)
@given(cbor_values)
def test_arbitrary_values_give_a_tensor_or_a_protocol_error(obj):
    _oracle(obj)


@given(near_tensors)
def test_near_tensor_maps_give_a_tensor_or_a_protocol_error(obj):
    _oracle(obj)


@given(wire_tensors(), st.integers(0, 200), st.integers(0, 255))
def test_corrupted_encodings_give_a_tensor_or_a_protocol_error(wt, position, value):
    wire = bytearray(cbor_encode(wt.to_cbor()))
    wire[position % len(wire)] = value
    try:
        obj = cbor_decode(bytes(wire), max_size=len(wire))
    except ProtocolError:
        return
    _oracle(obj)
