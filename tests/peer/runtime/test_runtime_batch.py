"""Steps of several sessions in one forward (``SpanExecutor.forward_batch``) equal the
same steps computed one session at a time, within the f32 tolerance audits apply
(``verify.compare``): batching changes the order of float sums, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peer.runtime as rt
from verify import TOLERANCES, compare

# the qwen2 span crosses from full to sliding layers (window 8); mistral slides everywhere
SPANS = {"llama": (1, 5), "mistral": (0, 5), "qwen2": (1, 6)}


def _close(got: torch.Tensor, expected: torch.Tensor, depth: int) -> float:
    assert got.shape == expected.shape
    verdict = compare(got, expected, tolerance=TOLERANCES["f32"], depth=depth)
    assert verdict.ok, verdict
    return verdict.rel_l2


def _inputs(ex: rt.SpanExecutor, n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, ex.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "attention"), [("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", "sdpa"),
                                                ("qwen2", "eager")])
def test_a_batched_step_equals_the_lone_steps_at_different_positions(kind: str, attention: str,
                                                                    tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models[kind]), *SPANS[kind])
    for layer in ex.layers:  # the executor and its layers share the config: how they attend
        assert layer.self_attn.config is ex.layers[0].self_attn.config
    ex.layers[0].self_attn.config._attn_implementation = attention
    prefills = [3, 9, 14, 1, 20]  # before and past the sliding window
    steps = [[1, 1, 3, 1, 1], [1, 2, 1, 1, 1], [1, 1, 1, 4, 1]]  # tokens per session, three batches
    inputs = [_inputs(ex, p + sum(col), seed) for seed, (p, *col) in enumerate(zip(prefills, *steps))]
    alone, batched = [ex.open_session(40) for _ in prefills], [ex.open_session(40) for _ in prefills]
    for sid_a, sid_b, x, p in zip(alone, batched, inputs, prefills, strict=True):
        torch.testing.assert_close(ex.forward(sid_b, x[:, :p], 0), ex.forward(sid_a, x[:, :p], 0), rtol=0, atol=0)
    worst = 0.0
    for tokens in steps:
        expected, batch = [], []
        for sid_a, sid_b, x, n in zip(alone, batched, inputs, tokens, strict=True):
            at = ex.session_length(sid_a)
            expected.append(ex.forward(sid_a, x[:, at:at + n], at))
            batch.append(ex.check_step(sid_b, x[:, at:at + n], at))
        got = ex.forward_batch(batch)
        for a, b in zip(got, expected, strict=True):
            worst = max(worst, _close(a, b, ex.num_blocks))
    for sid_a, sid_b in zip(alone, batched, strict=True):
        assert ex.session_length(sid_a) == ex.session_length(sid_b)
        at = ex.session_length(sid_a)  # the caches hold the same: the next lone steps agree too
        y = _inputs(ex, 1, 99)
        _close(ex.forward(sid_b, y, at), ex.forward(sid_a, y, at), ex.num_blocks)
    print(f"{kind}: worst rel L2 of batched vs alone = {worst:.3g}")


def test_one_step_is_the_lone_path_bit_for_bit_and_sub_ranges_batch(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 1, 5)
    x = _inputs(ex, 6, 1)
    a, b = ex.open_session(8), ex.open_session(8)
    ex.forward(a, x[:, :5], 0)
    ex.forward(b, x[:, :5], 0)
    (got,) = ex.forward_batch([ex.check_step(b, x[:, 5:], 5)])
    assert torch.equal(got, ex.forward(a, x[:, 5:], 5))
    # sessions over a sub-range of the span batch with each other
    subs = [ex.open_session(8, start=2, end=5) for _ in range(3)]
    lone = [ex.open_session(8, start=2, end=5) for _ in range(3)]
    for i, (s, t) in enumerate(zip(subs, lone, strict=True)):
        ex.forward(s, x[:, :i + 1], 0)
        ex.forward(t, x[:, :i + 1], 0)
    got = ex.forward_batch([ex.check_step(s, x[:, 5:], i + 1) for i, s in enumerate(subs)])
    for i, (g, t) in enumerate(zip(got, lone, strict=True)):
        _close(g, ex.forward(t, x[:, 5:], i + 1), 3)


def test_batch_errors(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 1, 5)
    x = _inputs(ex, 1, 2)
    a, b, sub = ex.open_session(4), ex.open_session(4), ex.open_session(4, start=2, end=5)
    with pytest.raises(rt.InvalidArgument, match="at least one"):
        ex.forward_batch([])
    with pytest.raises(rt.InvalidArgument, match="one step of each session"):
        ex.forward_batch([ex.check_step(a, x, 0), ex.check_step(a, x, 0)])
    with pytest.raises(rt.InvalidArgument, match="same blocks"):
        ex.forward_batch([ex.check_step(a, x, 0), ex.check_step(sub, x, 0)])
    ex.forward(b, _inputs(ex, 2, 3), 0)
    stale = ex.check_step(b, x, 2)
    ex.forward(b, x, 0)  # a rollback to one token: the checked step is now past the length
    with pytest.raises(rt.PositionMismatch):
        ex.forward_batch([ex.check_step(a, x, 0), stale])
    with pytest.raises(rt.PositionMismatch):
        ex.check_step(a, x, 3)
    assert ex.session_length(a) == 0  # a refused batch leaves its sessions unchanged
