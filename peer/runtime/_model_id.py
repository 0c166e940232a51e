"""Model ids: a name plus a digest that pins the exact weights.

Peers chain only with peers serving the same model id, so the id must change whenever
the computation could: ``<name>@<16 hex>``, defined by the wire protocol so that a third
party can recompute it from the model's files (spec section 1, ``protocol``'s
``model_id_document``): BLAKE2b-64 over the architecture fields of ``config.json``
(``protocol.CONFIG_KEYS``, so unrelated fields a newer transformers adds do not split
the swarm), the weight manifest (every tensor's name, shape and stored dtype) and the
SHA-256 of each weight file. A GGUF file is its own manifest and configuration: its id
covers the file's SHA-256 alone.

The name is informational only; two sources with different names but the same
digest are still different ids (so operators see what they run).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from protocol import CONFIG_KEYS, make_model_id, model_id_document

from ._errors import ModelError
from ._gguf import GGUFSource
from ._sources import Source, open_source

__all__ = ["ModelInfo", "resolve_model", "model_id_of", "model_document_of", "CONFIG_KEYS"]


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


def model_document_of(source: Source) -> bytes:
    """The bytes an opened source's model digest is taken over (spec section 1)."""
    files = [bytes.fromhex(d) for d in source.content_digests]
    if isinstance(source, GGUFSource):
        return model_id_document({}, [], files)
    path = getattr(source, "path", None)
    try:
        raw = json.loads((path / "config.json").read_bytes()) if path is not None else source.config.to_dict()
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}/config.json ({exc}); re-download the model") from exc
    return model_id_document(raw, source.manifest, files)


def model_id_of(source: Source) -> str:
    """Compute the model id of an opened source."""
    name = re.sub(r"[^a-z0-9._-]", "-", source.name.lower())[:111] or "model"
    return make_model_id(name, model_document_of(source))


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
