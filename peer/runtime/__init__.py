"""Model shard runtime: the compute half of a peer (DESIGN.md, "Model runtime").

Load only the blocks a peer serves (``load_span``) from a local HF directory, a GGUF
file, a hub id or the built-in ``smollm2-135m-instruct``; run them with KV-cache
sessions (``SpanExecutor``); hold the client side (``ClientHead``: tokenizer,
embeddings, final norm, LM head) and sample (``SamplingParams``, ``Sampler``,
``TokenStream``). ``generate_local`` runs the whole relay in-process.

A ``SpanExecutor`` computes different sessions in several threads at once (see its
module for what that requires); everything else here belongs to one thread.
"""

from ._api import load_head, load_span
from ._arch import SUPPORTED_ARCHITECTURES
from ._cache import cache_root
from ._device import resolve_device, resolve_dtype
from ._errors import (
    HubUnavailable,
    InvalidArgument,
    MaxLengthExceeded,
    ModelError,
    ModelFileMissing,
    PositionMismatch,
    QuantizationUnavailable,
    SessionMemoryExhausted,
    SpanOutOfRange,
    UnknownModel,
    UnknownSession,
    UnsupportedArchitecture,
)
from ._executor import ForwardJob, SessionsInfo, SessionStep, SpanExecutor, measure_throughput
from ._generate import TokenStream, check_chain, generate_local, relay_local
from ._head import ClientHead
from ._model_id import ModelInfo, resolve_model
from ._quant import QUANT_MODES
from ._sampling import Sampler, SamplingParams, find_stop
from ._sources import BUILTIN_MODELS

DEFAULT_MODEL = "smollm2-135m-instruct"

__all__ = [
    "DEFAULT_MODEL",
    "BUILTIN_MODELS",
    "SUPPORTED_ARCHITECTURES",
    "QUANT_MODES",
    "load_span",
    "load_head",
    "resolve_model",
    "ModelInfo",
    "SpanExecutor",
    "ForwardJob",
    "SessionStep",
    "SessionsInfo",
    "measure_throughput",
    "ClientHead",
    "SamplingParams",
    "Sampler",
    "TokenStream",
    "find_stop",
    "generate_local",
    "relay_local",
    "check_chain",
    "resolve_device",
    "resolve_dtype",
    "cache_root",
    "ModelError",
    "UnknownModel",
    "ModelFileMissing",
    "UnsupportedArchitecture",
    "HubUnavailable",
    "SpanOutOfRange",
    "InvalidArgument",
    "QuantizationUnavailable",
    "MaxLengthExceeded",
    "SessionMemoryExhausted",
    "UnknownSession",
    "PositionMismatch",
]
