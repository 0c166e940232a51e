"""A session's KV cache, and arenas that let a batch of sessions read theirs without copies.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, a
copy of the layer's whole history on every step. ``GrowingLayer`` keeps them in a
buffer instead, writes a step's tokens into it in place and hands the attention a
view of the first ``length`` positions. Its buffer is one of two kinds:

- its own, ``[1, heads, capacity, dim]``, reallocated with twice the capacity when a
  step does not fit (never past the session's ``max_length``, which its memory
  reservation covers): amortised O(1) copies per token;
- a row of an ``Arena``: one ``[rows, heads, capacity, dim]`` tensor per layer whose
  rows are the caches of the sessions of one batch. A batch of exactly those sessions
  writes all rows' new tokens with one indexed copy per layer and gives the attention
  the arena itself (``[:, :, :longest]``, padded rows masked), where the batch would
  otherwise stack every session's history into a padded tensor, layer by layer, step
  by step (``peer.runtime._batch``). The arena's capacity is the largest
  ``max_length`` of its sessions, so a row never has to grow; its memory is taken
  from the cache budget (``SpanExecutor``: the part beyond the sessions' own
  reservations) and is only touched as far as the rows reach.

The positions of a row past its length are read (masked) by batches whose other rows
are longer, so they must hold finite numbers (masked weights are exactly zero, and
0 x NaN is NaN): an arena zeroes each row past its length as far as the batch reads
(``clean``), and a rollback zeroes what it cuts. A session moved to another arena, or
closed, leaves its row as a hole, which the executor keeps reserved until the arena is
freed (``weakref.finalize``).

Sliding-window layers keep transformers' own class: they hold at most the window and
do not grow. Threads: a session's layers are only touched by the one thread running
its step (the executor's rule); an arena is written whole only by a batch holding
all of its rows, and built only from the sessions of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["Arena", "GrowingLayer", "session_cache", "shared_arena", "arena_of"]

#: Capacity of a layer's own first buffer when its first step is shorter (tokens).
_FIRST_CAPACITY = 32


class Arena:
    """The rows of several sessions' caches: ``keys[j]``, ``values[j]`` of shape
    ``[rows, heads, capacity, dim]`` for slot j of their growing layers."""

    __slots__ = ("rows", "capacity", "keys", "values", "clean", "index", "__weakref__")

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows = rows
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.clean = 0  # every row is finite below this position (written or zeroed)
        self.index: torch.Tensor | None = None  # 0..rows-1, the rows a one-token step writes

    def write(self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, layers: Sequence[GrowingLayer],
              starts: torch.Tensor, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch step of rows 0..rows-1 (``layers`` in row order): row i's ``tokens[i]``
        new keys and values go to positions ``starts[i]``..; returns the arena's keys and
        values as far as the longest row now reaches."""
        k, v = self.keys[slot], self.values[slot]
        ends = [layer.length + n for layer, n in zip(layers, tokens, strict=True)]
        longest = max(ends)
        if longest > self.clean:
            self._zero_past(layers, min(self.capacity, max(2 * longest, _FIRST_CAPACITY)))
        if all(n == 1 for n in tokens):
            if self.index is None:
                self.index = torch.arange(self.rows, device=k.device)
            k[self.index, :, starts] = key_states[:, :, 0]
            v[self.index, :, starts] = value_states[:, :, 0]
        else:
            for i, (layer, n) in enumerate(zip(layers, tokens, strict=True)):
                k[i, :, layer.length:layer.length + n] = key_states[i, :, :n]
                v[i, :, layer.length:layer.length + n] = value_states[i, :, :n]
        for layer, end in zip(layers, ends, strict=True):
            layer.length = end
        return k[:, :, :longest], v[:, :, :longest]

    def _zero_past(self, layers: Sequence[GrowingLayer], clean: int) -> None:
        """Zero every row of every slot from its length (``layers``' lengths: between
        steps a session's layers all hold as many tokens) up to ``clean``; the first slot
        a batch step writes moves ``clean`` for all of them."""
        for slot in self.keys:
            for i, layer in enumerate(layers):
                start = max(self.clean, layer.length)
                if start < clean:
                    self.keys[slot][i, :, start:clean] = 0
                    self.values[slot][i, :, start:clean] = 0
        self.clean = clean


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer of at most ``limit`` tokens, appended to in place."""

    def __init__(self, limit: int) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        super().__init__()
        self.limit = limit
        self.length = 0
        self.arena: Arena | None = None
        self.row = 0

    # transformers reads (and clears) ``keys`` / ``values``: views of the buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[self.row:self.row + 1, :, :self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("a GrowingLayer's keys are written by update")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[self.row:self.row + 1, :, :self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("a GrowingLayer's values are written by update")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            self._own(key_states, value_states, end)
        assert self._k is not None
        assert self._v is not None
        self._k[self.row:self.row + 1, :, self.length:end] = key_states
        self._v[self.row:self.row + 1, :, self.length:end] = value_states
        self.length = end
        return self._k[self.row:self.row + 1, :, :end], self._v[self.row:self.row + 1, :, :end]

    def _own(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> None:
        """Move to a buffer of its own that holds ``end`` tokens (doubling)."""
        held = 0 if self._k is None else self._k.shape[-2]
        # Past the limit only if a caller overruns its session's checks: then exactly what it needs.
        capacity = max(end, min(self.limit, max(2 * held, _FIRST_CAPACITY)))
        k = key_states.new_empty(1, key_states.shape[1], capacity, key_states.shape[-1])
        v = value_states.new_empty(1, value_states.shape[1], capacity, value_states.shape[-1])
        if self._k is not None and self._v is not None and self.length:
            k[:, :, :self.length] = self._k[self.row:self.row + 1, :, :self.length]
            v[:, :, :self.length] = self._v[self.row:self.row + 1, :, :self.length]
        self._k, self._v, self.row, self.arena = k, v, 0, None

    def join(self, arena: Arena, slot: int, row: int) -> None:
        """Copy this layer's keys and values into ``arena``'s row and use it from now on
        (a layer with no step yet joins empty)."""
        k, v = arena.keys[slot], arena.values[slot]
        if self._k is not None and self._v is not None and self.length:
            k[row, :, :self.length] = self._k[self.row, :, :self.length]
            v[row, :, :self.length] = self._v[self.row, :, :self.length]
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self._k, self._v, self.arena, self.row = k, v, arena, row

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negated count of tokens to remove, got {tokens_to_remove}")
        if not tokens_to_remove or self._k is None or self._v is None:
            return
        cut = max(0, self.length + tokens_to_remove)
        if self.arena is not None:  # what it cut is read (masked) by batches with longer rows
            self._k[self.row, :, cut:self.length] = 0
            self._v[self.row, :, cut:self.length] = 0
        self.length = cut

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        self.arena = None
        super().reset()


def session_cache(config: Any, limit: int) -> DynamicCache:
    """A cache for ``config``'s layers holding at most ``limit`` tokens: its full-attention
    layers are ``GrowingLayer``s, its sliding-window layers transformers' own."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(limit) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _growing(cache: Any) -> list[tuple[int, GrowingLayer]]:
    return [(slot, layer) for slot, layer in enumerate(cache.layers) if isinstance(layer, GrowingLayer)]


