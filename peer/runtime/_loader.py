"""Build a span's blocks, or the client head, from a source's tensors.

Blocks are instantiated on the meta device (no memory), then each block's tensors are
read from the source and assigned in place (``load_state_dict(assign=True)``): peak
memory is the span plus one block in flight, never the whole model. Names are checked
strictly, so a source whose block lacks a tensor fails loudly instead of running with
random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import _progress
from ._arch import HEAD_EMBED, HEAD_LM, HEAD_NORM, architecture, span_config
from ._errors import ModelError, SpanOutOfRange
from ._packed import pack_linears
from ._quant import quantize_linears
from ._sources import Source

__all__ = ["SpanModules", "HeadModules", "build_span", "build_head", "check_span"]


@dataclass(slots=True, kw_only=True)
class SpanModules:
    """The loaded blocks [start, end) of a model, ready to run."""

    layers: nn.ModuleList
    rotary: nn.Module
    config: Any  # span-local config (see _arch.span_config)


@dataclass(slots=True, kw_only=True)
class HeadModules:
    """Embeddings, final norm and LM head (the client side of the model)."""

    embed: nn.Embedding
    norm: nn.Module
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding matrix itself when tied


def check_span(start: int, end: int, num_blocks: int) -> None:
    """Raise :class:`SpanOutOfRange` unless 0 <= start < end <= num_blocks."""
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= num_blocks:
        raise SpanOutOfRange(
            f"span [{start}, {end}) is not inside the model's blocks [0, {num_blocks}); "
            f"use 0 <= start < end <= {num_blocks}"
        )


def build_span(
    source: Source,
    start: int,
    end: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quant: str | None,
) -> SpanModules:
    """Load blocks [start, end) of ``source`` onto ``device`` in ``dtype`` (optionally quantized)."""
    config = source.config
    check_span(start, end, int(config.num_hidden_layers))
    arch = architecture(config.model_type)
    cfg = span_config(config, start, end)
    layers = nn.ModuleList()
    with _progress.task(f"loading blocks {start}:{end}", end - start) as shown:
        for local, index in enumerate(range(start, end)):
            layers.append(_load_layer(source, arch, cfg, local, index, device=device, dtype=dtype, quant=quant))
            shown.advance()
    rotary = arch.rotary_embedding(config=cfg).to(device)
    return SpanModules(layers=layers, rotary=rotary, config=cfg)


def _load_layer(source: Source, arch: Any, cfg: Any, local: int, index: int, *, device: torch.device,
                dtype: torch.dtype, quant: str | None) -> nn.Module:
    with torch.device("meta"):
        layer = arch.decoder_layer(cfg, local)
    state = source.read_block(index)
    _check_names(f"block {index}", set(dict(layer.named_parameters())), set(state))
    layer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    del state
    layer.eval().requires_grad_(False)
    if quant is not None:
        layer = quantize_linears(layer, quant, device=device, dtype=dtype)
    else:
        layer = pack_linears(layer.to(device))
    return layer


def build_head(source: Source, *, device: torch.device, dtype: torch.dtype) -> HeadModules:
    """Load the embeddings, final norm and LM head of ``source``."""
    config = source.config
    arch = architecture(config.model_type)
    state = source.read_head()
    for name in (HEAD_EMBED, HEAD_NORM):
        if name not in state:
            raise ModelError(f"the model lacks {name}; the weight files are incomplete")
    embed_w = state[HEAD_EMBED].to(device=device, dtype=dtype)
    embed = nn.Embedding(embed_w.shape[0], embed_w.shape[1], device="meta")
    embed.weight = nn.Parameter(embed_w, requires_grad=False)
    with torch.device("meta"):
        norm = arch.rms_norm(int(config.hidden_size), eps=float(config.rms_norm_eps))
    norm.load_state_dict({"weight": state[HEAD_NORM].to(device=device, dtype=dtype)}, assign=True)
    norm.eval().requires_grad_(False)
    lm_head: torch.Tensor
    if getattr(config, "tie_word_embeddings", False):
        lm_head = embed.weight
    elif HEAD_LM in state:
        lm_head = state[HEAD_LM].to(device=device, dtype=dtype)
    else:
        raise ModelError(f"the model lacks {HEAD_LM} and its embeddings are not tied; the weight files are incomplete")
    return HeadModules(embed=embed, norm=norm, lm_head=lm_head)


def _check_names(what: str, expected: set[str], got: set[str]) -> None:
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if missing or extra:
        raise ModelError(
            f"{what}: weights do not match the architecture (missing {missing[:3]}, unexpected {extra[:3]}); "
            "the model files are incomplete or of another architecture"
        )
