"""Speculative decoding through the swarm (issue 16 section 2): the client drafts k
tokens locally and the chain verifies them in one pass.

Theory of operation. Each step of a generation sends the chain the tokens it has not
computed yet (the last sampled one) followed by k drafted tokens, k + 1 positions in
one FORWARD. The chain's output gives the target model's logits at every one of them,
and ``accept_drafts`` walks them in order: a draft the target agrees with is kept,
the first it does not is replaced by the target's own token, and if all k are kept
the last position gives one more (the bonus). So a step yields between 1 and k + 1
tokens for about the cost of one on a chain whose time is latency (a WAN chain, or a
GPU span that reads its weights once for any k). The rejected drafts stay in the
sessions' caches until the next step, which starts at the first rejected position:
a rollback (spec 11.1), signed and attributable like any step, and cutting the KV
caches there. Failover replays, audits and fraud proofs take only the kept rows.

The rule that keeps the output the target's:

- greedy (temperature 0): a draft is kept iff it is the target's arg-max there, so the
  tokens are exactly those of plain greedy decoding (up to float rounding between a
  k + 1 token step and k + 1 one-token steps, the same as prefill against decode);
- sampling: the standard speculative-sampling rule (Leviathan et al. 2023, Chen et
  al. 2023): with p the target's distribution (the sampler's processed scores:
  repetition penalty, temperature, top-k, top-p) and q the drafter's, keep draft d
  with probability min(1, p(d) / q(d)), else draw from max(0, p - q), normalised.
  A drafter without a distribution (prompt lookup) has q a point mass on d. Every
  draw uses the sampler's seeded generator, so a seed fixes the generation.

How many tokens to draft (``AdaptiveK``): twice as many when all were kept, half when
fewer than half were, none when none were (then plain decoding, probing with one
draft after ``probe_every`` steps, and twice as long after each probe that fails). With k = 0 a step is a plain decode step, and a
drafter that finds nothing to propose (prompt lookup without a match) costs nothing.

The drafters are in ``peer._drafters``: prompt lookup (n-gram matches in the prompt
and the output so far, no model) and a draft model the client runs itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .runtime import InvalidArgument

if TYPE_CHECKING:
    from .runtime import Sampler, TokenStream

__all__ = ["Draft", "Drafter", "Speculative", "AdaptiveK", "accept_drafts", "NO_DRAFT"]


@dataclass(frozen=True, slots=True)
class Draft:
    """Drafted tokens and, for a drafter that samples, the distribution each was drawn
    from (``probs[i]``: [vocab], summing to 1); None: each is a point mass."""

    tokens: tuple[int, ...] = ()
    probs: tuple[torch.Tensor, ...] | None = None


NO_DRAFT = Draft()


class Drafter(Protocol):
    """What drafts tokens for ``Speculative``."""

    name: str

    def start(self, max_length: int, seed: int) -> None:
        """A new generation of at most ``max_length`` tokens begins (drop any state);
        ``seed`` seeds whatever the drafter draws."""

    def draft(self, ids: Sequence[int], k: int, sampler: Sampler) -> Draft:
        """Up to ``k`` tokens likely to follow ``ids`` (prompt and output so far); with
        a sampling target, drawn from the distribution ``sampler.scores`` makes of the
        drafter's own logits (returned in ``Draft.probs``)."""
        ...


@dataclass(slots=True)
class AdaptiveK:
    """How many tokens to draft next (pure; see the module docstring).

    Args:
        k: drafts per step to start with.
        k_max: the most drafts per step.
        adaptive: False keeps ``k`` fixed (benchmarks).
        probe_every: at k = 0, steps between probes with one draft.
    """

    k: int = 4
    k_max: int = 8
    adaptive: bool = True
    probe_every: int = 16
    max_probe_every: int = 256
    _idle: int = 0
    _probe_gap: int = 0  # steps between probes now (doubles after each probe that fails)

    def __post_init__(self) -> None:
        if not 0 <= self.k <= self.k_max or self.k_max > 64:
            raise InvalidArgument(f"speculative k must satisfy 0 <= k <= k_max <= 64, got k={self.k}, "
                                  f"k_max={self.k_max}")

    def next(self) -> int:
        """Drafts to ask for in the coming step."""
        if self.k == 0 and self.adaptive:
            self._idle += 1
            if self._idle >= (self._probe_gap or self.probe_every):
                self._idle = 0
                return 1
        return self.k

    def update(self, offered: int, accepted: int) -> None:
        """The step drafted ``offered`` tokens and the target kept ``accepted``."""
        if not self.adaptive or offered == 0:
            return
        if self.k == 0:  # a probe: back off further while they fail, reset once one holds
            gap = self._probe_gap or self.probe_every
            self._probe_gap = 0 if accepted else min(self.max_probe_every, 2 * gap)
        if accepted == offered:
            self.k = min(self.k_max, max(self.k, offered) * 2)
        elif accepted == 0:  # none kept: plain decoding until a probe finds drafts that hold
            self.k = 0
        elif 2 * accepted < offered:
            self.k = min(self.k, max(offered // 2, accepted))
        self._idle = 0


@dataclass(slots=True)
class Speculative:
    """Speculative decoding of one client: a drafter and the draft length policy.

    ``generate(..., speculative=...)`` takes one of these, a drafter, or a string
    (``"prompt-lookup"`` or the path of a draft model: ``peer._drafters.drafter_from``).
    ``offered``/``accepted`` count drafts over the generations it ran.
    """

    drafter: Drafter
    k: int = 4
    k_max: int = 8
    adaptive: bool = True
    offered: int = 0
    accepted: int = 0

    def policy(self) -> AdaptiveK:
        return AdaptiveK(k=self.k, k_max=max(self.k, self.k_max), adaptive=self.adaptive)

    @property
    def acceptance(self) -> float | None:
        """Share of drafted tokens the target kept (None: nothing drafted yet)."""
        return self.accepted / self.offered if self.offered else None


def accept_drafts(tokens: TokenStream, logits: torch.Tensor, draft: Draft) -> int:
    """Push into ``tokens`` the kept prefix of ``draft`` and one token of the target's
    (the correction, or the bonus after a fully kept draft); returns how many drafts
    were kept. ``logits`` [len(draft.tokens) + 1, vocab]: the target's logits at the
    position of the last token before the draft and at each drafted one. Stops early
    when the generation ends (EOS, a stop string, ``max_new_tokens``)."""
    n = len(draft.tokens)
    if logits.shape[0] != n + 1:
        raise InvalidArgument(f"{n} drafts need {n + 1} rows of logits, got {logits.shape[0]}")
    sampler = tokens.sampler
    for i, d in enumerate(draft.tokens):
        if tokens.params.greedy:
            if tokens.push(logits[i]) != d:
                return i
        else:
            p = torch.softmax(sampler.scores(logits[i], tokens.prompt_ids + tokens.new_ids), dim=-1)
            q = None if draft.probs is None else draft.probs[i].to(torch.float32)
            qd = 1.0 if q is None else float(q[d])
            if qd > 0 and sampler.uniform() * qd < float(p[d]):  # u < p(d) / q(d)
                tokens.accept(d)
            else:
                residual = p.clone()
                if q is None:
                    residual[d] = 0.0
                else:
                    residual = torch.clamp(p - q, min=0.0)
                total = float(residual.sum())
                tokens.accept(sampler.draw(residual / total if total > 0 else p))
                return i
        if tokens.done:
            return i + 1
    tokens.push(logits[n])
    return n
