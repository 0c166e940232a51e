"""Device and dtype selection: CPU fp32 by default, CUDA bf16/fp16 when present.

``device=None`` picks CUDA when torch sees a GPU, else CPU. ``dtype=None`` picks
float32 on CPU (bf16/fp16 matmuls on CPU are slow and lose the bit-exactness the
audits rely on) and bfloat16 on CUDA when the card supports it, else float16.
Strings accepted for dtype: ``fp32``/``float32``, ``bf16``/``bfloat16``,
``fp16``/``float16``/``half``, ``auto``.
"""

from __future__ import annotations

import torch

from ._errors import InvalidArgument

__all__ = ["resolve_device", "resolve_dtype", "dtype_name"]

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda[:n]"`` into a usable ``torch.device``.

    Raises:
        InvalidArgument: the string is not a device, or CUDA was asked for and is absent.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Pick the compute dtype for ``device`` (see module docstring).

    Raises:
        InvalidArgument: an unknown dtype name, or a half dtype the device cannot run.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InvalidArgument(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
        resolved = _DTYPES[key]
    if resolved not in _NAMES:
        raise InvalidArgument(f"unsupported dtype {resolved}; use fp32, bf16 or fp16")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidArgument("this GPU has no bf16 support; use --dtype fp16")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """Short name (``fp32``, ``bf16``, ``fp16``) used in reports and model info."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))
