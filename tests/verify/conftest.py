"""Fixtures for the verification tests: a tiny random Llama saved as safetensors, a
second one with other weights (a cheater's), and helpers to run loopback swarms."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


NUM_LAYERS = 6


def _save(path, seed: int, initializer_range: float = 0.02):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=2, bos_token_id=1, tie_word_embeddings=False,
                         initializer_range=initializer_range)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_verify(tmp_path_factory):
    """(path, transformers model) of the model every honest server serves."""
    path = tmp_path_factory.mktemp("tiny-verify")
    return str(path), _save(path, 0)


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory):
    """Path of a model with the same shapes and other weights."""
    path = tmp_path_factory.mktemp("tiny-other")
    _save(path, 1)
    return str(path)


@pytest.fixture(scope="session")
def ill_conditioned(tmp_path_factory):
    """Path of a tiny Llama with large weights (initializer range 1.0): on inputs no
    model produces (random hidden states), two honest computations of its blocks
    differ by more than the f32 thresholds calibrated on real activations, as
    SmolLM2's do (issue 11, attack 3)."""
    path = tmp_path_factory.mktemp("tiny-ill-conditioned")
    _save(path, 0, initializer_range=1.0)
    return str(path)
