"""The verdict on a disputed output: guilty only far outside the honest spread of
these very inputs (spec 13.3 "Verdict").

Theory of operation. The calibrated thresholds of ``verify._compare`` hold for real
activations. A client can sign any input, though, and on inputs no model produces
(random hidden states, huge or tiny rows) two honest computations of the same span
can differ by more than those thresholds. So a conviction does not rest on the
thresholds alone: the verifier recomputes the disputed output twice on its own
hardware,

- ``session``: step by step with a KV cache, exactly as the proof's requests were
  sent (what the accused ran), and
- ``once``: one pass over the whole prefix (what an auditor runs),

- ``exact``: when the verifier can (an unquantized span), one pass in float64: the
  near-exact answer that honest float32 rounding scatters around,

and takes, row by row, the disagreement of the two float32 recomputations and their
distance from the float64 one as the *honest spread* of these inputs on this span:
how much rounding alone moves the result. (Two float32 paths can share most of their
rounding and agree closely while both sit far from the exact value; an honest peer
with other hardware then lands elsewhere at that distance: the float64 pass catches
what their agreement hides.) For a lossy wire dtype the verifier also rounds its own
session output through the wire (the *wire spread*). A row of the accused's output
convicts only if it is farther than

    T = max(floor, SPREAD_FACTOR * max(honest spread, wire spread))

from *every* recomputation, per statistic (relative L2 with ``SPREAD_FACTOR``; the
cosine gap, quadratic in the error, with ``SPREAD_FACTOR ** 2``), where ``floor`` is
the calibrated threshold of the precision class at the span's depth. Top-k agreement
convicts only on rows whose k-th and (k+1)-th largest magnitudes are farther apart
than ``SPREAD_FACTOR`` times the largest element-wise spread (elsewhere the top-k
set is decided by rounding). Non-finite recomputations, or a session output that the
wire dtype cannot represent, make the verdict *inconclusive*: never a conviction.

Pure torch; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from protocol import decode_tensor, encode_tensor

from ._compare import Tolerance, topk_size

__all__ = ["SPREAD_FACTOR", "Verdict", "judge"]

#: How far outside the honest spread a conviction must be (the calibration MARGIN).
SPREAD_FACTOR = 10.0
#: A session output above this share of the wire dtype's largest finite value is
#: too close to overflow for an honest rounding to be told from a cheat.
_RANGE_SHARE = 0.5
_LOSSLESS = ("f32",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The outcome of ``judge``: ``guilty``, or not (then ``inconclusive`` says whether
    the inputs were beyond judging rather than the output honest)."""

    guilty: bool
    inconclusive: bool = False
    reason: str = ""
    rel_l2: float = 0.0  # the accused's worst row, against the nearer recomputation
    cos_gap: float = 0.0
    spread: float = 0.0  # the honest (or wire) spread of the worst row, relative L2
    threshold: float = 0.0  # the relative L2 the worst row had to exceed

    @property
    def ok(self) -> bool:
        """True unless the accused is convicted (``Comparison.ok``'s sense)."""
        return not self.guilty

    def __str__(self) -> str:
        what = "guilty" if self.guilty else ("inconclusive" if self.inconclusive else "honest")
        return (f"{what}: rel_l2={self.rel_l2:.3g} (threshold {self.threshold:.3g}, honest spread {self.spread:.3g}), "
                f"1-cos={self.cos_gap:.3g}" + (f"; {self.reason}" if self.reason else ""))


