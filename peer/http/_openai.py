"""The OpenAI wire format: requests parsed and checked, responses and errors built.

Pure functions of JSON-shaped data (no Starlette, no trio), so each rule is testable
alone. Requests follow OpenAI's Chat Completions and (legacy) Completions APIs; a field
this swarm cannot honour is refused with OpenAI's error shape and a 400 rather than
silently ignored, so a client never believes it got what it did not. The swarm's own
additions travel in one namespaced field, ``"swarm"`` (``swarm_extension``).

Extensions accepted in requests, as vLLM and llama.cpp do: ``top_k`` and
``repetition_penalty``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiError", "GenerationRequest", "parse_chat_request", "parse_completion_request", "swarm_extension",
           "usage", "chat_completion", "chat_chunk", "completion", "completion_chunk", "OPENAI_FINISH",
           "new_id", "DEFAULT_CHAT_MAX_TOKENS", "DEFAULT_COMPLETION_MAX_TOKENS", "EXTENSION_FIELD"]

#: The field carrying this project's additions in every response (and in errors).
EXTENSION_FIELD = "swarm"
#: OpenAI's Chat API generates until the context ends by default; a swarm's tokens cost
#: others' compute, so the default stops here (clamped to the context) unless asked.
DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
MAX_STOP = 4  # OpenAI's limit on stop sequences

# GenerationResult.finish_reason -> OpenAI's.
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

# Fields accepted and ignored because they change nothing about the answer.
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
# Fields accepted when they carry their default ("no effect") value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,),
    "logit_bias": ({},), "parallel_tool_calls": (False, True), "echo": (False,), "best_of": (1,), "suffix": ("",),
}
_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                "stream", "stream_options", "top_k", "repetition_penalty", "response_format", "speculative"}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                      "stream_options", "top_k", "repetition_penalty", "speculative"}
_CHAT_NEUTRAL = {"n", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "parallel_tool_calls"}
_COMPLETION_NEUTRAL = {"n", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "echo", "best_of",
                       "suffix"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.extra = dict(extra or {})

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": {"message": self.message, "type": self.type, "param": self.param,
                                          "code": self.code}}
        if self.extra:
            body["error"][EXTENSION_FIELD] = self.extra
        return body


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """What a chat or completion request asks for, checked; sampling in the swarm's terms."""

    model: str
    prompt: str | list[dict[str, str]] | list[int]  # text (raw), chat messages, or token ids
    chat: bool
    max_tokens: int | None  # None: the endpoint's default, clamped to the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    speculative: str | None = None  # "prompt-lookup" (a draft model is the operator's to load, not a caller's)
    extra: dict[str, Any] = field(default_factory=dict)


def _check_fields(body: Mapping[str, Any], allowed: set[str], neutral: set[str]) -> None:
    for name, value in body.items():
        if value is None or name in allowed or name in _IGNORED:
            continue
        if name in neutral:
            if not any(value == v and type(value) is type(v) for v in _NEUTRAL[name]):
                what = "n > 1 (several choices)" if name == "n" else f"{name}={json_repr(value)}"
                raise _bad(f"{what} is not supported by this swarm; leave {name} out", param=name,
                           code="unsupported_parameter")
            continue
        if name in ("tools", "tool_choice", "functions", "function_call"):
            raise _bad(f"{name}: tool and function calling are not supported by this swarm", param=name,
                       code="unsupported_parameter")
        raise _bad(f"{name} is not supported by this swarm", param=name, code="unsupported_parameter")


