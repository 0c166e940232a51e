"""Entry points: ``load_span`` and ``load_head``."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ._device import resolve_device, resolve_dtype
from ._executor import SpanExecutor
from ._head import ClientHead
from ._loader import build_head, build_span, check_span
from ._model_id import info_of
from ._quant import check_quant
from ._sources import open_source

__all__ = ["load_span", "load_head"]


def load_span(
    source: str,
    start: int,
    end: int,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quant: str | None = None,
    cache_bytes: int | None = None,
    idle_timeout: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
) -> SpanExecutor:
    """Load blocks [start, end) of a model and return their executor.

    Only that span's tensors are read from the source.

    Args:
        source: ``smollm2-135m-instruct``, a local HF directory, a ``.gguf`` file, or a hub id.
        start, end: the blocks to serve, 0 <= start < end <= number of blocks.
        device: ``cpu``, ``cuda[:n]`` or None (CUDA if available).
        dtype: ``fp32``/``bf16``/``fp16`` or None (fp32 on CPU, bf16/fp16 on CUDA).
        quant: None, ``int8`` or ``nf4`` (bitsandbytes weight quantization).
        cache_bytes: KV-cache budget over all sessions (None: unlimited).
        idle_timeout: seconds after which ``evict_idle`` drops an unused session.
        clock: source of session "last used" times.

    Raises:
        UnknownModel, ModelFileMissing, UnsupportedArchitecture, HubUnavailable,
        SpanOutOfRange, InvalidArgument, QuantizationUnavailable, ModelError.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    q = check_quant(quant)
    src = open_source(source)
    info = info_of(src)
    check_span(start, end, info.num_blocks)
    modules = build_span(src, start, end, device=dev, dtype=dt, quant=q)
    return SpanExecutor(
        modules=modules,
        info=info,
        start=start,
        end=end,
        device=dev,
        dtype=dt,
        quant=q,
        cache_bytes=cache_bytes,
        idle_timeout=idle_timeout,
        clock=clock,
    )


def load_head(
    source: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> ClientHead:
    """Load a model's client head (tokenizer, embeddings, final norm, LM head).

    Raises:
        UnknownModel, ModelFileMissing, UnsupportedArchitecture, HubUnavailable, ModelError.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = open_source(source)
    info = info_of(src)
    modules = build_head(src, device=dev, dtype=dt)
    return ClientHead(modules=modules, info=info, source=src, device=dev, dtype=dt)
