"""The decoder families this runtime can split into spans, and what it needs of each.

A span is built from ``transformers``' own classes for the family: the decoder layer,
the rotary embedding and the RMS norm. So a span computes exactly what the same layers
compute inside ``AutoModelForCausalLM``; nothing here re-implements attention.
All three families store weights as ``model.layers.N.<param>``, ``model.embed_tokens``,
``model.norm`` and ``lm_head`` (absent when tied to the embeddings).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import UnsupportedArchitecture

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Architecture",
    "architecture",
    "check_supported",
    "layer_prefix",
    "HEAD_EMBED",
    "HEAD_NORM",
    "HEAD_LM",
    "span_config",
    "layer_param_shapes",
]

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
HEAD_EMBED = "model.embed_tokens.weight"
HEAD_NORM = "model.norm.weight"
HEAD_LM = "lm_head.weight"


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """The transformers classes that make up one family's blocks and head."""

    model_type: str
    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    rms_norm: type[nn.Module]


def check_supported(model_type: str | None) -> str:
    """Return ``model_type`` if supported, else raise :class:`UnsupportedArchitecture`."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def architecture(model_type: str | None) -> Architecture:
    """The classes for ``model_type`` (imported lazily: each family is a large module)."""
    check_supported(model_type)
    if model_type == "llama":
        from transformers.models.llama import modeling_llama as llama

        return Architecture(
            model_type="llama",
            decoder_layer=llama.LlamaDecoderLayer,
            rotary_embedding=llama.LlamaRotaryEmbedding,
            rms_norm=llama.LlamaRMSNorm,
        )
    if model_type == "mistral":
        from transformers.models.mistral import modeling_mistral as mistral

        return Architecture(
            model_type="mistral",
            decoder_layer=mistral.MistralDecoderLayer,
            rotary_embedding=mistral.MistralRotaryEmbedding,
            rms_norm=mistral.MistralRMSNorm,
        )
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return Architecture(
        model_type="qwen2",
        decoder_layer=qwen2.Qwen2DecoderLayer,
        rotary_embedding=qwen2.Qwen2RotaryEmbedding,
        rms_norm=qwen2.Qwen2RMSNorm,
    )


def layer_prefix(index: int) -> str:
    """The state-dict prefix of decoder block ``index`` (absolute, 0-based)."""
    return f"model.layers.{index}."


def span_config(config: Any, start: int, end: int) -> Any:
    """A copy of ``config`` describing only blocks [start, end).

    Layers are built with local indices 0..n-1 against this config, so a per-span
    ``DynamicCache`` has exactly one slot per served block, while per-layer settings
    (Qwen2's ``layer_types``: sliding or full attention) keep their absolute meaning.
    """
    cfg = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    cfg.num_hidden_layers = end - start
    if layer_types is not None:
        cfg.layer_types = list(layer_types[start:end])
    # Attend the way from_pretrained does by default (sdpa) unless the config chose.
    if getattr(cfg, "_attn_implementation_internal", None) is None:
        cfg._attn_implementation = "sdpa"
    return cfg


def layer_param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Relative parameter names and shapes of one decoder block (built on the meta device)."""
    arch = architecture(config.model_type)
    cfg = span_config(config, 0, 1)
    with torch.device("meta"):
        layer = arch.decoder_layer(cfg, 0)
    return {name: tuple(p.shape) for name, p in layer.named_parameters()}
