"""The decode loop, in two pieces the network client reuses.

``TokenStream`` is the per-generation state with no I/O: feed it the logits of the last
position, it samples the next token, tracks stop conditions (EOS, stop strings over the
decoded text, ``max_new_tokens``) and says when it is done. ``generate_local`` drives a
stream through a chain of in-process span executors, which is what the network relay
does with peers instead; tests and the bench use it to check the chain against
``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._errors import InvalidArgument, ModelError
from ._executor import SpanExecutor
from ._head import ClientHead
from ._sampling import Sampler, SamplingParams, find_stop

__all__ = ["TokenStream", "generate_local", "relay_local", "check_chain"]


class TokenStream:
    """Sampling state of one generation (pure: no model calls, no I/O).

    Attributes:
        new_ids: generated ids so far; includes the EOS id when generation ended on one
            (as ``transformers`` ``generate`` does).
        finish_reason: None while running, then ``"eos"``, ``"stop"`` or ``"length"``.
    """

    def __init__(self, head: ClientHead, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise InvalidArgument("prompt_ids is empty; encode a prompt first")
        self.head = head
        self.params = params
        self.sampler = Sampler(params)
        self.prompt_ids = list(prompt_ids)
        self.new_ids: list[int] = []
        self.finish_reason: str | None = None
        self._eos = head.eos_token_ids
        if params.stop:
            head.tokenizer  # noqa: B018 -- fail now, not at the first token, if there is no tokenizer

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, logits: torch.Tensor) -> int:
        """Sample the next token from the last position's ``logits`` and update the state."""
        if self.done:
            raise InvalidArgument("generation already finished; start a new TokenStream")
        return self.accept(self.sampler.next_token(logits, self.prompt_ids + self.new_ids))

    def accept(self, token: int) -> int:
        """Append a token chosen elsewhere (speculative decoding's accepted drafts and
        resampled tokens) and update the state as ``push`` does."""
        if self.done:
            raise InvalidArgument("generation already finished; start a new TokenStream")
        self.new_ids.append(token)
        if token in self._eos:
            self.finish_reason = "eos"
        elif self.params.stop and find_stop(self.head.decode(self.new_ids), self.params.stop) is not None:
            self.finish_reason = "stop"
        elif len(self.new_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return token

    @property
    def text(self) -> str:
        """Decoded generated text, cut before the first stop string if one appeared."""
        raw = self.head.decode(self.new_ids)
        cut = find_stop(raw, self.params.stop) if self.params.stop else None
        return raw if cut is None else raw[:cut]


def check_chain(head: ClientHead, executors: Sequence[SpanExecutor]) -> None:
    """Raise :class:`ModelError` unless ``executors`` cover blocks [0, n) in order, for the head's model."""
    expected = 0
    for ex in executors:
        if ex.model_id != head.model_id:
            raise ModelError(f"span [{ex.start}, {ex.end}) serves {ex.model_id}, the head is {head.model_id}")
        if ex.start != expected:
            raise ModelError(f"spans must be contiguous from block 0: expected a span starting at {expected}, "
                             f"got [{ex.start}, {ex.end})")
        expected = ex.end
    if expected != head.num_blocks:
        raise ModelError(f"spans cover blocks [0, {expected}) of {head.num_blocks}; add the missing spans")


def generate_local(
    head: ClientHead,
    executors: Sequence[SpanExecutor],
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    logits_out: list[torch.Tensor] | None = None,
) -> list[int]:
    """Generate with an in-process chain of spans; returns the new token ids.

    Each executor gets one session of ``len(prompt_ids) + max_new_tokens`` tokens, closed
    at the end. If ``logits_out`` is given, the logits of every step are appended to it.
    """
    stream = TokenStream(head, params, prompt_ids)
    relay_local(head, executors, stream, logits_out=logits_out)
    return stream.new_ids


def relay_local(
    head: ClientHead,
    executors: Sequence[SpanExecutor],
    stream: TokenStream,
    *,
    logits_out: list[torch.Tensor] | None = None,
) -> TokenStream:
    """Drive ``stream`` to completion through in-process ``executors`` (see ``generate_local``)."""
    check_chain(head, executors)
    max_length = len(stream.prompt_ids) + stream.params.max_new_tokens
    sessions: list[bytes] = []
    try:
        for ex in executors:
            sessions.append(ex.open_session(max_length))
        hidden = head.embed(stream.prompt_ids)
        position = 0
        while True:
            n = hidden.shape[1]
            for ex, sid in zip(executors, sessions, strict=True):
                hidden = ex.forward(sid, hidden, position)
            position += n
            logits = head.logits(hidden[:, -1])
            if logits_out is not None:
                logits_out.append(logits)
            token = stream.push(logits)
            if stream.done:
                return stream
            hidden = head.embed([token])
    finally:
        for ex, sid in zip(executors, sessions):
            ex.close_session(sid)
