"""Which models this peer can name: the ones it was configured with and the ones the
swarm's model index lists.

A peer knows the models it was configured with (``--model`` of ``status`` and
``generate``, the ``--model`` list of ``swarm-peer api``): those it can resolve locally
(``peer.runtime.resolve_model``) and so look up in the DHT by their block keys. Every
server also keeps its model's entry in the swarm's model index (``swarm.models``, spec
section 10), so ``served_models`` adds what the index lists: ``swarm-peer status`` and
``GET /v1/models`` show every model the swarm serves, with its block count and hidden
size, whether or not this peer could run it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["ServedModel", "served_models", "resolve_quickly"]

#: How long a memo of a model that is not a local path (built-in name, hub id) is trusted.
NAME_MEMO_TTL = 24 * 3600.0
_MEMO_NAME = "model-info-1.1.json"  # ids of protocol 1.1 (spec section 1): older memos hold 1.0 ids


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model by the name people use and the id servers announce (``name@digest``).

    ``origin`` is "configured" (this peer was told of it) or "swarm" (only the DHT's
    model index lists it); ``servers`` is how many servers the index lists it under
    (0: not listed, or no DHT was asked)."""

    name: str
    model_id: str
    num_blocks: int
    origin: str = "configured"
    hidden_size: int | None = None
    source: str = ""
    servers: int = 0


async def served_models(configured: Sequence[ServedModel], dht: Any = None) -> list[ServedModel]:
    """The models to list: ``configured`` ones, each once, then those the swarm's model
    index (read through ``dht``, a ``swarm.dht.DhtNode``, when given) adds, by model id.
    A configured model the index lists gets the index's facts (hidden size, source,
    server count)."""
    seen: dict[str, ServedModel] = {}
    for model in configured:
        seen.setdefault(model.model_id, model)
    if dht is None:
        return list(seen.values())
    from swarm.models import fetch_models

    listed = {m.entry.model: m for m in await fetch_models(dht)}
    out = []
    for model in seen.values():
        found = listed.pop(model.model_id, None)
        if found is not None:
            model = replace(model, hidden_size=found.entry.hidden_size, source=found.entry.source,
                            servers=found.publishers)
        out.append(model)
    for model_id, found in listed.items():
        e = found.entry
        out.append(ServedModel(name=model_id.split("@", 1)[0], model_id=model_id, num_blocks=e.num_blocks,
                               origin="swarm", hidden_size=e.hidden_size, source=e.source, servers=found.publishers))
    return out


# -- a memo of resolved models, so that `status` need not import torch -----------------
#
# Resolving a model (its ``name@digest`` id and block count) imports torch and
# transformers, seconds before any network work. ``status`` needs only those two facts,
# so they are remembered in the runtime's cache directory (the same place as
# ``peer.runtime.cache_root``, computed here without importing the runtime), keyed by
# the source and, for a local path, its size and modification time.


def _cache_dir() -> Path:
    env = os.environ.get("SWARM_PEER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "swarm-peer"


def _stamp(source: str) -> list[Any]:
    path = Path(source).expanduser()
    if path.exists():
        files = [path / "config.json", *sorted(path.glob("*.safetensors*"))] if path.is_dir() else [path]
        return [str(path.resolve())] + [[f.name, f.stat().st_mtime_ns, f.stat().st_size] for f in files
                                        if f.is_file()]
    return [source]


def _read_memo() -> dict[str, Any]:
    try:
        memo = json.loads((_cache_dir() / _MEMO_NAME).read_bytes())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def resolve_quickly(source: str) -> tuple[str, int]:
    """``(model_id, num_blocks)`` of ``source``, from the memo when it is current, else
    through ``peer.runtime.resolve_model`` (and remembered).

    Raises:
        ModelError: as ``resolve_model``.
    """
    stamp = _stamp(source)
    hit = _read_memo().get(source)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and (
            len(stamp) > 1 or time.time() - float(hit.get("at", 0)) < NAME_MEMO_TTL):
        return str(hit["model_id"]), int(hit["num_blocks"])
    from .runtime import resolve_model

    info = resolve_model(source)
    memo = _read_memo()
    memo[source] = {"stamp": stamp, "model_id": info.model_id, "num_blocks": info.num_blocks, "at": time.time()}
    try:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as tmp:
            json.dump(memo, tmp)
        os.replace(tmp.name, directory / _MEMO_NAME)
    except OSError:
        pass  # a read-only cache only costs the next status its imports
    return info.model_id, info.num_blocks
