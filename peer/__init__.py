"""The peer: model runtime, server, client, the generation API and the ``swarm-peer`` CLI.

The public API (README "Python API")::

    from peer import Swarm, SyncSwarm, GenerationResult, TokenEvent

with the errors a generation can raise, all subclasses of ``SwarmError``. The names
are loaded on first use, so ``import peer.cli`` (``swarm-peer --help``) does not pay for
torch and transformers.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `X as X`: re-exported (``__all__`` is built from _EXPORTS at run time)
    from protocol.errors import SwarmError as SwarmError
    from swarm.dht import BootstrapFailed as BootstrapFailed
    from swarm.errors import NoRoute as NoRoute, PeerUnreachable as PeerUnreachable, RequestTimeout as RequestTimeout

    from ._chain import AllCandidatesFailed as AllCandidatesFailed
    from .api import Swarm as Swarm, SyncSwarm as SyncSwarm
    from .client import GenerationResult as GenerationResult, ModelNotServed as ModelNotServed
    from .client import PromptTooLong as PromptTooLong, TokenEvent as TokenEvent
    from .runtime import InvalidArgument as InvalidArgument, ModelError as ModelError

#: public name -> the module that defines it
_EXPORTS = {
    "Swarm": "peer.api",
    "SyncSwarm": "peer.api",
    "GenerationResult": "peer.client",
    "TokenEvent": "peer.client",
    "SwarmError": "protocol.errors",
    "InvalidArgument": "peer.runtime",
    "ModelError": "peer.runtime",
    "PromptTooLong": "peer.client",
    "ModelNotServed": "peer.client",
    "AllCandidatesFailed": "peer._chain",
    "NoRoute": "swarm.errors",
    "PeerUnreachable": "swarm.errors",
    "RequestTimeout": "swarm.errors",
    "BootstrapFailed": "swarm.dht",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peer' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
