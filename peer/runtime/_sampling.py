"""Sampling: parameters, a reproducible sampler, and stop conditions.

The semantics follow ``transformers`` ``generate`` so users meet no surprises:
repetition penalty first (CTRL rule: divide positive logits, multiply negative ones,
over every token already in the sequence, prompt included), then temperature, top-k,
top-p (keep the smallest set of tokens whose probability reaches ``top_p``), then one
draw from a ``torch.Generator`` seeded with ``seed``. ``temperature == 0`` is greedy
(arg-max after the repetition penalty). Sampling always runs on the CPU in float32, so
the same seed gives the same tokens on any device the logits came from.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._errors import InvalidArgument

__all__ = ["SamplingParams", "Sampler", "find_stop"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick tokens; validated on construction (raises :class:`InvalidArgument`).

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy, else > 0 (logits are divided by it).
        top_k: keep the k most likely tokens (0: no limit).
        top_p: nucleus sampling threshold in (0, 1] (1: no limit).
        repetition_penalty: > 0; 1 disables it, > 1 discourages repeats.
        seed: seed of the sampler's generator (None: a random seed).
        stop: strings that end generation when they appear in the generated text.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InvalidArgument(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, Iterable):
            raise InvalidArgument(f"stop must be a sequence of strings, got {stop!r}")
        stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument(f"stop strings must be non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by arg-max (temperature 0)."""
        return self.temperature == 0


class Sampler:
    """Picks next tokens per :class:`SamplingParams`; reproducible for a given seed."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.seed = seed
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def get_state(self) -> torch.Tensor:
        """The generator's state (to roll a generation back and redo steps identically)."""
        return self._gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a state returned by :meth:`get_state`."""
        self._gen.set_state(state)

    def scores(self, logits: torch.Tensor, previous_ids: Sequence[int]) -> torch.Tensor:
        """The processed scores [vocab] that tokens are drawn from (float32, CPU).

        Repetition penalty, then (unless greedy) temperature, top-k and top-p; removed
        tokens are ``-inf``.
        """
        scores = logits.detach().reshape(-1).to(device="cpu", dtype=torch.float32).clone()
        p = self.params
        if p.repetition_penalty != 1.0 and len(previous_ids):
            ids = torch.tensor(sorted(set(previous_ids)), dtype=torch.long)
            ids = ids[(ids >= 0) & (ids < scores.numel())]
            picked = scores[ids]
            scores[ids] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.greedy:
            return scores
        scores = scores / p.temperature
        if p.top_k and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= (1 - p.top_p)
            drop_sorted[-1] = False  # always keep the most likely token
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores

    def uniform(self) -> float:
        """One draw from U[0, 1) of this sampler's generator (speculative sampling's
        accept test), so that a seed fixes every choice of a generation."""
        return float(torch.rand((), generator=self._gen).item())

    def draw(self, probs: torch.Tensor) -> int:
        """One token drawn from ``probs`` [vocab] (non-negative, not all zero) with this
        sampler's generator."""
        return int(torch.multinomial(probs, 1, generator=self._gen).item())

    def next_token(self, logits: torch.Tensor, previous_ids: Sequence[int]) -> int:
        """Choose the next token from ``logits`` [vocab] given every id so far (prompt included)."""
        scores = self.scores(logits, previous_ids)
        if self.params.greedy:
            return int(torch.argmax(scores).item())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._gen).item())


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in ``text`` where the earliest stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
