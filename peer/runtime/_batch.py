"""Several sessions' steps through the span in one forward (batching across sessions).

Theory of operation. On a CPU (and more so on a GPU) a decode step of one token is
bound by reading the span's weights; sixteen sessions' steps computed as one batch
read them once. The sessions differ in length and position and each has its own KV
cache, so a batch is built per step:

- the inputs are stacked into ``[B, N, hidden]``, N the longest step, shorter rows
  padded at the end;
- position ids are per row (``position_i + t``), and the rotary embedding is computed
  for them, so each row is rotated exactly as it would be alone;
- each layer's attention writes its new keys and values through ``_BatchCache``, a
  cache view that appends row i's real tokens to session i's own cache (so the
  sessions' caches hold exactly what they would hold alone) and hands the attention
  the rows' full keys and values stacked and padded at the end. When the sessions are
  the rows of one arena (``peer.runtime._kv``: built by the third batch of the same
  sessions when the cache budget has room for it, and used by every next batch of
  exactly them) the caches already are that padded tensor: the new tokens are
  written into it in place and nothing is stacked;
- the attention mask is per row, built from what each session's cache layer says it
  will return (``get_mask_sizes``: its length and the absolute position of its first
  key, which also covers sliding-window layers that keep only the window): row i's
  query at position p sees key k of absolute position q iff k is one of its own keys,
  q <= p, and for sliding layers p - q < window. Padded keys are masked out (they add
  exactly zero weight), padded queries see one key (no NaN) and are dropped.

So a row's output equals its lone step up to float rounding (the matrix products of
a batch are summed in another order: about 1e-6 relative in f32), and greedy tokens
are the same. The layers are transformers' own (Llama, Mistral, Qwen2: anything whose
attention calls ``cache.update`` and takes a 4-D mask, with the ``sdpa`` or ``eager``
attention; with another the executor runs a batch's steps one after the other); a
batch of one step runs the ordinary one-session path, bit for bit.

All steps of a batch run the same blocks (one ``lo, hi``): the executor checks that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._errors import SessionMemoryExhausted

if TYPE_CHECKING:
    from ._kv import Arena
    from ._executor import SpanExecutor, _Session

__all__ = ["SessionStep", "BatchJob", "BATCHED_ATTENTION", "crop_cache"]

#: Attention implementations that take the per-row 4-D mask (others compute a batch's
#: steps one after the other).
BATCHED_ATTENTION = frozenset({"sdpa", "eager"})


@dataclass(slots=True, eq=False)
class SessionStep:
    """One session's checked step (``SpanExecutor.check_step``): ``hidden`` [1, n, H] at
    ``position``, at most the session's length (below it: a rollback, the cache is cut
