"""Spans keep their float32 CPU linear weights packed for oneDNN (``peer.runtime._packed``):
the same function as ``nn.Linear``, the same bytes, and modules still convert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import peer.runtime as rt
from peer.runtime._packed import PackedLinear, dense_copy, pack_linears, pack_weight, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN packed linear")


def test_a_packed_linear_computes_what_the_linear_does_and_converts() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(48, 80)
    packed = PackedLinear(dense, pack_weight(dense.weight, min_params=0))
    assert packed.weight.is_mkldnn
    x = torch.randn(3, 5, 48)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-6)
        copied = dense_copy(nn.Sequential(packed))
        assert not copied[0].weight.is_mkldnn
        torch.testing.assert_close(copied(x), dense(x), rtol=1e-5, atol=1e-6)
        assert packed.weight.is_mkldnn  # the copy left the original packed
        exact = nn.Sequential(packed).to(torch.float64)
        torch.testing.assert_close(exact(x.double()), dense.double()(x.double()), rtol=1e-12, atol=1e-12)


def test_small_linears_stay_dense() -> None:
    holder = pack_linears(nn.Sequential(nn.Linear(64, 64), nn.Linear(1024, 1024)))
    assert type(holder[0]) is nn.Linear
    assert isinstance(holder[1], PackedLinear)


def test_a_packed_span_equals_its_dense_copy(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 0, 4)
    assert not any(isinstance(m, PackedLinear) for m in ex.layers.modules())  # a tiny model's are small
    pack_linears(ex.layers, min_params=0)
    assert not any(type(m) is nn.Linear for m in ex.layers.modules())
    dense = dense_copy(ex.layers)
    assert ex.weight_bytes == sum(p.numel() * p.element_size() for p in dense.parameters())
    x = torch.randn(1, 7, ex.hidden_size, generator=torch.Generator().manual_seed(1))
    got = ex.forward_once(x)
    ex._layers = dense  # the same span computed with nn.Linear's dense weights
    torch.testing.assert_close(got, ex.forward_once(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_the_client_head_is_packed_and_scores_what_the_dense_head_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from peer.runtime import _head
    from tests.peer.runtime.conftest import TINY

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, tie_word_embeddings=tied, **{**TINY, "vocab_size": 1100})
    model = LlamaForCausalLM(config).eval()  # 1100 x 64: a head big enough to pack
    model.save_pretrained(tmp_path / "m")
    head = rt.load_head(str(tmp_path / "m"))
    assert head._modules.lm_head.is_mkldnn
    assert not head._modules.embed.weight.is_mkldnn  # lookups read it dense
    hidden = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model.lm_head(model.model.norm(hidden))[0]
        torch.testing.assert_close(head.logits_rows(hidden), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.logits(hidden), want[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.embed([3, 1099])[0], model.model.embed_tokens.weight[[3, 1099]])
    monkeypatch.setattr(_head, "PACKED_TIED_BYTES", 0)
    again = rt.load_head(str(tmp_path / "m"))
    # A tied head past the bound keeps computing with the embedding matrix itself.
    assert again._modules.lm_head.is_mkldnn is not tied
    if tied:
        assert again._modules.lm_head is again._modules.embed.weight
