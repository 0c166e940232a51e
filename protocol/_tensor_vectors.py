"""Test vectors for the tensor codecs (spec/SPEC.md, "Tensors"; spec/vectors/tensors.json).

Each vector names a small float32 input, the wire dtype (and blocksize) it is encoded
in, the deterministic CBOR of the resulting map, its digest and the exact decoded
values. Inputs are chosen to hit the edges of the spec: negative zero, subnormals,
rounding ties of f16 and bf16, values exactly on a quantization threshold (which take
the lower code), a short last block, an all-zero block, an odd nf4 element count
(padding nibble), a scalar and empty tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _cbor
from ._tensor import NF4_CODEBOOK, Q8_CODEBOOK, _f32, _thresholds, decode_tensor, encode_tensor

__all__ = ["make_tensor_vectors"]


def _ramp(n: int, modulus: int, denominator: float) -> list[float]:
    """Deterministic mixed-sign values, exact in float32 (small multiples of 1/denominator)."""
    return [((i * 37) % modulus - modulus // 2) / denominator for i in range(n)]


def _q8_input() -> list[float]:
    cuts = _thresholds(Q8_CODEBOOK)
    block0 = _ramp(64, 41, 32.0)
    # Block 0 has absmax 1.0, so these scale to themselves: exact ties, lower code wins.
    block0[:6] = [1.0, 0.0, -0.0, cuts[127], cuts[200], cuts[30]]
    block1 = _ramp(36, 29, 4.0)
    block1[0] = -3.75  # the block's largest magnitude is negative: scales to -1
    return block0 + block1


def _nf4_input() -> list[float]:
    cuts = _thresholds(NF4_CODEBOOK)
    block0 = _ramp(64, 23, 8.0)
    # absmax -2.0: doubling is exact, so these three scale back to exact threshold ties.
    block0[:5] = [-2.0, 0.0, 2 * cuts[7], 2 * cuts[3], 2 * cuts[12]]
    block1 = _ramp(11, 13, 2.0)  # 75 elements in all: a short block and a padding nibble
    return block0 + block1


# (name, dtype, blocksize or None, shape, input)
_CASES: list[tuple[str, str, int | None, list[int], list[float]]] = [
    # -0.0, the largest finite float32 and the smallest subnormal
    ("f32_specials", "f32", None, [2, 3], [0.0, -0.0, 1.5, -2.25, 3.4028234663852886e38, 1.4e-45]),
    ("f32_scalar", "f32", None, [], [-7.5]),
    ("f32_empty", "f32", None, [0, 4], []),
    ("f16_exact", "f16", None, [4], [0.0, -1.0, 0.5, 65504.0]),
    # f32 -> f16 rounds to nearest, ties to even: 2049 -> 2048, 2051 -> 2052; 1e-6 -> subnormal.
    ("f16_rounded", "f16", None, [2, 3], [0.1, -1 / 3, 1e-6, 2049.0, 2051.0, -0.0]),
    # f32 -> bf16 likewise: 1 + 2**-8 -> 1.0, 1 + 3 * 2**-8 -> 1 + 2**-6.
    ("bf16_rounded", "bf16", None, [5], [0.1, -1 / 3, 1.00390625, 1.01171875, -0.0]),
    ("bf16_scalar", "bf16", None, [], [3.140625]),
    ("q8_two_blocks", "q8", 64, [2, 50], _q8_input()),
    ("q8_zero_block", "q8", 64, [3], [0.0, -0.0, 0.0]),
    ("q8_empty", "q8", 64, [0], []),
    ("nf4_odd", "nf4", 64, [75], _nf4_input()),
    ("nf4_single", "nf4", 128, [1, 1], [-0.5]),
]


def _floats(t: torch.Tensor) -> list[float]:
    # float() of a float32/f16/bf16 element is exact; repr of it round-trips as binary64.
    return [float(v) for v in t.reshape(-1).tolist()]


def make_tensor_vectors() -> list[dict[str, Any]]:
    """The tensor test vectors as JSON-able dicts (written to spec/vectors/tensors.json)."""
    vectors = []
    for name, dtype, blocksize, shape, values in _CASES:
        values = [_f32(v) for v in values]  # inputs are float32 by definition
        t = torch.tensor(values, dtype=torch.float32).reshape(shape)
        wt = encode_tensor(t, dtype, blocksize=blocksize or 4096)
        entry: dict[str, Any] = {
            "name": name,
            "dtype": dtype,
            "shape": shape,
            "input": values,
            "cbor_hex": _cbor.encode(wt.to_cbor()).hex(),
            "digest_hex": wt.digest().hex(),
            "decoded": _floats(decode_tensor(wt)),
        }
        if blocksize is not None:
            entry["blocksize"] = blocksize
        vectors.append(entry)
    return vectors
