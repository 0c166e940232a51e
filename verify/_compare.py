"""Comparing a hop's hidden states with an independent recomputation (spec
"Verification", "Comparison").

Theory of operation. Two honest peers running the same blocks on the same input do
not return identical bits: a KV-cache decode step and a one-shot forward of the whole
prefix sum in different orders, thread counts split reductions differently, and a
lossy wire dtype rounds the output. So the audit compares with tolerances, and uses
three statistics per row (token) of the disputed step, each with its own threshold:

- relative L2 error ``||claimed - ref|| / ||ref||`` (catches noise, wrong weights,
  quantized weights, skipped blocks: anything that moves the whole vector);
- cosine similarity (scale-free; catches a rescaled or rotated output that a small
  relative error on a huge-norm residual stream could hide);
- top-k index agreement, TOPLOC-style: the share of the ``k`` largest-magnitude
  coordinates of the reference that are also among the claimed row's ``k`` largest
  (catches an output with the right norm and direction but the wrong fine structure,
  e.g. a replayed output of another step).

A row mismatches if any statistic is outside its threshold; a step mismatches if any
of its rows does. Thresholds depend on the precision class (the coarser of the compute
dtype the swarm expects and the session's wire dtype) and grow with span depth
(rounding differences compound through the residual stream, roughly linearly in the
measurements). The numbers below come from ``python bench/calibrate.py`` (see that
module and the spec for the measured maxima); each threshold is the largest honest
value measured times ``MARGIN`` (see the constants for the exceptions and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "MARGIN",
    "Comparison",
    "Tolerance",
    "TOLERANCES",
    "compare",
    "first_mismatch",
    "row_statistics",
    "tolerance_for",
    "topk_size",
]

#: Safety factor between the largest honest disagreement measured and a threshold.
MARGIN = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Tolerance:
    """Thresholds of one precision class at span depth ``d`` (blocks):
    ``rel_l2 <= rel_l2_base + rel_l2_per_block * d``, ``cosine >= 1 - cos_gap(d)`` with
    the same shape, and ``topk >= topk_min``."""

    rel_l2_base: float
    rel_l2_per_block: float
    cos_gap_base: float
    cos_gap_per_block: float
    topk_min: float

    def __post_init__(self) -> None:
        values = (self.rel_l2_base, self.rel_l2_per_block, self.cos_gap_base, self.cos_gap_per_block)
        if min(values) < 0 or not 0 <= self.topk_min <= 1:
            raise ValueError("tolerances must be non-negative and topk_min in [0, 1]")

    def max_rel_l2(self, depth: int) -> float:
        return self.rel_l2_base + self.rel_l2_per_block * depth

    def max_cos_gap(self, depth: int) -> float:
        return self.cos_gap_base + self.cos_gap_per_block * depth


# Calibrated by ``python bench/calibrate.py --smollm`` (fp32 on CPU, 2 threads; the
# run is recorded in the spec, "Verification", "Calibration"). Largest honest values
# over the tiny random Llamas (hidden 64 and 256, depth 1-6) and SmolLM2-135M spans
# (depth 1, 3, 10, 30; 24 decode steps after a 12-token prefill), incremental decode
# vs one-shot FORWARD_ONCE of the prefix and 1 vs 2 threads (threads: bit-identical):
#   rel L2  <= 6.9e-7 + 3.6e-8 * depth   (max 1.42e-6, SmolLM2 depth 30)
#   1 - cos <= 9.1e-13                    (SmolLM2 depth 30)
#   top-k agreement = 1.00 everywhere
# Thresholds: rel L2 x MARGIN; 1 - cos x MARGIN^2 (it is quadratic in the error, so this
# is the same x10 margin on the error's size); top-k 0.5. The smallest cheat measured
# (int8 weights, one tiny block) has rel L2 6.5e-3, 300x above the depth-30 threshold;
# int8 weights on SmolLM2 spans give 1.5e-2 (depth 1) to 5.7e-2 (depth 30).
_F32 = Tolerance(rel_l2_base=7e-6, rel_l2_per_block=3.6e-7, cos_gap_base=5e-11, cos_gap_per_block=2e-12,
                 topk_min=0.5)
# Lossy wire dtypes: the claimed output was rounded to the wire dtype, the auditor's
# reference was not. Same runs, honest f32 output vs its wire round trip:
#   f16:  rel L2 <= 3.3e-4 + 2.3e-6 * depth, 1-cos <= 5.3e-8, top-k >= 0.94
#   bf16: rel L2 <= 2.4e-3 + 1.3e-5 * depth, 1-cos <= 2.5e-6, top-k >= 0.72
#   q8:   rel L2 <= 8.6e-2 + 6.7e-4 * depth, 1-cos <= 3.8e-3, top-k >= 0.72 (SmolLM2's
#         outlier dimensions dominate each block's absmax)
# f16/bf16 take the same x10 (x100 on 1-cos) margin; q8 a x3 (x9) margin, because wire
# rounding is bounded (half a code step per element), not heavy-tailed, and x10 would
# accept almost anything. Consequence, stated in the spec: on a bf16 or q8 wire an
# int8-weights cheat (rel L2 1.5e-2 to 5.7e-2) hides under the wire's own rounding;
# clients that want to catch it audit with the f32 wire (the default).
# fp16/bf16 *compute* was not measured (no GPU on the build machines): these classes
# only cover the wire rounding and must be re-calibrated on a GPU before a swarm
# computes in 16 bits.
# nf4 has no entry: its round trip loses whole rows of SmolLM2 hidden states (rel L2
# 1.0: one outlier per 4096-element block), so an nf4 wire cannot be audited.
_F16 = Tolerance(rel_l2_base=3.3e-3, rel_l2_per_block=2.3e-5, cos_gap_base=5.3e-6, cos_gap_per_block=0.0,
                 topk_min=0.5)
_BF16 = Tolerance(rel_l2_base=2.4e-2, rel_l2_per_block=1.3e-4, cos_gap_base=2.5e-4, cos_gap_per_block=0.0,
                  topk_min=0.4)
_Q8 = Tolerance(rel_l2_base=0.26, rel_l2_per_block=2e-3, cos_gap_base=3.4e-2, cos_gap_per_block=0.0,
                topk_min=0.3)

#: Precision class -> thresholds.
TOLERANCES: dict[str, Tolerance] = {"f32": _F32, "f16": _F16, "bf16": _BF16, "q8": _Q8}
_COARSENESS = ("f32", "f16", "bf16", "q8", "nf4")


def tolerance_for(*dtypes: str) -> Tolerance:
    """The thresholds of the coarsest of ``dtypes`` (compute and wire dtypes)."""
    if not dtypes:
        raise ValueError("give at least one dtype")
    for d in dtypes:
        if d not in TOLERANCES:
            raise ValueError(f"no calibrated tolerance for dtype {d!r} (auditable: {', '.join(TOLERANCES)}); "
                             "audit sessions with a lossless or q8 wire dtype")
    return TOLERANCES[max(dtypes, key=_COARSENESS.index)]


def topk_size(hidden_size: int) -> int:
    """k of the top-k statistic: 1/16 of the hidden size, between 4 and 128 (TOPLOC uses 128)."""
    return max(4, min(128, hidden_size // 16))


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """The worst row's statistics of one step and the verdict."""

    rel_l2: float
    cosine: float
    topk: float
    ok: bool
    reason: str = ""

    def __str__(self) -> str:
        verdict = "match" if self.ok else f"mismatch ({self.reason})"
        return f"{verdict}: rel_l2={self.rel_l2:.3g} cos={self.cosine:.12f} topk={self.topk:.2f}"


