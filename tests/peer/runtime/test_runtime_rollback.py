"""Rollback of a session (speculative decoding, spec 11.1): a step at a position below
the session's length cuts the KV cache there, so what follows equals a fresh session
fed the kept prefix; a position past the length is refused and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peer.runtime as rt
from peer.runtime import PositionMismatch
from verify import TOLERANCES, compare


def _x(ex: rt.SpanExecutor, n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, ex.hidden_size, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, expected: torch.Tensor, depth: int) -> None:
    verdict = compare(got, expected, tolerance=TOLERANCES["f32"], depth=depth)
    assert verdict.ok, verdict


@pytest.mark.parametrize(("kind", "batched"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_rollback_equals_a_fresh_session_of_the_kept_prefix(kind: str, batched: bool,
                                                            tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models[kind]), 0, 3)
    prompt, draft, fix = _x(ex, 5, 0), _x(ex, 4, 1), _x(ex, 2, 2)
    sid = ex.open_session(32)
    ex.forward(sid, prompt, 0)
    ex.forward(sid, draft, 5)  # 9 tokens; keep 2 of the draft, then roll back to 7
    if batched:
        other = ex.open_session(32)
        ex.forward(other, prompt, 0)
        got = ex.forward_batch([ex.check_step(sid, fix, 7), ex.check_step(other, fix, 5)])[0]
    else:
        got = ex.forward(sid, fix, 7)
    assert ex.session_length(sid) == 9
    fresh = ex.open_session(32)
    expected = ex.forward(fresh, torch.cat([prompt, draft[:, :2], fix], dim=1), 0)[:, 7:]
    _close(got, expected, ex.num_blocks)
    y = _x(ex, 1, 3)  # and the caches agree afterwards
    _close(ex.forward(sid, y, 9), ex.forward(fresh, y, 9), ex.num_blocks)


def test_a_position_past_the_length_is_refused_and_the_session_survives(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 0, 2)
    sid = ex.open_session(16)
    first = ex.forward(sid, _x(ex, 3, 0), 0)
    with pytest.raises(PositionMismatch, match="past the session's length 3"):
        ex.forward(sid, _x(ex, 1, 1), 4)
    assert ex.session_length(sid) == 3
    again = ex.forward(sid, _x(ex, 3, 0), 0)  # a rollback to 0: the same bits as the first prefill
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_a_sliding_window_past_its_window_cannot_roll_back(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["mistral"]), 0, 2)  # window 8
    sid = ex.open_session(32)
    ex.forward(sid, _x(ex, 10, 0), 0)
    with pytest.raises(PositionMismatch, match="sliding-window"):
        ex.check_step(sid, _x(ex, 1, 1), 5)
    assert ex.session_length(sid) == 10
