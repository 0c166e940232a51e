"""Fixtures for the runtime tests: tiny random-init models saved as safetensors.

Each tiny model is a real transformers model of the family (random weights, seeded),
saved with ``save_pretrained``: Llama as one ``model.safetensors``, Mistral and Qwen2
sharded with a ``model.safetensors.index.json``. Sliding windows are smaller than the
generated length, so the span's masks and caches are exercised past the window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.15,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def make_tiny(kind: str, path: Path, *, seed: int = 0) -> Path:
    """Save a random-init tiny model of family ``kind`` to ``path`` and return it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama":
        cfg = LlamaConfig(num_hidden_layers=7, tie_word_embeddings=False, **TINY)
        shard = None
    elif kind == "mistral":
        cfg = MistralConfig(num_hidden_layers=5, sliding_window=8, head_dim=16, tie_word_embeddings=False, **TINY)
        shard = "60KB"
    elif kind == "qwen2":
        cfg = Qwen2Config(
            num_hidden_layers=6, use_sliding_window=True, sliding_window=8, max_window_layers=3,
            tie_word_embeddings=True, **TINY,
        )
        shard = "60KB"
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if shard is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny(kind, root / kind) for kind in ("llama", "mistral", "qwen2")}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, request) -> None:
    # Tiny-model tests write digests to a throwaway cache; the SmolLM2 tests keep the
    # user's cache (the converted GGUF is worth keeping between runs).
    if "smollm2" not in request.node.nodeid:
        monkeypatch.setenv("SWARM_PEER_CACHE", str(tmp_path_factory.getbasetemp() / "swarm-peer-cache"))
