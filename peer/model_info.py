"""MODEL_QUERY: what a server says about the model it serves (spec section 11.3).

Theory of operation. A client needs a model's id before it can compute a block key or
open a session, and its block count L, hidden size H, wire dtypes, context length and
head/tokenizer source before it can run a chain. ``ModelInfoService`` answers
MODEL_QUERY on the server's host with a ``ModelReport``: the protocol versions this peer
speaks and one ``ModelDescriptor`` built from the live ``SpanServer`` (so a rebalanced
span is reported as it is now). ``entry`` is the shorter ``ModelEntry`` the server keeps
in the swarm's model index in the DHT (``swarm.models``), which lists models without a
connection to anyone.

The source a client is told is public only: a built-in model name or a hub id. A local
path would tell others nothing they can open and would leak the operator's file
layout, so it becomes the empty string ("no public source").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from protocol import DTYPES, VERSION_TEXT, ModelDescriptor, ModelEntry, ModelQuery, ModelReport
from swarm.transport import Host, PeerConnection

from .runtime import BUILTIN_MODELS
from .server import SpanServer

__all__ = ["ModelInfoService", "public_source", "MAX_REPORTED_LENGTH"]

#: The largest max_length the wire can carry (OPEN_SESSION's bound).
MAX_REPORTED_LENGTH = 1 << 20
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_COMPUTE_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def public_source(source: str) -> str:
    """What to tell clients about where the model's head and tokenizer come from: a
    built-in name or a hub id as given, "" for anything else (a local path)."""
    key = source.strip()
    if key.lower() in BUILTIN_MODELS:
        return key.lower()
    if _HUB_ID.fullmatch(key) and not Path(key).expanduser().exists() and len(key.encode()) <= 256:
        return key
    return ""


class ModelInfoService:
    """Answers MODEL_QUERY on ``host`` for ``server``'s model.

    Args:
        host: the server's transport (the handler is added at once).
        server: the span server whose model and span are reported.
        source: the model source the server loaded (``--model``); see ``public_source``.
    """

    def __init__(self, host: Host, server: SpanServer, *, source: str) -> None:
        self.server = server
        self.source = public_source(source)
        host.add_handler(ModelQuery, self._on_query)

    def descriptor(self) -> ModelDescriptor:
        executor = self.server.executor
        info = executor.info
        context = getattr(info.config, "max_position_embeddings", None)
        return ModelDescriptor(
            model=self.server.model,
            num_blocks=info.num_blocks,
            hidden_size=info.hidden_size,
            span=self.server.span,
            wire_dtypes=tuple(DTYPES),
            max_length=min(int(context), MAX_REPORTED_LENGTH) if context else MAX_REPORTED_LENGTH,
            source=self.source,
            compute_dtype=_COMPUTE_DTYPES.get(executor.dtype, "f32"),
        )

    def entry(self) -> ModelEntry:
        """The model's entry for the swarm's model index."""
        d = self.descriptor()
        return ModelEntry(model=d.model, num_blocks=d.num_blocks, hidden_size=d.hidden_size, source=d.source)

    def report(self) -> ModelReport:
        return ModelReport(versions=(VERSION_TEXT,), models=(self.descriptor(),))

    async def _on_query(self, conn: PeerConnection, msg: ModelQuery) -> ModelReport:
        return self.report()