def json_repr(value: Any) -> str:
    import json

    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return repr(value)[:60]


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *, lo_open: bool = False
            ) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"{name} must be a number in {bound}, got {json_repr(value)}", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise _bad(f"{name} must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                   + f", got {json_repr(value)}", param=name)
    return value


def _common(body: Any, allowed: set[str], neutral: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_fields(body, allowed, neutral)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: one of the ids GET /v1/models lists", param="model")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= MAX_STOP:
        stops = tuple(stop)
    else:
        raise _bad(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream must be true or false", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise _bad("stream_options takes only include_usage", param="stream_options")
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
    speculative = body.get("speculative")
    if speculative is not None and speculative != "prompt-lookup":
        raise _bad("speculative takes \"prompt-lookup\" (speculative decoding by n-gram lookup) or null",
                   param="speculative")
    return dict(speculative=speculative,
        model=model, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_integer(body, "top_k", 0) or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        seed=_integer(body, "seed", -(1 << 63), (1 << 64) - 1), stop=stops, stream=bool(stream),
        include_usage=include_usage)


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{index}].content: only text parts are supported, got {kind!r}",
                           param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{index}].content must be a string or a list of text parts",
               param=f"messages[{index}].content")


def parse_chat_request(body: Any) -> GenerationRequest:
    """A ``POST /v1/chat/completions`` body. Raises ApiError (400) on anything off."""
    common = _common(body, _CHAT_FIELDS, _CHAT_NEUTRAL)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format other than {\"type\": \"text\"} is not supported by this swarm",
                   param="response_format", code="unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {\"role\", \"content\"}", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role {json_repr(role)} is not supported (system, developer, user, assistant)",
                       param=f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise _bad("tool and function calling are not supported by this swarm", param=f"messages[{i}]",
                       code="unsupported_parameter")
        out.append({"role": _ROLES[role], "content": _message_text(m.get("content"), i)})
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    return GenerationRequest(prompt=out, chat=True, max_tokens=max_tokens, **common)


def parse_completion_request(body: Any) -> GenerationRequest:
    """A ``POST /v1/completions`` body (the prompt is used as is: no chat template)."""
    common = _common(body, _COMPLETION_FIELDS, _COMPLETION_NEUTRAL)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        parsed: str | list[int] = list(prompt)
    elif isinstance(prompt, str):
        parsed = prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("several prompts in one request are not supported; send one per request", param="prompt",
                   code="unsupported_parameter")
    else:
        raise _bad("prompt must be a string or a list of token ids", param="prompt")
    return GenerationRequest(prompt=parsed, chat=False, max_tokens=_integer(body, "max_tokens", 1), **common)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def swarm_extension(result: Any) -> dict[str, Any]:
    """The project's additions to a finished answer: how the swarm made it.

    One entry per fact. ``verification``: hop-steps used and audited, the share of the
    audited ones an independent check confirmed, and the hops nobody could check
    (``GenerationResult.verification_dict``; spec 13.2, "Reporting").
    """
    return {
        "route": [{"peer_id": h.peer_id, "address": h.address, "blocks": [h.start, h.end]} for h in result.route],
        "failovers": result.failovers,
        "timings": {"time_to_first_token": result.time_to_first_token, "total_seconds": result.total_seconds,
                    "tokens_per_second": result.tokens_per_second},
        "verification": result.verification_dict(),
    }


def chat_completion(*, id: str, model: str, created: int, text: str, result: Any) -> dict[str, Any]:
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": OPENAI_FINISH.get(result.finish_reason, "stop")}],
        "usage": usage(result.prompt_tokens, len(result.token_ids)),
        EXTENSION_FIELD: swarm_extension(result),
    }


def chat_chunk(*, id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               include_usage: bool = False, extension: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last, usage-only one
    if extension:
        chunk[EXTENSION_FIELD] = extension
    return chunk


def completion(*, id: str, model: str, created: int, text: str, result: Any) -> dict[str, Any]:
    return {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": OPENAI_FINISH.get(result.finish_reason, "stop")}],
        "usage": usage(result.prompt_tokens, len(result.token_ids)),
        EXTENSION_FIELD: swarm_extension(result),
    }


def completion_chunk(*, id: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     include_usage: bool = False, extension: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    if extension:
        chunk[EXTENSION_FIELD] = extension
    return chunk