def arena_of(cache: Any) -> Arena | None:
    """The arena ``cache``'s layers sit in, if any."""
    for _, layer in _growing(cache):
        return layer.arena
    return None


def shared_arena(caches: Sequence[Any]) -> tuple[Arena, list[int]] | None:
    """If every growing layer of ``caches`` sits in one arena and the caches are exactly
    its rows: the arena and each cache's row. Else None."""
    arena = arena_of(caches[0])
    if arena is None or arena.rows != len(caches):
        return None
    rows = []
    for cache in caches:
        layers = _growing(cache)
        row = layers[0][1].row
        if any(layer.arena is not arena or layer.row != row for _, layer in layers):
            return None
        rows.append(row)
    return (arena, rows) if len(set(rows)) == len(rows) else None


def build_arena(caches: Sequence[Any], capacity: int) -> Arena | None:
    """An arena of ``capacity`` tokens whose rows are ``caches`` (in order), their layers
    moved into it; None if some slot has no keys yet in any cache (nothing to size it by)."""
    slots = [slot for slot, _ in _growing(caches[0])]
    if not slots:
        return None
    arena = Arena(len(caches), capacity)
    for slot in slots:
        held = next((c.layers[slot] for c in caches if c.layers[slot]._k is not None), None)
        if held is None or held._v is None or held._k is None:
            return None
        k, v = held._k, held._v
        arena.keys[slot] = k.new_empty(len(caches), k.shape[1], capacity, k.shape[3])
        arena.values[slot] = v.new_empty(len(caches), v.shape[1], capacity, v.shape[3])
    for slot in slots:
        for row, cache in enumerate(caches):
            cache.layers[slot].join(arena, slot, row)
    firsts = [cache.layers[slots[0]] for cache in caches]
    arena._zero_past(firsts, min(capacity, max(2 * max(layer.length for layer in firsts), _FIRST_CAPACITY)))
    return arena
