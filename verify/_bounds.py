"""The activation range of a model, per block, recorded at calibration (spec 13.3
"Input bounds").

Theory of operation. A fraud proof's inputs are whatever its client signed, not
necessarily activations any model produces. Far outside the range real activations
take, floating-point rounding can behave differently from anything calibration
measured (an f16 wire overflows, RMSNorm's epsilon dominates, attention saturates),
so a verifier does not convict on such inputs: the proof is inconclusive
(``verify._judge``). The range is per block: the root-mean-square (RMS) of each row
(token) of the hidden states entering block ``b`` of real forward passes, as
``python bench/calibrate.py --record`` measures it, widened by ``BOUNDS_MARGIN`` on
each side. A span's bounds are those of its first block (its inputs enter there).

Records are JSON files ``{"format": RECORD_FORMAT, "model": model_id, "blocks":
{"b": [lo, hi], ...}}`` in ``verify/calibration/`` (shipped for the built-in model)
or in the directory named by ``$SWARM_CALIBRATION_DIR``. A model without a record
has no bounds: its proofs are judged by the spread rule alone (``verify._judge``),
which does not need them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BOUNDS_MARGIN", "RECORD_FORMAT", "NormBounds", "bounds_from_activations", "load_bounds", "record_path"]

#: Factor by which the measured RMS range is widened on each side.
BOUNDS_MARGIN = 10.0
RECORD_FORMAT = "swarm-peer calibration v1"
_SHIPPED = Path(__file__).with_name("calibration")


@dataclass(frozen=True, slots=True)
class NormBounds:
    """Measured row-RMS range ``[lo, hi]`` of real activations entering each block."""

    model: str
    blocks: Mapping[int, tuple[float, float]] = field(default_factory=dict)

    def allowed(self, block: int) -> tuple[float, float] | None:
        """The accepted RMS range of rows entering ``block`` (None: not recorded)."""
        measured = self.blocks.get(block)
        if measured is None:
            return None
        lo, hi = measured
        return lo / BOUNDS_MARGIN, hi * BOUNDS_MARGIN

    def check(self, hidden: torch.Tensor, block: int) -> str | None:
        """Why ``hidden`` ([..., H] rows entering ``block``) is outside the range, or None."""
        allowed = self.allowed(block)
        if allowed is None:
            return None
        rms = hidden.detach().to(torch.float64).pow(2).mean(dim=-1).sqrt().flatten()
        if not bool(torch.isfinite(rms).all()):
            return "input rows with non-finite values"
        lo, hi = allowed
        low, high = float(rms.min()), float(rms.max())
        if low < lo or high > hi:
            return (f"input row RMS {low:.3g}..{high:.3g} is outside the activation range {lo:.3g}..{hi:.3g} "
                    f"recorded at calibration for block {block}")
        return None

    def to_json(self) -> str:
        blocks = {str(b): [lo, hi] for b, (lo, hi) in sorted(self.blocks.items())}
        return json.dumps({"format": RECORD_FORMAT, "model": self.model, "blocks": blocks}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> NormBounds:
        """Raises ValueError on anything that is not a calibration record."""
        obj = json.loads(text)
        if type(obj) is not dict or obj.get("format") != RECORD_FORMAT or type(obj.get("model")) is not str:
            raise ValueError("not a swarm-peer calibration record")
        blocks: dict[int, tuple[float, float]] = {}
        for key, pair in dict(obj.get("blocks", {})).items():
            lo, hi = (float(v) for v in pair)
            if not (0 < lo <= hi and math.isfinite(hi)):
                raise ValueError(f"block {key}: bounds must satisfy 0 < lo <= hi < inf")
            blocks[int(key)] = (lo, hi)
        return cls(model=obj["model"], blocks=blocks)


def bounds_from_activations(model: str, inputs: Mapping[int, list[torch.Tensor]]) -> NormBounds:
    """The record of ``inputs``: block -> hidden states ([1, n, H]) that entered it."""
    blocks = {}
    for block, tensors in inputs.items():
        rms = torch.cat([t.detach().to(torch.float64).pow(2).mean(dim=-1).sqrt().flatten() for t in tensors])
        blocks[block] = (float(rms.min()), float(rms.max()))
    return NormBounds(model=model, blocks=blocks)


def record_path(model: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """Where the record of ``model`` lives (file name: a digest of the model id)."""
    name = hashlib.blake2b(model.encode(), digest_size=8).hexdigest() + ".json"
    return Path(directory) / name if directory is not None else _SHIPPED / name


def load_bounds(model: str) -> NormBounds | None:
    """The calibration record of ``model`` ($SWARM_CALIBRATION_DIR first, then the
    shipped ones), or None if there is none or it is unreadable."""
    places: list[str | None] = [d for d in (os.environ.get("SWARM_CALIBRATION_DIR"),) if d] + [None]
    for directory in places:
        path = record_path(model, directory)
        try:
            bounds = NormBounds.from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            continue
        if bounds.model == model:
            return bounds
    return None
