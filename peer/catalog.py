"""Which models this peer can name: the one seam where the swarm-wide listing plugs in.

Today a peer knows the models it was configured with (``--model`` of ``status`` and
``generate``, the ``--model`` list of ``swarm-peer api``): those it can resolve locally
(``peer.runtime.resolve_model``) and so look up in the DHT by their block keys. Listing
every model a swarm serves needs a model index in the DHT and a model-info RPC (protocol
1.1); when they exist, ``served_models`` merges the index's entries into what it returns,
and ``swarm-peer status`` and ``GET /v1/models`` list them with no other change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ServedModel", "served_models"]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model by the name people use and the id servers announce (``name@digest``)."""

    name: str
    model_id: str
    num_blocks: int
    origin: str = "configured"  # "configured" today; the DHT index will add "swarm"


async def served_models(configured: Sequence[ServedModel], dht: Any = None) -> list[ServedModel]:
    """The models to list: ``configured`` ones, each once.

    ``dht`` is where the swarm-wide model index will be read (pending protocol 1.1's
    model index); until then it is unused.
    """
    seen: dict[str, ServedModel] = {}
    for model in configured:
        seen.setdefault(model.model_id, model)
    return list(seen.values())
