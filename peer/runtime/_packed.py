"""Linear layers whose weights are packed for oneDNN (CPU, float32).

On the CPU, torch computes ``nn.Linear`` with MKL's sgemm. Measured on this project's
machines (AMD EPYC, one thread): MKL reads the weights of a one-token step at about
9.5 GB/s, and sixteen tokens cost it 2.3x one token. The same products through
oneDNN, with the weights reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU freezing does),
took 0.6-0.9x MKL's time for one token and 0.45-0.7x for sixteen (a 12288x576 and a
1536x576 weight), and scale with threads as MKL does. So a span's large linear layers keep their weights
only in that layout: no second copy, the same bytes (small ones stay dense:
``MIN_PACKED``).

The packed weight is an opaque tensor (no storage to copy, no dtype to convert to):
``dense_copy`` copies a module with its packed weights made dense again, for the
float64 reference of audits, and converting a module (``.to(torch.float64)``) makes
them dense first.
Outputs equal ``nn.Linear``'s up to float rounding (the sums run in another order,
about 1e-7 relative); every path of the executor uses the same packed layers, so its
one-session and batched paths agree as before.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MIN_PACKED", "PackedLinear", "pack_linears", "pack_weight", "packed_linear", "dense_copy",
           "packing_available"]

#: The batch the packed layout is tuned for (a one-token step runs as fast as MKL's).
_BATCH_HINT = 16

#: Weights smaller than this (elements) stay with MKL: a oneDNN call costs about 20 us
#: more, which a product that small does not win back (one token, one thread: 64x64 3 us
#: with MKL, 23 us packed; 128x64 4 and 24). From about this size the weights stream
#: from memory in a span, and the packed layout reads them faster (a SmolLM2-shaped span
#: with every linear packed, 192x576 the smallest: 16 decode steps 76-81 ms, with only
#: those of 2^19 weights or more packed 104-115 ms, all dense 111-133 ms).
MIN_PACKED = 1 << 16


@functools.cache
def packing_available() -> bool:
    """Whether this torch has oneDNN's packed linear (and it computes what ``F.linear`` does)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, nn.functional.linear(x, w), rtol=1e-5, atol=1e-6))


def pack_weight(weight: torch.Tensor, *, min_params: int = MIN_PACKED) -> torch.Tensor | None:
    """``weight`` ([out, in]) in oneDNN's layout, for ``packed_linear``; None where it
    stays dense (not float32 on the CPU, fewer than ``min_params`` elements, no oneDNN)."""
    if (weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.is_mkldnn
            or weight.numel() < min_params or not packing_available()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a weight packed by ``pack_weight`` or a dense one."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return nn.functional.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in oneDNN's layout: ``weight`` is what
    ``pack_weight`` made of ``linear.weight``."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor) -> None:
        super().__init__()
        if not weight.is_mkldnn:
            raise ValueError("PackedLinear takes the weight pack_weight packed")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)  # dense after ``dense_copy`` or ``.to(...)``

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedLinear:
        # ``.to(...)``, ``.double()`` and the like cannot convert an opaque tensor: they
        # get the dense weight (and the module computes with ``F.linear`` from then on).
        if self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module, *, min_params: int = MIN_PACKED) -> nn.Module:
    """Replace every float32 CPU ``nn.Linear`` of at least ``min_params`` weights under
    ``module`` by a ``PackedLinear``, in place (a no-op where oneDNN's packed linear is
    not available)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # subclasses may compute something else
                continue
            assert isinstance(child, nn.Linear)
            packed = pack_weight(child.weight, min_params=min_params)
            if packed is not None:
                setattr(parent, name, PackedLinear(child, packed))
    return module


def dense_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose packed weights are ordinary dense tensors."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        if isinstance(sub, PackedLinear) and sub.weight.is_mkldnn:
            memo[id(sub.weight)] = nn.Parameter(sub.weight.to_dense(), requires_grad=False)
    return copy.deepcopy(module, memo)
