"""A session step longer than ``chunk_tokens`` is computed in chunks into the session's
cache (issue 10 item 4: a long prefill's scratch memory no longer grows with the square
of its length): equal to the one-call step up to float rounding, and the session goes
on from it as from the one call. Mistral's sliding window (8) is shorter than a chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peer.runtime as rt


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_a_chunked_prefill_equals_the_one_call(kind: str, tiny_models: dict[str, Path]) -> None:
    span = rt.load_span(str(tiny_models[kind]), 1, 4)
    torch.manual_seed(0)
    prompt, steps = torch.randn(1, 45, span.hidden_size), torch.randn(3, 1, 1, span.hidden_size)
    whole, chunked = span.open_session(64), span.open_session(64)
    expected = span.forward(whole, prompt, 0)
    job = span.forward_job(chunked, prompt, 0, quantum=32, chunk_tokens=16)
    assert len(job.pieces) > 3  # cut by tokens (3 chunks) and by blocks
    assert all(work <= 32 for work, _ in job.pieces)
    torch.testing.assert_close(job.run(), expected, rtol=1e-5, atol=1e-5)
    for i, step in enumerate(steps):
        torch.testing.assert_close(span.forward(chunked, step, 45 + i), span.forward(whole, step, 45 + i),
                                   rtol=1e-5, atol=1e-5)
    # a step no longer than a chunk is not cut by tokens: the same bits as one call
    again = span.open_session(64)
    short = span.forward_job(again, prompt[:, :16], 0, quantum=10**6, chunk_tokens=16)
    assert len(short.pieces) == 1
    other = span.open_session(64)
    assert torch.equal(short.run(), span.forward(other, prompt[:, :16], 0))
