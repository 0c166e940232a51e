"""Model ids: a name plus a digest a third party can recompute from the model's files
(spec/SPEC.md section 1, "Model id").

Theory of operation. Peers chain only servers of one model id, so the id must change
whenever the computation could, and stay put when nothing that matters changed (a
newer transformers rewriting ``transformers_version``, say). It is
``<name>@<16 lowercase hex>``, the hex being BLAKE2b-64 (BLAKE2b with an 8-byte digest,
no key) of the deterministic CBOR (section 2) of the array

    ["swarm/1/model-id", config, manifest, files]

- ``config``: the entries of ``config.json`` whose keys are in ``CONFIG_KEYS`` (the
  architecture fields), as ``[key, value]`` pairs sorted by key. Values are JSON
  turned into CBOR by one rule that every language can follow: a number with no
  fractional part and magnitude at most 2**53 is an integer (so ``10000.0`` and
  ``10000`` agree, as they do in JavaScript), any other number a float (shortest
  form), an object the ``[key, value]`` pairs of its entries sorted by key, an array
  an array; strings, ``true``, ``false`` and ``null`` as themselves.
- ``manifest``: every tensor of every weight file, ``[name, [dims...], dtype]`` as
  the safetensors headers give them (``"F32"``, ``"BF16"``, ...), sorted by name.
- ``files``: the SHA-256 of each weight file (32-byte byte strings; the Hub's LFS
  oid), in the order of their file names.

Keys and names sort by their UTF-8 bytes. A model given as one GGUF file carries its
configuration and tensors inside the file: its ``config`` and ``manifest`` are empty
and ``files`` holds the file's SHA-256 alone.

The name before ``@`` is informational (1 to 111 characters of ``a-z``, ``0-9``,
``.``, ``-`` and ``_``); two ids are the same model only if the whole strings are equal.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._cbor import encode as cbor_encode
from .errors import LocalProtocolError

__all__ = [
    "MODEL_ID_DOMAIN",
    "CONFIG_KEYS",
    "MODEL_ID_PATTERN",
    "model_id_document",
    "model_digest",
    "make_model_id",
    "json_to_cbor",
]

MODEL_ID_DOMAIN = "swarm/1/model-id"

#: The config.json keys the digest covers: what changes a decoder's computation.
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

#: ``name@digest``: what a model id looks like on the wire (at most 128 bytes).
MODEL_ID_PATTERN = re.compile(r"[a-z0-9._-]{1,111}@[0-9a-f]{16}")
_INTEGRAL_MAX = 2**53


def json_to_cbor(value: Any) -> Any:
    """A decoded JSON value in the digest's CBOR form (module docstring).

    Raises:
        LocalProtocolError: a value JSON cannot hold (NaN, a non-text key, ...).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise LocalProtocolError("NaN cannot be part of a model id")
        if math.isfinite(value) and value.is_integer() and abs(value) <= _INTEGRAL_MAX:
            return int(value)
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise LocalProtocolError("JSON object keys are text")
        return [[k, json_to_cbor(value[k])] for k in sorted(value, key=_utf8)]
    if isinstance(value, (list, tuple)):
        return [json_to_cbor(v) for v in value]
    raise LocalProtocolError(f"{type(value).__name__} is not a JSON value")


def model_id_document(config: Mapping[str, Any], manifest: Iterable[tuple[str, Sequence[int], str]],
                      files: Iterable[bytes]) -> bytes:
    """The bytes the model digest is taken over.

    Args:
        config: ``config.json`` as decoded (keys outside ``CONFIG_KEYS`` are dropped);
            empty for a GGUF file.
        manifest: ``(name, shape, dtype)`` of every tensor of the weight files; empty
            for a GGUF file.
        files: the SHA-256 digests of the weight files, ordered by file name.
    """
    pairs = [[k, json_to_cbor(config[k])] for k in sorted(config, key=_utf8) if k in CONFIG_KEYS]
    tensors = sorted(([n, [int(d) for d in shape], dtype] for n, shape, dtype in manifest), key=lambda t: _utf8(t[0]))
    digests = [bytes(d) for d in files]
    if any(len(d) != 32 for d in digests):
        raise LocalProtocolError("weight file digests are 32-byte SHA-256 values")
    return cbor_encode([MODEL_ID_DOMAIN, pairs, tensors, digests])


def model_digest(document: bytes) -> str:
    """The 16 hex digits of a model id: BLAKE2b-64 of ``model_id_document(...)``."""
    return hashlib.blake2b(document, digest_size=8).hexdigest()


def make_model_id(name: str, document: bytes) -> str:
    """``name@digest``.

    Raises:
        LocalProtocolError: ``name`` is not 1 to 111 characters of a-z, 0-9, '.', '-', '_'.
    """
    model_id = f"{name}@{model_digest(document)}"
    if not MODEL_ID_PATTERN.fullmatch(model_id):
        raise LocalProtocolError(f"model name {name!r} must be 1 to 111 characters of a-z, 0-9, '.', '-' and '_'")
    return model_id


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")
