"""GGUF model files: metadata, span-only dequantization, and a converted cache.

Theory of operation. ``GGUFReader`` memory-maps the file, so opening it reads the
header and metadata but no tensor data; a tensor's bytes are only touched when it is
dequantized. A span therefore reads exactly its own blocks' tensors. Opening the reader
costs seconds (it parses the 49k-entry vocabulary), so everything derived from the
file is cached under ``<cache>/gguf/<sha256 prefix>/``:

- ``meta.json``: the transformers config, the tensor manifest, the GGUF->HF name map;
- ``block-NNNN.safetensors``: one block's tensors, dequantized to float32, written the
  first time any span needs that block (so the cache too only grows with what is served);
- ``head.safetensors``: embeddings, final norm, LM head;
- ``tokenizer/``: the tokenizer (with its chat template) saved by transformers;
- ``hashes.json``: the SHA-256 of ``meta.json`` and of each ``.safetensors`` entry as
  written (``HashManifest``). An entry whose bytes no longer match is converted again
  with a warning, so a block edited on disk is never served under the model's id.

Keyed by the file's SHA-256, an edited file never meets a stale cache entry.

Names and layout follow transformers' GGUF integration (the reference we compare
against loads the same file with ``from_pretrained(dir, gguf_file=...)``): llama.cpp
stores Llama q/k projection rows permuted for its rotary layout, undone here; Qwen2
files are not permuted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from .. import _progress
from ._arch import HEAD_EMBED, HEAD_LM, HEAD_NORM, check_supported, layer_param_shapes, layer_prefix
from ._cache import HashManifest, atomic_dir, atomic_write, cache_root, file_sha256
from ._errors import ModelError, ModelFileMissing, UnsupportedArchitecture

__all__ = ["GGUFSource"]

_META_FORMAT = 1
log = logging.getLogger("swarm.runtime")
# GGUF "general.architecture" values whose q/k rows llama.cpp permuted on export.
_PERMUTED_ARCHS = ("llama",)


class GGUFSource:
    """A local ``.gguf`` file as a model source (see the module docstring)."""

    def __init__(self, path: Path, *, name: str | None = None) -> None:
        if not path.is_file():
            raise ModelFileMissing(f"GGUF file not found: {path}; check the path")
        self.path = path
        self.digest = file_sha256(path)
        self._dir = cache_root() / "gguf" / self.digest[:32]
        self._hashes = HashManifest(self._dir, self.digest)
        self._reader: Any = None
        meta = self._load_meta()
        self._meta = meta
        self.config = _config_from_dict(meta["config"])
        self.name = name or meta["name"]
        self.manifest: list[tuple[str, tuple[int, ...], str]] = [
            (n, tuple(s), d) for n, s, d in meta["manifest"]
        ]
        self.content_digests = [self.digest]
        self._gguf_names: dict[str, str] = meta["names"]

    # -- metadata ---------------------------------------------------------------------

    def _open_reader(self) -> Any:
        if self._reader is None:
            from gguf import GGUFReader

            try:
                self._reader = GGUFReader(self.path)
            except (ValueError, OSError) as exc:
                raise ModelError(f"{self.path} is not a readable GGUF file ({exc}); re-download it") from exc
        return self._reader

    def _load_meta(self) -> dict[str, Any]:
        meta_path = self._dir / "meta.json"
        if self._verified("meta.json"):
            try:
                meta = json.loads(meta_path.read_bytes())
                if meta.get("format") == _META_FORMAT:
                    return dict(meta)
            except (OSError, ValueError):
                pass
        _progress.note(f"reading {self.path.name} (first run only: the result is cached)")
        meta = self._build_meta()
        self._dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(meta, sort_keys=True).encode()
        atomic_write(meta_path, data)
        self._hashes.record("meta.json", data)
        return meta

    def _verified(self, name: str) -> bool:
        """Whether cache entry ``name`` exists and the manifest vouches for its bytes;
        if not, the caller converts it again."""
        if not (self._dir / name).is_file():
            return False
        verdict = self._hashes.check(name)
        if verdict is False:
            log.warning("the converted cache entry %s of %s does not match its recorded hash (changed on disk); "
                        "converting it again from %s", name, self.path.name, self.path)
        elif verdict is None:
            log.info("no recorded hash for the cache entry %s of %s; converting it again", name, self.path.name)
        return bool(verdict)

    def _build_meta(self) -> dict[str, Any]:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers import AutoConfig

        reader = self._open_reader()
        arch = _field(reader, "general.architecture")
        if arch not in MODEL_ARCH_NAMES.values():
            raise UnsupportedArchitecture(f"unsupported architecture {arch}; supported: llama, mistral, qwen2")
        try:
            config = AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except ValueError as exc:  # transformers: "GGUF model with architecture X is not supported yet."
            raise UnsupportedArchitecture(
                f"unsupported architecture {arch}; supported: llama, mistral, qwen2"
            ) from exc
        check_supported(config.model_type)
        arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
        name_map = get_tensor_name_map(arch_enum, config.num_hidden_layers)
        suffixes = (".weight", ".bias")
        hf_names = [HEAD_EMBED, HEAD_NORM, HEAD_LM]
        per_layer = layer_param_shapes(config)
        for i in range(config.num_hidden_layers):
            hf_names += [layer_prefix(i) + rel for rel in per_layer]
        present = {t.name: t for t in reader.tensors}
        names: dict[str, str] = {}
        for hf in hf_names:
            gguf_name = name_map.get_name(hf, try_suffixes=suffixes)
            if gguf_name is not None and gguf_name in present:
                names[hf] = gguf_name
        missing = [hf for hf in hf_names if hf not in names and hf != HEAD_LM]
        if missing:
            raise ModelError(f"{self.path.name} lacks tensors {missing[:3]}...; the GGUF file is incomplete")
        manifest = sorted(
            (hf, [int(x) for x in reversed(present[g].shape.tolist())], present[g].tensor_type.name)
            for hf, g in names.items()
        )
        general_name = _field(reader, "general.name") or self.path.stem
        cfg = config.to_dict()
        for volatile in ("quantization_config", "_name_or_path", "transformers_version", "dtype"):
            cfg.pop(volatile, None)
        return {
            "format": _META_FORMAT,
            "arch": arch,
            "name": _slug(str(general_name)),
            "config": cfg,
            "manifest": manifest,
            "names": names,
        }

    # -- tensors -----------------------------------------------------------------------

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors, keyed relative to ``model.layers.N.``, float32."""
        prefix = layer_prefix(index)
        wanted = [hf for hf in self._gguf_names if hf.startswith(prefix)]
        tensors = self._cached_unit(f"block-{index:04d}", wanted)
        return {hf.removeprefix(prefix): t for hf, t in tensors.items()}

    def read_head(self) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and (when untied) LM head, full HF names, float32."""
        wanted = [hf for hf in (HEAD_EMBED, HEAD_NORM, HEAD_LM) if hf in self._gguf_names]
        return self._cached_unit("head", wanted)

    def _cached_unit(self, unit: str, wanted: list[str]) -> dict[str, torch.Tensor]:
        name = f"{unit}.safetensors"
        if self._verified(name):
            try:
                tensors = load_file(self._dir / name)
                if sorted(tensors) == sorted(wanted):
                    return tensors
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                pass
        if unit == "head":
            _progress.note(f"converting the embeddings and LM head of {self.path.name} (first run only)")
        tensors = {hf: self._dequantize(hf) for hf in wanted}
        data = save(tensors)
        try:
            atomic_write(self._dir / name, data)
            self._hashes.record(name, data)
        except OSError:
            pass  # caching is an optimisation; a read-only cache still serves
        return tensors

    def _dequantize(self, hf_name: str) -> torch.Tensor:
        from gguf import dequantize

        reader = self._open_reader()
        gguf_name = self._gguf_names[hf_name]
        tensor = next(t for t in reader.tensors if t.name == gguf_name)
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        out = torch.from_numpy(weights.copy())
        if self._meta["arch"] in _PERMUTED_ARCHS:
            if gguf_name.endswith("attn_q.weight"):
                out = _unpermute_rows(out, self.config.num_attention_heads)
            elif gguf_name.endswith("attn_k.weight"):
                out = _unpermute_rows(out, self.config.num_key_value_heads)
        return out.contiguous()

    # -- tokenizer ---------------------------------------------------------------------

    def load_tokenizer(self) -> Any:
        """The tokenizer (and chat template) stored in the GGUF metadata, cached on disk."""
        from transformers import AutoTokenizer

        tok_dir = self._dir / "tokenizer"
        if tok_dir.is_dir():
            try:
                return AutoTokenizer.from_pretrained(tok_dir)
            except (OSError, ValueError):
                pass
        _progress.note(f"converting the tokenizer of {self.path.name} (first run only)")
        tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        try:
            with atomic_dir(tok_dir) as tmp:
                tokenizer.save_pretrained(tmp)
        except OSError:
            pass
        return tokenizer


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp interleaves each head's two rotary halves row-wise; restore HF's
    # "first half, second half" order: (head, half, pair, in) <- (head, pair, half, in).
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-")
    while "--" in out:
        out = out.replace("--", "-")
    return out or "model"


def _config_from_dict(cfg: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    params = dict(cfg)
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, **params)
