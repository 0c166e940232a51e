"""A client's own copies of spans, for settling disputed audits and checking fraud
proofs itself (spec 13.2 rule 3; DESIGN.md "Verification").

Theory of operation. A client runs the head of its model, so it can always load any
span of that model too, memory allowing. When an audit escalates (the auditor and
the hop disagree, or no auditor answered), the client recomputes the span here
instead of trusting a vote among holders that may collude; a fraud proof that
reaches it (gossip, the DHT) is verified here too, so its bans rest on its own
evidence. ``LocalSpans`` loads a span the first time it is needed (only that span's
tensors are read, ``peer.runtime.load_span``), keeps recently used spans within
``budget_bytes`` of weights, and runs one recomputation at a time in a worker thread.
A span whose weights exceed the budget is never loaded: ``run`` returns None and the
auditor falls back on votes. ``budget_bytes`` = 0 turns local checks off.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import trio

from verify import SpanRecompute

from .runtime import load_span

__all__ = ["LocalSpans", "span_weight_bytes"]

log = logging.getLogger("swarm.verify")

T = TypeVar("T")


def span_weight_bytes(config: Any, blocks: int, dtype: torch.dtype = torch.float32) -> int:
    """Estimated weight bytes of ``blocks`` decoder blocks of a Llama-family ``config``."""
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_block = attention + 3 * hidden * intermediate + 2 * hidden
    return per_block * blocks * torch.empty((), dtype=dtype).element_size()


class LocalSpans:
    """See the module docstring.

    Args:
        source: the model source the client's head came from (``load_span``'s).
        model_id: the id servers announce for it (proofs and audits name it).
        config: the model's config (to size a span before loading it).
        budget_bytes: the most weight bytes held at once, and the largest span loaded.
        device, dtype: where and how to compute (default: as ``load_span`` chooses).
    """

    def __init__(self, source: str, model_id: str, config: Any, *, budget_bytes: int,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be non-negative")
        self.source = source
        self.model_id = model_id
        self.config = config
        self.budget_bytes = budget_bytes
        self.device = device
        self.dtype = dtype
        self._spans: OrderedDict[tuple[int, int], SpanRecompute] = OrderedDict()
        self._lock = trio.Lock()
        self.loads = 0  # spans loaded (tests, reports)

    def fits(self, span: tuple[int, int]) -> bool:
        """Whether blocks ``span`` may be loaded under the budget."""
        num = int(getattr(self.config, "num_hidden_layers", span[1]))
        if not 0 <= span[0] < span[1] <= num:
            return False
        return 0 < span_weight_bytes(self.config, span[1] - span[0]) <= self.budget_bytes

    async def run(self, model: str, span: tuple[int, int], fn: Callable[[SpanRecompute], T]) -> T | None:
        """``fn(executor)`` in a worker thread on blocks ``span``; None if they are not
        this model's or exceed the budget.

        Raises:
            SwarmError (ModelError): the span cannot be loaded from ``source``.
        """
        if model != self.model_id or not self.fits(span):
            return None
        async with self._lock:
            executor = await self._executor(span)
            return await trio.to_thread.run_sync(fn, executor)

    async def _executor(self, span: tuple[int, int]) -> SpanRecompute:
        held = self._spans.get(span)
        if held is not None:
            self._spans.move_to_end(span)
            return held
        need = span_weight_bytes(self.config, span[1] - span[0])
        while self._spans and self._held_bytes() + need > self.budget_bytes:
            self._spans.popitem(last=False)  # least recently used
        log.info("loading blocks %d:%d of %s to check an audit locally", span[0], span[1], self.model_id)
        executor = await trio.to_thread.run_sync(
            lambda: load_span(self.source, span[0], span[1], device=self.device, dtype=self.dtype))
        self.loads += 1
        self._spans[span] = executor
        return executor

    def _held_bytes(self) -> int:
        return sum(span_weight_bytes(self.config, e - s) for s, e in self._spans)
