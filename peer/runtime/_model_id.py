"""Model ids: a name plus a digest that pins the exact weights.

Peers chain only with peers serving the same model id, so the id must change whenever
the computation could: ``<name>@<16 hex>``, the hex being BLAKE2b-64 over a canonical
JSON document of

- the architecture-relevant config fields (explicit list, so unrelated fields a newer
  transformers adds do not split the swarm),
- the weight manifest: every tensor's name, shape and stored dtype, sorted,
- the SHA-256 of each weight file (content; equal to the hub's LFS oid).

The name is informational only; two sources with different names but the same
digest are still different ids (so operators see what they run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ._sources import Source, open_source

__all__ = ["ModelInfo", "resolve_model", "model_id_of", "CONFIG_KEYS"]

CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "max_position_embeddings",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What a peer needs to know about a model before loading any weights.

    Attributes:
        model_id: ``name@digest`` (see module docstring).
        name: human-readable model name.
        num_blocks: number of decoder blocks.
        hidden_size: width of the hidden states passed between spans.
        config: the transformers config object.
        dtype: dtype the source's weights load as (before any cast by ``load_span``).
    """

    model_id: str
    name: str
    num_blocks: int
    hidden_size: int
    config: Any = field(repr=False)
    dtype: torch.dtype


_STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def model_id_of(source: Source) -> str:
    """Compute the model id of an opened source."""
    cfg = source.config.to_dict()
    doc = {
        "config": {k: cfg.get(k) for k in CONFIG_KEYS if k in cfg},
        "manifest": [[n, list(s), d] for n, s, d in source.manifest],
        "files": list(source.content_digests),
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
    return f"{source.name}@{hashlib.blake2b(blob, digest_size=8).hexdigest()}"


def info_of(source: Source) -> ModelInfo:
    """``ModelInfo`` of an opened source."""
    cfg = source.config
    dtypes = {d for _, _, d in source.manifest}
    stored = _STORED_DTYPES.get(dtypes.pop()) if len(dtypes) == 1 else None
    return ModelInfo(
        model_id=model_id_of(source),
        name=source.name,
        num_blocks=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        config=cfg,
        dtype=stored or torch.float32,  # quantized GGUF tensors dequantize to float32
    )


def resolve_model(source: str) -> ModelInfo:
    """Resolve a source string to its :class:`ModelInfo` without loading weights.

    Cheap: reads configs and headers; file digests are memoised on disk and GGUF
    metadata is cached after the first call.

    Raises:
        UnknownModel, ModelFileMissing, UnsupportedArchitecture, HubUnavailable, ModelError.
    """
    return info_of(open_source(source))