there when the step runs). ``started`` is set once its cache is touched,
    ``finished`` once the session has advanced (a step started and not finished left
    half a step in the cache)."""

    session_id: bytes
    session: _Session
    hidden: torch.Tensor
    position: int
    started: bool = False
    finished: bool = False

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def blocks(self) -> int:
        return self.session.hi - self.session.lo

    @property
    def work(self) -> int:
        """Work units (tokens x blocks), what the scheduler charges."""
        return self.tokens * self.blocks


def crop_cache(cache: Any, position: int) -> None:
    """Cut a session's cache back to its first ``position`` tokens (a rollback), every
    layer (transformers' ``crop`` takes the count of tokens to remove, negated)."""
    for layer in cache.layers:
        held = layer.get_seq_length()
        if held > position:
            layer.crop(position - held)


class _BatchCache:
    """The cache the layers of a batched run see: row i's new keys and values go to
    session i's own cache; the attention gets all rows' keys and values, padded. With
    an arena (``peer.runtime._kv``: the sessions are its rows, in order) its growing
    layers are written and read in place."""

    def __init__(self, caches: list[Any], tokens: list[int], arena: Arena | None, starts: torch.Tensor) -> None:
        self._caches = caches
        self._tokens = tokens
        self._arena = arena
        self._starts = starts

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arena is not None and layer_idx in self._arena.keys:
            layers = [cache.layers[layer_idx] for cache in self._caches]
            return self._arena.write(layer_idx, key_states, value_states, layers, self._starts, self._tokens)
        rows = []
        for i, (cache, n) in enumerate(zip(self._caches, self._tokens, strict=True)):
            rows.append(cache.update(key_states[i:i + 1, :, :n], value_states[i:i + 1, :, :n], layer_idx,
                                     *args, **kwargs))
        length = max(k.shape[2] for k, _ in rows)
        b, heads, _, dim = key_states.shape
        keys = key_states.new_empty(b, heads, length, dim)
        values = value_states.new_empty(b, heads, length, value_states.shape[3])
        for i, (k, v) in enumerate(rows):
            held = k.shape[2]
            keys[i, :, :held] = k[0]
            values[i, :, :held] = v[0]
            if held < length:  # masked out, but must be finite: 0 x NaN would be NaN
                keys[i, :, held:] = 0
                values[i, :, held:] = 0
        return keys, values


#: Batches of the same sessions before the next one builds them an arena, and how
#: many sets of members are remembered (groups that take turns each count their own).
_STABLE_BATCHES = 3
_REMEMBERED = 8


def _arena_for(ex: SpanExecutor, steps: Sequence[SessionStep]) -> tuple[Arena, list[int]] | None:
    """The arena whose rows are these steps' sessions (and each one's row): the one
    they already sit in, or a new one if they made the last batches too and the cache
    budget has room for it; None if not.

    A new arena holds every row up to the largest ``max_length`` of its sessions, so
    that no row ever grows: it takes from the budget what that is beyond the sessions'
    own reservations, and a session moved out of an older arena leaves a hole there
    that stays reserved (its reservation's worth) until that arena is freed."""
    from ._kv import arena_of, build_arena, shared_arena  # imports transformers: on first use

    caches = [s.session.cache for s in steps]
    found = shared_arena(caches)
    if found is not None:
        return found
    lo, hi = steps[0].session.lo, steps[0].session.hi
    # Building one costs about one batch step (copies, and page faults on the new
    # memory), so only for members that were batched together twice before: while
    # sessions come and go every step, stacking is cheaper than rebuilding.
    members = frozenset(id(s.session) for s in steps)
    with ex._budget:  # batches on other compute threads count theirs
        seen = ex._batch_members.pop(members, 0) + 1
        ex._batch_members[members] = seen  # (most recent last)
        while len(ex._batch_members) > _REMEMBERED:
            del ex._batch_members[next(iter(ex._batch_members))]
    if seen < _STABLE_BATCHES:
        return None
    capacity = max(s.session.max_length for s in steps)
    extra = max(0, len(steps) * ex._cache_bytes(capacity, lo, hi) - sum(s.session.reserved for s in steps))
    holes = [(old, s.session.reserved) for s in steps if (old := arena_of(s.session.cache)) is not None]
    try:
        ex.reserve(extra + sum(n for _, n in holes))
    except SessionMemoryExhausted:
        return None
    arena = build_arena(caches, capacity)
    if arena is None:
        ex.release(extra + sum(n for _, n in holes))
        return None
    ex._release_with(arena, extra)
    for old, n in holes:
        ex._release_with(old, n)
    return arena, list(range(len(steps)))


class BatchJob:
    """The steps of several sessions (same blocks) as one forward; ``run`` computes it
    in this thread and returns each step's output ([1, n_i, H], in order).

    A job is run once. If it fails half-way the sessions whose ``started`` is set hold
    half a step in their caches: close them.
    """

    def __init__(self, executor: SpanExecutor, steps: Sequence[SessionStep]) -> None:
        self._ex = executor
        self.steps = list(steps)

    @property
    def work(self) -> int:
        return sum(s.work for s in self.steps)

    def run(self) -> list[torch.Tensor]:
        ex, given = self._ex, self.steps
        lo, hi = given[0].session.lo, given[0].session.hi
        for s in given:
            if s.position < s.session.length:  # a rollback: cut its cache there first
                s.started = True
                crop_cache(s.session.cache, s.position)
        placed = _arena_for(ex, given)
        arena = None
        if placed is not None:  # the rows of the arena, in order
            arena, rows = placed
            self.steps = [s for _, s in sorted(zip(rows, given, strict=True), key=lambda pair: pair[0])]
        steps = self.steps
        tokens = [s.tokens for s in steps]
        width = max(tokens)
        with torch.inference_mode():
            x = torch.zeros(len(steps), width, ex.hidden_size, device=ex.device, dtype=ex.dtype)
            positions = torch.empty(len(steps), width, dtype=torch.long)
            for i, s in enumerate(steps):
                x[i, :s.tokens] = s.hidden[0].to(device=ex.device, dtype=ex.dtype)
                row = torch.arange(s.position, s.position + width)
                row[s.tokens:] = s.position + s.tokens - 1  # padded queries: any valid position
                positions[i] = row
            positions = positions.to(ex.device)
            masks = {kind: self._mask(kind, lo, hi, positions) for kind in set(ex._layer_types[lo:hi])}
            with ex._rotary_lock:
                embeddings = ex._rotary(x, positions)
            cache = _BatchCache([s.session.cache for s in steps], tokens, arena, positions[:, 0])
            for s in steps:
                s.started = True
            with ex._gate.hold(lo):
                x = ex._run_layers(x, (positions, masks, embeddings), cache, lo, lo, hi)
        out = {id(s): x[i:i + 1, :s.tokens].clone() for i, s in enumerate(steps)}
        now = ex._clock()
        for s in steps:
            s.session.length = s.position + s.tokens
            s.session.last_used = now
            s.finished = True
        return [out[id(s)] for s in given]

    def _mask(self, kind: str, lo: int, hi: int, positions: torch.Tensor) -> torch.Tensor:
        """The ``[B, 1, N, K]`` mask of the layers of ``kind`` (see the module docstring)."""
        ex = self._ex
        first = ex._layer_types[lo:hi].index(kind)  # a cache slot of that kind (slots count from lo)
        sizes = [s.session.cache.layers[first].get_mask_sizes(s.tokens)  # type: ignore[attr-defined]
                 for s in self.steps]
        width = positions.shape[1]
        keys = max(length for length, _ in sizes)
        device = positions.device
        k = torch.arange(keys, device=device)
        allowed = torch.zeros(len(self.steps), 1, width, keys, dtype=torch.bool, device=device)
        window = getattr(ex._config, "sliding_window", None) if kind == "sliding_attention" else None
        for i, (s, (length, offset)) in enumerate(zip(self.steps, sizes, strict=True)):
            q = positions[i, :s.tokens, None]  # absolute query positions
            absolute = offset + k[None, :]
            row = (k[None, :] < length) & (absolute <= q)
            if window is not None:
                row &= q - absolute < window
            allowed[i, 0, :s.tokens] = row
            allowed[i, 0, s.tokens:, 0] = True
        if getattr(ex._config, "_attn_implementation", "sdpa") == "sdpa":
            return allowed
        blocked = torch.finfo(ex.dtype).min
        return torch.zeros(allowed.shape, dtype=ex.dtype, device=device).masked_fill_(~allowed, blocked)
