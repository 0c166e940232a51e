"""Drafters for speculative decoding (``peer.speculative``).

- ``PromptLookup``: no model. The longest suffix of the text so far (up to
  ``max_ngram`` tokens, at least ``min_ngram``) that also occurs earlier in it, and
  the tokens that followed its latest earlier occurrence, are the draft (long
  n-grams first: in code, short ones recur everywhere and lead the draft astray). Strong where
  the output copies its input: editing code, summarising, quoting.
- ``DraftModel``: a small model with the target's tokenizer that the client runs
  itself (a local HF directory or GGUF file, loaded with ``peer.runtime``; for tests a
  truncated copy of the target). It keeps one KV-cache session per generation and
  rolls it back to the longest prefix it shares with the text at each draft (the
  executor's rollback, spec 11.1), so a draft costs k one-token steps.

``drafter_from`` turns what a user passes (``"prompt-lookup"``, a path) into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .runtime import InvalidArgument
from .speculative import NO_DRAFT, Draft, Drafter, Speculative

if TYPE_CHECKING:
    from .runtime import ClientHead, Sampler, SpanExecutor

__all__ = ["PromptLookup", "DraftModel", "drafter_from", "speculative_from", "PROMPT_LOOKUP"]

PROMPT_LOOKUP = "prompt-lookup"


class PromptLookup:
    """Drafts by n-gram match in the prompt and output so far; see the module docstring."""

    name = PROMPT_LOOKUP

    def __init__(self, *, max_ngram: int = 6, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgument(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(self, max_length: int, seed: int) -> None:
        pass

    def draft(self, ids: Sequence[int], k: int, sampler: Sampler) -> Draft:
        if k <= 0:
            return NO_DRAFT
        ids = list(ids)
        n_ids = len(ids)
        for n in range(min(self.max_ngram, n_ids - 1), self.min_ngram - 1, -1):
            tail = ids[n_ids - n:]
            # the latest earlier occurrence with something after it
            for start in range(n_ids - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    if follow:
                        return Draft(tuple(follow))
        return NO_DRAFT


class DraftModel:
    """Drafts with a small local model; see the module docstring. One generation at a
    time (its session is the generation's); ``from_parts`` makes another on the same
    loaded weights for a concurrent one.

    Args:
        source: a local HF directory or GGUF file (anything ``peer.runtime`` loads).
        vocab_size: the target's vocabulary size; a draft model with another
            vocabulary is refused (its token ids would mean other tokens).
    """

    def __init__(self, source: str, *, vocab_size: int | None = None, device: str | None = None) -> None:
        from .runtime import load_head, load_span

        self.name = source
        self.head: ClientHead = load_head(source, device=device)
        if vocab_size is not None and self.head.vocab_size != vocab_size:
            raise InvalidArgument(f"the draft model {source} has a vocabulary of {self.head.vocab_size} tokens, the "
                                  f"target {vocab_size}: a draft model must share the target's tokenizer")
        self.span: SpanExecutor = load_span(source, 0, self.head.num_blocks, device=device)
        self._session: bytes | None = None
        self._max_length = 0
        self._held: list[int] = []  # the tokens the session's cache holds
        self._gen = torch.Generator().manual_seed(0)

    @classmethod
    def from_parts(cls, head: ClientHead, span: SpanExecutor, *, name: str = "draft") -> DraftModel:
        """A draft model of an already loaded head and span (tests, benchmarks)."""
        self = cls.__new__(cls)
        self.name, self.head, self.span = name, head, span
        self._session, self._held, self._max_length = None, [], 0
        self._gen = torch.Generator().manual_seed(0)
        return self

    def start(self, max_length: int, seed: int) -> None:
        if self._session is not None:
            self.span.close_session(self._session)
        self._session = self.span.open_session(max_length)
        self._max_length = max_length
        self._held = []
        self._gen.manual_seed(seed)

    def draft(self, ids: Sequence[int], k: int, sampler: Sampler) -> Draft:
        if k <= 0 or self._session is None:
            return NO_DRAFT
        ids = list(ids)
        k = min(k, self._max_length - len(ids))  # the session ends where the generation does
        if k <= 0:
            return NO_DRAFT
        common = 0
        for a, b in zip(self._held, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # feed at least the last token: its logits start the draft
        out = self.span.forward(self._session, self.head.embed(ids[common:]), common)
        self._held = ids
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        greedy = sampler.params.greedy
        while True:
            scores = sampler.scores(self.head.logits(out[:, -1]), ids + drafted)
            if greedy:
                token = int(torch.argmax(scores))
            else:
                q = torch.softmax(scores, dim=-1)
                token = int(torch.multinomial(q, 1, generator=self._gen))
                probs.append(q)
            drafted.append(token)
            if len(drafted) == k:
                break
            out = self.span.forward(self._session, self.head.embed([token]), len(self._held))
            self._held = self._held + [token]
        return Draft(tuple(drafted), None if greedy else tuple(probs))


def drafter_from(value: str | Drafter, *, vocab_size: int | None = None) -> Drafter:
    """A drafter from what a user passes: ``"prompt-lookup"``, the path of a draft
    model, or a drafter (returned as it is).

    Raises:
        InvalidArgument: a draft model with another vocabulary than the target's.
        UnknownModel, ModelFileMissing, ...: the draft model cannot be loaded.
    """
    if not isinstance(value, str):
        return value
    if value == PROMPT_LOOKUP:
        return PromptLookup()
    return DraftModel(value, vocab_size=vocab_size)


def speculative_from(value: str | Drafter | Speculative | None, *, vocab_size: int | None = None,
                     k: int = 4, k_max: int = 8) -> Speculative | None:
    """``generate(..., speculative=...)``'s argument as a ``Speculative`` (None: off)."""
    if value is None or isinstance(value, Speculative):
        return value
    return Speculative(drafter_from(value, vocab_size=vocab_size), k=k, k_max=k_max)