def row_statistics(claimed: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (rel L2, cosine, top-k agreement) of two ``[..., hidden]`` tensors, in float64."""
    if claimed.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(claimed.shape)} vs {tuple(reference.shape)}")
    a = claimed.detach().reshape(-1, claimed.shape[-1]).to(torch.float64)
    b = reference.detach().reshape(-1, reference.shape[-1]).to(torch.float64)
    ref_norm = b.norm(dim=-1)
    rel = (a - b).norm(dim=-1) / ref_norm.clamp_min(1e-30)
    cos = (a * b).sum(dim=-1) / (a.norm(dim=-1) * ref_norm).clamp_min(1e-300)
    k = min(topk_size(a.shape[-1]), a.shape[-1])
    top_a = a.abs().topk(k, dim=-1).indices
    top_b = b.abs().topk(k, dim=-1).indices
    agree = (top_a.unsqueeze(-1) == top_b.unsqueeze(-2)).any(dim=-1).sum(dim=-1).to(torch.float64) / k
    return rel, cos, agree


def compare(claimed: torch.Tensor, reference: torch.Tensor, *, tolerance: Tolerance, depth: int) -> Comparison:
    """Whether ``claimed`` is an honest computation of what ``reference`` recomputed.

    Args:
        claimed, reference: ``[1, n, hidden]`` hidden states of the same rows.
        tolerance: the precision class's thresholds (``tolerance_for``).
        depth: blocks in the span that produced them.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    if not (torch.isfinite(claimed).all() and torch.isfinite(reference).all()):
        # An honest fp32 span never overflows on the inputs it was sent; a NaN/inf is a cheat
        # unless the reference has it too (then both are equally broken and we cannot tell).
        same = torch.equal(torch.isfinite(claimed), torch.isfinite(reference))
        return Comparison(rel_l2=math.inf, cosine=-1.0, topk=0.0, ok=same, reason="non-finite values")
    rel, cos, agree = row_statistics(claimed, reference)
    worst = Comparison(rel_l2=float(rel.max()), cosine=float(cos.min()), topk=float(agree.min()), ok=True)
    reasons = []
    if worst.rel_l2 > tolerance.max_rel_l2(depth):
        reasons.append(f"rel_l2 {worst.rel_l2:.3g} > {tolerance.max_rel_l2(depth):.3g}")
    if 1.0 - worst.cosine > tolerance.max_cos_gap(depth):
        reasons.append(f"1-cos {1.0 - worst.cosine:.3g} > {tolerance.max_cos_gap(depth):.3g}")
    if worst.topk < tolerance.topk_min:
        reasons.append(f"top-k agreement {worst.topk:.2f} < {tolerance.topk_min:.2f}")
    if reasons:
        return Comparison(rel_l2=worst.rel_l2, cosine=worst.cosine, topk=worst.topk, ok=False,
                          reason="; ".join(reasons))
    return worst


def first_mismatch(claimed: torch.Tensor, reference: torch.Tensor, *, tolerance: Tolerance, depth: int) -> int | None:
    """The index of the first row of ``[1, n, hidden]`` tensors that ``compare`` would
    reject, or None if every row matches (used to find where a cheater's unaudited
    outputs started to go wrong)."""
    rel, cos, agree = row_statistics(claimed, reference)
    finite = torch.isfinite(claimed.reshape(-1, claimed.shape[-1])).all(dim=-1)
    bad = (~finite) | (rel > tolerance.max_rel_l2(depth)) | ((1 - cos) > tolerance.max_cos_gap(depth)) \
        | (agree < tolerance.topk_min)
    rows = torch.nonzero(bad).flatten()
    return int(rows[0]) if rows.numel() else None
