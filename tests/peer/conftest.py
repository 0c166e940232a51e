"""Fixtures shared by the peer tests: a tiny random Llama that can chat (it carries the
default model's tokenizer and chat template)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


CHAT_LAYERS = 4


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A directory with a tiny random Llama (4 layers, hidden 64) and SmolLM2's tokenizer:
    real tokens and a real chat template, over weights small enough for many servers."""
    from peer.runtime import DEFAULT_MODEL
    from peer.runtime._gguf import GGUFSource
    from peer.runtime._sources import builtin_gguf_path

    path = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = GGUFSource(builtin_gguf_path(DEFAULT_MODEL)).load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=CHAT_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    """A second, different tiny random Llama (2 layers, hidden 32, no tokenizer): a swarm
    serving two models lists both."""
    path = tmp_path_factory.mktemp("tiny-other")
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return str(path)