def judge(claimed: torch.Tensor, session: torch.Tensor, once: torch.Tensor, *, wire_dtype: str,
          tolerance: Tolerance, depth: int, exact: torch.Tensor | None = None) -> Verdict:
    """Whether ``claimed`` ([1, n, H], the accused's output decoded to float32) is far
    outside what an honest peer computes for these inputs; see the module docstring.

    Args:
        session, once: the verifier's two recomputations of the same rows.
        exact: its float64 recomputation of them, if it has one.
        wire_dtype: the dtype the accused's output travelled in.
        tolerance, depth: the calibrated floor (``tolerance_for``) and the span depth.
    """
    if not claimed.shape == session.shape == once.shape or (exact is not None and exact.shape != claimed.shape):
        raise ValueError(f"shapes differ: {tuple(claimed.shape)}, {tuple(session.shape)}, {tuple(once.shape)}")
    y, a, b = (t.detach().reshape(-1, t.shape[-1]).to(torch.float64) for t in (claimed, session, once))
    c = None if exact is None else exact.detach().reshape(a.shape).to(torch.float64)
    if not all(bool(torch.isfinite(t).all()) for t in (a, b) + (() if c is None else (c,))):
        return Verdict(guilty=False, inconclusive=True, reason="the span's own recomputation is not finite")
    a_wire = a
    if wire_dtype not in _LOSSLESS:
        limit = _largest_finite(wire_dtype)
        if limit is not None and float(a.abs().max()) > _RANGE_SHARE * limit:
            return Verdict(guilty=False, inconclusive=True, reason=f"the output is near the {wire_dtype} range limit")
        a_wire = decode_tensor(encode_tensor(session.detach().to(torch.float32), wire_dtype),
                               out_dtype=torch.float32).reshape(a.shape).to(torch.float64)
        if not bool(torch.isfinite(a_wire).all()):
            return Verdict(guilty=False, inconclusive=True, reason=f"the output does not fit the {wire_dtype} wire")
    if not bool(torch.isfinite(y).all()):
        return Verdict(guilty=True, rel_l2=math.inf, cos_gap=2.0, reason="non-finite values where the span computes "
                                                                          "finite ones")
    # Per-row honest spread: session vs one pass, and the wire's own rounding.
    spread_rel = torch.maximum(_rel(a, b), _rel(b, a))
    wire_rel = _rel(a_wire, a)
    spread_cos = _cos_gap(a, b)
    wire_cos = _cos_gap(a_wire, a)
    if c is not None:  # the float32 paths' distance from the (near-)exact answer
        spread_rel = torch.maximum(spread_rel, torch.maximum(_rel(a, c), _rel(b, c)))
        spread_cos = torch.maximum(spread_cos, torch.maximum(_cos_gap(a, c), _cos_gap(b, c)))
    # The step's spread: its worst row (the rows of one step share one prefix).
    scale_rel = float(torch.maximum(spread_rel, wire_rel).max())
    scale_cos = float(torch.maximum(spread_cos, wire_cos).max())
    t_rel = max(tolerance.max_rel_l2(depth), SPREAD_FACTOR * scale_rel)
    t_cos = max(tolerance.max_cos_gap(depth), SPREAD_FACTOR ** 2 * scale_cos)
    refs = (a, b) if c is None else (a, b, c)
    rel = torch.stack([_rel(y, r) for r in refs]).min(dim=0).values
    gap = torch.stack([_cos_gap(y, r) for r in refs]).min(dim=0).values
    worst_rel, worst_gap = float(rel.max()), float(gap.max())
    reasons = []
    if worst_rel > t_rel:
        reasons.append(f"rel_l2 {worst_rel:.3g} > {t_rel:.3g}")
    if worst_gap > t_cos:
        reasons.append(f"1-cos {worst_gap:.3g} > {t_cos:.3g}")
    topk_reason = _topk(y, a, b if c is None else c, a_wire, tolerance.topk_min)
    if topk_reason:
        reasons.append(topk_reason)
    return Verdict(guilty=bool(reasons), reason="; ".join(reasons), rel_l2=worst_rel, cos_gap=worst_gap,
                   spread=scale_rel, threshold=t_rel)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)


def _cos_gap(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    cos = (x * ref).sum(dim=-1) / (x.norm(dim=-1) * ref.norm(dim=-1)).clamp_min(1e-300)
    return (1.0 - cos).clamp_min(0.0)


def _topk(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_wire: torch.Tensor, topk_min: float) -> str:
    """A reason if some row with a well-separated top-k set disagrees with both recomputations."""
    hidden = a.shape[-1]
    k = min(topk_size(hidden), hidden - 1)
    if k < 1:
        return ""
    magnitude = a.abs().sort(dim=-1, descending=True).values
    separation = magnitude[:, k - 1] - magnitude[:, k]
    noise = torch.maximum((a - b).abs().max(dim=-1).values, (a_wire - a).abs().max(dim=-1).values)
    stable = separation > SPREAD_FACTOR * noise
    if not bool(stable.any()):
        return ""
    top_y = y.abs().topk(k, dim=-1).indices
    # convict only if one stable row disagrees with both references
    top_a = a.abs().topk(k, dim=-1).indices
    top_b = b.abs().topk(k, dim=-1).indices
    agree_a = (top_y.unsqueeze(-1) == top_a.unsqueeze(-2)).any(dim=-1).sum(dim=-1).to(torch.float64) / k
    agree_b = (top_y.unsqueeze(-1) == top_b.unsqueeze(-2)).any(dim=-1).sum(dim=-1).to(torch.float64) / k
    bad = stable & (agree_a < topk_min) & (agree_b < topk_min)
    if bool(bad.any()):
        return f"top-k agreement {float(torch.maximum(agree_a, agree_b)[bad].min()):.2f} < {topk_min:.2f}"
    return ""


def _largest_finite(wire_dtype: str) -> float | None:
    return {"f16": float(torch.finfo(torch.float16).max), "bf16": float(torch.finfo(torch.bfloat16).max)}.get(wire_dtype)
