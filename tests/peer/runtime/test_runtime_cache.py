"""The converted-model cache is checked on load (issue 10, item 8): a block edited on
disk is converted again from the GGUF file, with a warning, so the span still computes
the honest output; the cache root is private (0700)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import peer.runtime as rt
from peer.runtime._cache import HashManifest, cache_root, file_sha256

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 3, 4, 2, 128


def make_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """A tiny random Llama as an F32 GGUF file, written with the gguf package."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-cache-test")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([1] * VOCAB)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    rand("token_embd.weight", VOCAB, HIDDEN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    rand("output.weight", VOCAB, HIDDEN)
    kv_rows = KV * HIDDEN // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for name, rows, cols in (("attn_q", HIDDEN, HIDDEN), ("attn_k", kv_rows, HIDDEN), ("attn_v", kv_rows, HIDDEN),
                                 ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", INTER, HIDDEN),
                                 ("ffn_up", INTER, HIDDEN), ("ffn_down", HIDDEN, INTER)):
            rand(f"blk.{i}.{name}.weight", rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWARM_PEER_CACHE", str(tmp_path / "cache"))
    return make_tiny_gguf(tmp_path / "tiny.gguf")


def _entry_dir(tmp_path: Path) -> Path:
    (entry,) = (tmp_path / "cache" / "gguf").iterdir()
    return entry


def test_tampered_block_is_reconverted_with_a_warning(tiny_gguf: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(1))
    honest = rt.load_span(str(tiny_gguf), 0, 2)
    expected = honest.forward_once(x)
    block = _entry_dir(tmp_path) / "block-0000.safetensors"
    tensors = load_file(block)
    save_file({name: t * 1.5 for name, t in tensors.items()}, str(block))  # the attack: same names, scaled weights

    with caplog.at_level(logging.WARNING, logger="swarm.runtime"):
        again = rt.load_span(str(tiny_gguf), 0, 2)
    assert again.model_id == honest.model_id
    assert torch.equal(again.forward_once(x), expected)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "block-0000" in r.getMessage()]
    assert len(warnings) == 1
    assert "converting it again" in warnings[0].getMessage()
    assert all(torch.equal(a, b) for a, b in zip(load_file(block).values(), tensors.values()))  # repaired on disk

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="swarm.runtime"):
        rt.load_span(str(tiny_gguf), 0, 2)
    assert not [r for r in caplog.records if "converting it again" in r.getMessage()]  # now it verifies


def test_manifest_is_keyed_by_the_source_digest(tiny_gguf: Path, tmp_path: Path) -> None:
    rt.load_span(str(tiny_gguf), 2, 3)
    entry = _entry_dir(tmp_path)
    manifest = json.loads((entry / HashManifest.NAME).read_text())
    assert manifest["source"] == file_sha256(tiny_gguf)
    assert set(manifest["entries"]) == {"meta.json", "block-0002.safetensors"}
    assert HashManifest(entry, manifest["source"]).check("block-0002.safetensors") is True
    assert HashManifest(entry, "0" * 64).check("block-0002.safetensors") is None  # another source's manifest
    (entry / "block-0002.safetensors").write_bytes(b"garbage")
    assert HashManifest(entry, manifest["source"]).check("block-0002.safetensors") is False


def test_tampered_meta_is_rebuilt(tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(2))
    expected = rt.load_span(str(tiny_gguf), 1, 2).forward_once(x)
    meta_path = _entry_dir(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["rms_norm_eps"] = 0.5
    meta_path.write_text(json.dumps(meta, sort_keys=True))
    with caplog.at_level(logging.WARNING, logger="swarm.runtime"):
        again = rt.load_span(str(tiny_gguf), 1, 2)
    assert torch.equal(again.forward_once(x), expected)
    assert any("meta.json" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_cache_root_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_PEER_CACHE", str(tmp_path / "fresh" / "cache"))
    root = cache_root()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    open_root = tmp_path / "open"
    open_root.mkdir(mode=0o777)
    os.chmod(open_root, 0o777)
    monkeypatch.setenv("SWARM_PEER_CACHE", str(open_root))
    assert stat.S_IMODE(cache_root().stat().st_mode) == 0o700
