"""Batch arenas (``peer.runtime._kv``): a batch of the same sessions reads and writes
their caches in place; batches of changing members, lone steps of members, rollbacks
and closes give what the sessions give alone, and the arenas' memory is taken from the
cache budget and given back."""

from __future__ import annotations

from pathlib import Path

import torch

import peer.runtime as rt
from peer.runtime._kv import arena_of
from verify import TOLERANCES, compare


def _inputs(ex: rt.SpanExecutor, n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, ex.hidden_size, generator=torch.Generator().manual_seed(seed))


class _Twins:
    """Each session twice: one only ever stepped alone, one stepped in batches."""

    def __init__(self, ex: rt.SpanExecutor, limits: list[int]) -> None:
        self.ex = ex
        self.alone = [ex.open_session(n) for n in limits]
        self.batched = [ex.open_session(n) for n in limits]
        self.inputs = [_inputs(ex, n, seed) for seed, n in enumerate(limits)]

    def batch(self, members: list[int], tokens: list[int] | None = None, at: list[int] | None = None) -> None:
        """One batch of ``members`` (tokens each, at their lengths unless ``at`` says),
        checked against the same steps alone."""
        tokens = tokens or [1] * len(members)
        steps, expected = [], []
        for j, (i, n) in enumerate(zip(members, tokens, strict=True)):
            pos = self.ex.session_length(self.alone[i]) if at is None else at[j]
            x = self.inputs[i][:, pos:pos + n]
            expected.append(self.ex.forward(self.alone[i], x, pos))
            steps.append(self.ex.check_step(self.batched[i], x, pos))
        for got, want in zip(self.ex.forward_batch(steps), expected, strict=True):
            assert bool(torch.isfinite(got).all())
            verdict = compare(got, want, tolerance=TOLERANCES["f32"], depth=self.ex.num_blocks)
            assert verdict.ok, verdict

    def lone(self, i: int, hidden: torch.Tensor | None = None) -> None:
        pos = self.ex.session_length(self.alone[i])
        x = self.inputs[i][:, pos:pos + 1] if hidden is None else hidden
        want = self.ex.forward(self.alone[i], x, pos)
        got = self.ex.forward(self.batched[i], x, pos)
        if hidden is None:  # (a NaN step's output is NaN both ways)
            verdict = compare(got, want, tolerance=TOLERANCES["f32"], depth=self.ex.num_blocks)
            assert verdict.ok, verdict

    def arena(self, i: int) -> object:
        return arena_of(self.ex._get(self.batched[i]).cache)


def test_batches_of_changing_members_lone_steps_rollbacks_and_closes_equal_the_sessions_alone(
        tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 1, 5)
    t = _Twins(ex, [40, 24, 48, 32])
    t.batch([0, 1, 2, 3], tokens=[3, 9, 14, 1])  # prefills of different lengths
    t.batch([0, 1, 2, 3])
    assert t.arena(0) is None  # members batched together once before: stacked, no arena yet
    t.batch([0, 1, 2, 3])  # the third batch of the same members builds the first arena
    first = t.arena(0)
    assert first is not None
    assert all(t.arena(i) is first for i in range(4))
    for _ in range(3):
        t.batch([0, 1, 2, 3])
    assert all(t.arena(i) is first for i in range(4))  # the same members: the same arena, in place
    t.batch([3, 1, 0, 2])  # any order: still its rows
    assert t.arena(0) is first
    t.lone(2)  # a member alone writes its own row
    t.batch([0, 1])  # other members: stacked from their rows, twice, then a new arena
    t.batch([0, 1])
    assert t.arena(0) is first
    t.batch([0, 1])
    assert t.arena(0) is t.arena(1) is not first
    assert t.arena(2) is t.arena(3) is first
    for _ in range(3):
        t.batch([2, 3], tokens=[2, 1])
    assert t.arena(2) is not first
    # a rollback inside an arena: row 0 is cut back 3 tokens, row 1 goes on
    t.batch([0, 1], tokens=[1, 1], at=[ex.session_length(t.alone[0]) - 3, ex.session_length(t.alone[1])])
    t.batch([0, 1])
    ex.close_session(t.batched[3])
    ex.close_session(t.alone[3])
    t.batch([0, 1, 2])
    t.batch([0, 1, 2])


def test_a_rolled_back_nan_never_reaches_a_batch(tiny_models: dict[str, Path]) -> None:
    """Positions a row has cut are read (masked) by batches with longer rows: a cut
    zeroes them, so keys of a non-finite step that was rolled back weigh exactly zero."""
    ex = rt.load_span(str(tiny_models["llama"]), 1, 5)
    t = _Twins(ex, [30, 30])
    t.batch([0, 1], tokens=[4, 12])
    t.batch([0, 1])
    t.batch([0, 1])  # an arena: rows of 6 and 14 tokens
    assert t.arena(0) is not None
    nan = torch.full((1, 1, ex.hidden_size), float("nan"))
    t.lone(0, nan)  # row 0's positions 6 and 7 get NaN keys
    t.lone(0, nan)
    assert t.arena(0) is t.arena(1)
    t.batch([0, 1], tokens=[1, 1], at=[6, 14])  # row 0 rolls back over them; row 1 reads past them
    for _ in range(3):
        t.batch([0, 1])


def test_arenas_take_their_memory_from_the_budget_and_give_it_back(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 1, 5)
    per_token = ex.transient_bytes(1)
    ex.cache_bytes = (8 + 64) * per_token + 10 * per_token  # the two sessions, not a 2 x 64 arena
    t = _Twins.__new__(_Twins)
    t.ex, t.inputs = ex, [_inputs(ex, 8, 0), _inputs(ex, 64, 1)]
    t.batched = [ex.open_session(8), ex.open_session(64)]
    ex.cache_bytes = None  # the lone twins live outside the budget under test
    t.alone = [ex.open_session(8), ex.open_session(64)]
    ex.cache_bytes = (8 + 64) * per_token + 10 * per_token
    t.batch([0, 1], tokens=[2, 5])
    t.batch([0, 1])
    t.batch([0, 1])
    assert t.arena(0) is None  # no room for it: the batch stacks the rows as it goes, same results
    ex.cache_bytes = None
    baseline = ex.sessions.reserved_bytes
    t.batch([0, 1])
    assert t.arena(0) is not None
    assert ex.sessions.reserved_bytes == baseline + (2 * 64 - (8 + 64)) * per_token
    ex.close_session(t.batched[0])  # its row stays reserved while the arena lives
    assert ex.sessions.reserved_bytes == baseline + (2 * 64 - (8 + 64)) * per_token
    ex.close_session(t.batched[1])  # the last row: the arena is freed
    del t
    for sid in list(ex._sessions):
        ex.close_session(sid)
    assert ex.sessions.reserved_bytes == 0


def test_groups_that_take_turns_each_get_an_arena(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 1, 5)
    t = _Twins(ex, [20, 20, 20, 20])
    for i in range(4):
        t.lone(i, t.inputs[i][:, :3])
    for _ in range(3):  # {0, 1} and {2, 3} alternate: each is the same members a third time
        t.batch([0, 1])
        t.batch([2, 3])
    assert t.arena(0) is t.arena(1) is not None
    assert t.arena(2) is t.arena(3) is not None
    assert t.arena(0) is not t.arena(2)
