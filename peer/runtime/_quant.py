"""Optional bitsandbytes weight quantization of served blocks: ``int8`` and ``nf4``.

Each ``nn.Linear`` of a block is swapped for ``bnb.nn.Linear8bitLt`` (LLM.int8 with
outlier threshold 6.0, weights stored int8) or ``bnb.nn.Linear4bit`` (NF4, compute in
the span's dtype); norms stay in the compute dtype. bitsandbytes quantizes a weight
when it is moved to its device, so this runs block by block as the span loads and the
full-precision copy of a block is freed before the next one is read.

Both work on CPU with bitsandbytes >= 0.45 (its CPU backend) and on CUDA. On CPU they
cost time, not accuracy: one int8/nf4 linear is ~20x slower than the fp32 one
(bitsandbytes 0.50.2, 2 cores), so they are for memory-bound peers, not speed.
"""

from __future__ import annotations

import torch
from torch import nn

from ._errors import InvalidArgument, QuantizationUnavailable

__all__ = ["QUANT_MODES", "check_quant", "quantize_linears"]

QUANT_MODES = ("int8", "nf4")
_INT8_OUTLIER_THRESHOLD = 6.0


def check_quant(quant: str | None) -> str | None:
    """Validate a quantization mode name (``None`` means full precision)."""
    if quant is None or quant in ("none", ""):
        return None
    if quant not in QUANT_MODES:
        raise InvalidArgument(f"unknown quantization {quant!r}; use one of {', '.join(QUANT_MODES)} or none")
    return quant


def _bnb() -> object:
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library (RuntimeError/OSError)
        raise QuantizationUnavailable(
            f"bitsandbytes cannot load here ({exc}); pip install bitsandbytes, or serve without --quant"
        ) from exc
    return bnb


def quantize_linears(module: nn.Module, quant: str, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` by its bitsandbytes counterpart, in place.

    The module must hold real (not meta) weights on the CPU; it ends up on ``device``.

    Raises:
        QuantizationUnavailable: bitsandbytes is missing or cannot quantize on ``device``.
    """
    bnb = _bnb()
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, _quantized(bnb, child, quant, device=device, dtype=dtype))
    try:
        return module.to(device)
    except Exception as exc:  # bnb raises RuntimeError/NotImplementedError per backend
        raise QuantizationUnavailable(f"bitsandbytes cannot run {quant} on {device} ({exc}); serve without --quant") from exc


def _quantized(bnb: object, lin: nn.Linear, quant: str, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    has_bias = lin.bias is not None
    weight = lin.weight.data.to(dtype if device.type == "cuda" else torch.float32)
    if quant == "int8":
        q = bnb.nn.Linear8bitLt(  # type: ignore[attr-defined]
            lin.in_features,
            lin.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=_INT8_OUTLIER_THRESHOLD,
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)  # type: ignore[attr-defined]
    else:
        q = bnb.nn.Linear4bit(  # type: ignore[attr-defined]
            lin.in_features,
            lin.out_features,
            bias=has_bias,
            compute_dtype=dtype,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")  # type: ignore[attr-defined]
    if has_bias:
        q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
    try:
        return q.to(device)  # quantizes here
    except Exception as exc:
        raise QuantizationUnavailable(f"bitsandbytes cannot run {quant} on {device} ({exc}); serve without --quant") from exc
