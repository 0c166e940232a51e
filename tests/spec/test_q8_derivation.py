"""Section 8.5's informative q8 derivation, followed literally in exact rational
arithmetic: one rounding per RN32 of the exact value reproduces the normative table,
and rounding every binary32 operation (what the 1.0 text suggested) does not: it gives
42 different codes, the number the spec states."""

from __future__ import annotations

import re
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

SPEC = Path(__file__).resolve().parents[2] / "spec" / "SPEC.md"


def rn32(x: Fraction) -> Fraction:
    """x rounded once to the nearest binary32 (ties to even); normal range only."""
    if x == 0:
        return Fraction(0)
    sign, x = (-1 if x < 0 else 1), abs(x)
    exponent = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** exponent > x:
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= x:
        exponent += 1
    scale = Fraction(2) ** (exponent - 23)  # 24 significant bits
    q, r = divmod(x / scale, 1)
    q = int(q)
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and q % 2):
        q += 1
    return sign * q * scale


def _table() -> list[int]:
    """The normative codebook's bit patterns, read from the spec's table."""
    text = SPEC.read_text().split("**`q8`**", 1)[1].split("### 8.6", 1)[0]
    return [int(h, 16) for h in re.findall(r"^\| \d+ \| `(0x[0-9a-f]{8})`", text, flags=re.M)]


def _bits(x: Fraction) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def _spec_derivation() -> list[int]:
    values = [Fraction(0), Fraction(1)]
    a = rn32(Fraction(1, 10))
    for i in range(7):
        n = 2**i + 1
        step = rn32(1 - a) / 2**i
        points = [rn32(a + j * step) if j < n // 2 else rn32(1 - (n - 1 - j) * step) for j in range(n)]
        scale = rn32(Fraction(10) ** (i - 6))
        for lo, hi in zip(points, points[1:]):
            m = rn32(lo + hi) / 2
            values += [rn32(m * scale), -rn32(m * scale)]
    return [_bits(v) for v in sorted(values)]


def _binary32_every_step() -> list[int]:
    f = np.float32
    values = [f(0.0), f(1.0)]
    a = f(0.1)
    for i in range(7):
        n = 2**i + 1
        step = f(f(1.0) - a) / f(2**i)
        points = [f(a + f(step * f(j))) if j < n // 2 else f(f(1.0) - f(step * f(n - 1 - j))) for j in range(n)]
        scale = f(10.0 ** (i - 6))
        for lo, hi in zip(points, points[1:]):
            m = f(f(lo + hi) / f(2))
            values += [f(m * scale), -f(m * scale)]
    return [_bits(Fraction(float(v))) for v in sorted(values)]


def test_single_rounding_reproduces_the_normative_table():
    table = _table()
    assert len(table) == 256
    assert _spec_derivation() == table


def test_rounding_every_operation_differs_in_the_number_of_codes_the_spec_states():
    differing = sum(x != y for x, y in zip(_binary32_every_step(), _table()))
    stated = int(re.search(r"gives (\d+) codes that differ", SPEC.read_text()).group(1))
    assert differing == stated == 42


def test_the_tensor_codec_uses_the_table():
    from protocol._tensor import Q8_CODEBOOK

    assert [_bits(Fraction(v)) for v in Q8_CODEBOOK] == _table()
