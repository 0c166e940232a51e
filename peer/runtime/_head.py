"""The client head: tokenizer (with chat template), embeddings, final norm, LM head.

A client holds this locally: it turns a prompt into token ids and embeddings, sends the
embeddings through the relay of spans, and turns the last hidden state that comes back
into logits. The tokenizer is loaded on first use (models without one still embed and
score token ids).

The LM head is the client's largest product (SmolLM2: 49,152 x 576); its weight is packed
for oneDNN like a span's linears (``peer.runtime._packed``), measured here at one
thread: one position 9.3 ms against MKL's 12-14 ms, five positions (a speculative step
verifying four drafts) 9.0 against 26-28 ms. An untied head is packed in place; a tied
one is the embedding matrix, which lookups need dense, so packing it costs a second copy
and is done only up to ``PACKED_TIED_BYTES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._errors import InvalidArgument
from ._loader import HeadModules
from ._packed import pack_weight, packed_linear
from ._model_id import ModelInfo
from ._sources import Source

__all__ = ["ClientHead"]

Messages = list[dict[str, str]]

#: A tied LM head gets a packed second copy only up to this size (bytes; SmolLM2's: 108 MiB).
PACKED_TIED_BYTES = 256 * 2**20


def _check_utf8(prompt: object) -> None:
    """Text from a byte source decoded with ``surrogateescape`` (argv, some files) keeps
    invalid bytes as lone surrogates, which tokenizers reject with a TypeError."""
    texts: list[object] = []
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list):
        texts = [m.get("content") for m in prompt if isinstance(m, dict)]
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument("the prompt is not valid UTF-8 text; re-encode it as UTF-8") from None


class ClientHead:
    """Embeddings, final norm, LM head and tokenizer of one model.

    Build one with :func:`peer.runtime.load_head`. Not thread-safe (like the executor).
    """

    def __init__(
        self, *, modules: HeadModules, info: ModelInfo, source: Source, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.info = info
        self.model_id = info.model_id
        self.hidden_size = info.hidden_size
        self.num_blocks = info.num_blocks
        self.device = device
        self.dtype = dtype
        self._modules = modules
        self._source = source
        self._tokenizer: Any = None
        self.vocab_size = int(modules.lm_head.shape[0])
        head = modules.lm_head
        if head is not modules.embed.weight or head.numel() * head.element_size() <= PACKED_TIED_BYTES:
            packed = pack_weight(head)
            if packed is not None:
                modules.lm_head = packed  # untied: the dense weight goes with it

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded and cached on first access).

        Raises:
            ModelFileMissing: the source carries no tokenizer.
        """
        if self._tokenizer is None:
            self._tokenizer = self._source.load_tokenizer()
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation (from the model config, else the tokenizer)."""
        eos = getattr(self.info.config, "eos_token_id", None)
        if eos is None and self._tokenizer is not None:
            eos = self._tokenizer.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])

    def encode_prompt(self, prompt: str | Messages, *, chat: bool = True) -> list[int]:
        """Token ids for ``prompt``.

        A list of ``{"role", "content"}`` messages always goes through the chat template;
        a string does when ``chat`` is true (as one user message), else it is tokenized as is.

        Raises:
            InvalidArgument: an empty prompt, text that is not UTF-8, malformed messages, or
                chat without a template.
        """
        _check_utf8(prompt)
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument("prompt is empty; give some text or chat messages")
            if not chat:
                ids = list(tok(prompt)["input_ids"])
                if not ids:
                    raise InvalidArgument("prompt tokenizes to nothing; give some text")
                return ids
            messages: Messages = [{"role": "user", "content": prompt}]
        else:
            messages = prompt
            ok = isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
            if not ok:
                raise InvalidArgument('chat messages must be a non-empty list of {"role": str, "content": str}')
        if not getattr(tok, "chat_template", None):
            raise InvalidArgument("this model's tokenizer has no chat template; pass chat=False and plain text")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped by default)."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def embed(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Embeddings [1, n, hidden] of ``token_ids`` (n >= 1).

        Raises:
            InvalidArgument: no ids, or an id outside the vocabulary.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise InvalidArgument("no token ids to embed")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        with torch.inference_mode():
            return self._modules.embed(ids.to(self.device)).unsqueeze(0)

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] (float32) of one hidden state: final norm, then LM head.

        Accepts [hidden], or [1, n, hidden] / [n, hidden] (the last position is used).
        """
        if hidden_last.shape[-1] != self.hidden_size:
            raise InvalidArgument(f"hidden state must end in {self.hidden_size}, got {tuple(hidden_last.shape)}")
        with torch.inference_mode():
            h = hidden_last.reshape(-1, self.hidden_size)[-1:].to(device=self.device, dtype=self.dtype)
            h = self._modules.norm(h)
            return packed_linear(h, self._modules.lm_head).reshape(-1).float()

    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] (float32) of every position of ``hidden`` ([1, n, hidden] or
        [n, hidden]): what ``logits`` gives for each, in one product (speculative
        decoding verifies several positions of one step)."""
        if hidden.shape[-1] != self.hidden_size:
            raise InvalidArgument(f"hidden state must end in {self.hidden_size}, got {tuple(hidden.shape)}")
        with torch.inference_mode():
            h = self._modules.norm(hidden.reshape(-1, self.hidden_size).to(device=self.device, dtype=self.dtype))
            return packed_linear(h, self._modules.lm_head).float()
