"""The built-in SmolLM2-135M-Instruct (GGUF) split into spans vs transformers on the same file.

The reference is ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``: transformers'
own GGUF loader (dequantize everything, un-permute q/k). Our spans dequantize only their
own blocks. Both run float32 on CPU, so tokens must be identical and logits nearly so.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

import peer.runtime as rt
from peer.runtime._sources import builtin_gguf_path

MODEL = "smollm2-135m-instruct"
SPANS = [(0, 10), (10, 20), (20, 30)]
# Prompts whose greedy answers run the full 64 tokens (none ends early on EOS).
PROMPTS = [
    "Write a story about a dragon who learns to read.",
    "Explain in detail how a steam engine works.",
    "Describe the water cycle step by step.",
    "Write a long poem about autumn leaves.",
    [
        {"role": "system", "content": "You are a patient programming tutor."},
        {"role": "user", "content": "Write a Python function that checks whether a string is a palindrome, and explain it."},
    ],
]
SHORT = "What is the capital of France?"  # answered in 8 tokens, then EOS
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def head() -> rt.ClientHead:
    return rt.load_head(MODEL)


@pytest.fixture(scope="module")
def spans() -> list[rt.SpanExecutor]:
    return [rt.load_span(MODEL, a, b) for a, b in SPANS]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = builtin_gguf_path(MODEL)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _ref_generate(reference, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    out = reference.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(ids):].tolist(), [x[0] for x in out.logits]


def test_model_info_and_id(spans: list[rt.SpanExecutor], head: rt.ClientHead) -> None:
    t0 = time.monotonic()
    info = rt.resolve_model(MODEL)
    print(f"resolve_model (warm cache): {time.monotonic() - t0:.2f} s")
    assert re.fullmatch(r"smollm2-135m-instruct@[0-9a-f]{16}", info.model_id)
    assert (info.num_blocks, info.hidden_size) == (30, 576)
    assert {ex.model_id for ex in spans} == {info.model_id}
    assert head.model_id == info.model_id
    assert head.eos_token_ids == frozenset({2})


def test_tokenizer_and_chat_template_from_gguf(head: rt.ClientHead) -> None:
    from transformers import AutoTokenizer

    path = builtin_gguf_path(MODEL)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    msgs = [{"role": "user", "content": "Hi there!"}]
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant\n" in text
    assert head.encode_prompt(msgs) == ref(text, add_special_tokens=False)["input_ids"]
    assert head.encode_prompt("Hi there!") == head.encode_prompt(msgs)
    assert head.encode_prompt("Hi there!", chat=False) == ref("Hi there!")["input_ids"]
    assert head.decode(head.encode_prompt("plain text", chat=False)) == "plain text"
    with pytest.raises(rt.InvalidArgument):
        head.encode_prompt([{"role": "user"}])


@pytest.mark.slow
def test_three_spans_match_transformers_generate(head, spans, reference) -> None:
    worst = 0.0
    for prompt in PROMPTS:
        ids = head.encode_prompt(prompt)
        logits: list[torch.Tensor] = []
        ours = rt.generate_local(head, spans, ids, rt.SamplingParams(max_new_tokens=NEW_TOKENS), logits_out=logits)
        theirs, ref_logits = _ref_generate(reference, ids, NEW_TOKENS)
        assert ours == theirs, (prompt, head.decode(ours), head.decode(theirs))
        assert len(ours) == NEW_TOKENS
        diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits, strict=True))
        worst = max(worst, diff)
        print(f"{len(ours)} tokens, max |logit diff| {diff:.3g}: {head.decode(ours)[:60]!r}")
    print(f"SmolLM2 3-span chain vs transformers: max |logit difference| = {worst:.3g} (fp32)")
    assert worst < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_produces_text(quant: str, head, spans) -> None:
    ids = head.encode_prompt(PROMPTS[1])
    params = rt.SamplingParams(max_new_tokens=NEW_TOKENS)
    fp32 = rt.generate_local(head, spans, ids, params)
    mixed = [spans[0], rt.load_span(MODEL, 10, 20, quant=quant), spans[2]]
    # Teacher-forced agreement: feed the fp32 continuation, compare each step's top-1.
    sid = [ex.open_session(len(ids) + NEW_TOKENS) for ex in mixed]
    hidden = head.embed(ids + fp32[:-1])
    for ex, s in zip(mixed, sid, strict=True):
        hidden = ex.forward(s, hidden, 0)
    top1 = [int(head.logits(hidden[:, i]).argmax()) for i in range(len(ids) - 1, hidden.shape[1])]
    agree = sum(a == b for a, b in zip(top1, fp32, strict=True)) / len(fp32)
    for ex, s in zip(mixed, sid, strict=True):
        ex.close_session(s)
    free_run = rt.generate_local(head, mixed, ids, params)
    text = head.decode(free_run)
    same_prefix = next((i for i, (a, b) in enumerate(zip(free_run, fp32)) if a != b), min(len(free_run), len(fp32)))
    print(f"{quant} span [10,20): greedy top-1 agreement with fp32 over {len(fp32)} tokens = {agree:.3f}; "
          f"free-running tokens identical for the first {same_prefix}; text {text[:60]!r}")
    assert text.strip()


@pytest.mark.slow
def test_stop_strings_and_eos(head, spans) -> None:
    ids = head.encode_prompt(SHORT)
    done = rt.relay_local(head, spans, rt.TokenStream(head, rt.SamplingParams(max_new_tokens=32), ids))
    assert done.finish_reason == "eos"
    assert done.new_ids[-1] == 2  # "The capital of France is Paris."
    assert "Paris" in done.text
    stopped = rt.relay_local(head, spans, rt.TokenStream(head, rt.SamplingParams(max_new_tokens=32, stop=(" Paris",)), ids))
    assert stopped.finish_reason == "stop"
    assert stopped.text == "The capital of France is"
    short = rt.relay_local(head, spans, rt.TokenStream(head, rt.SamplingParams(max_new_tokens=3), ids))
    assert short.finish_reason == "length"
    assert len(short.new_ids) == 3
    a = rt.generate_local(head, spans, ids, rt.SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7))
    b = rt.generate_local(head, spans, ids, rt.SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7))
    assert a == b


@pytest.mark.slow
def test_gguf_span_dequantizes_only_its_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_PEER_CACHE", str(tmp_path))
    ex = rt.load_span(MODEL, 28, 30)
    assert ex.model_id == rt.resolve_model(MODEL).model_id
    (entry,) = (tmp_path / "gguf").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "block-0028.safetensors", "block-0029.safetensors", "hashes.json", "meta.json",
    ]
    assert ex.weight_bytes == sum(p.numel() * 4 for p in ex.layers.parameters())
    assert ex.weight_bytes < 2 * 4 * 4_000_000  # two blocks (~3.5M params each), nothing else
