"""The HTTP app: OpenAI-compatible endpoints, health, metrics, the web page's data.

Theory of operation. ``SwarmApi`` holds one ``peer.api.Swarm`` per model it serves and
builds a Starlette app on them; generation is the Swarm's own (``SwarmClient.stream``),
nothing here samples or routes. A request is checked whole before any token is made
(``_prepare``: the body, the model, the prompt's tokens, the sampling parameters, a route
for every block), so what can fail early fails with an HTTP status and OpenAI's error
shape rather than inside a stream that has already said 200.

Cancellation: a streamed answer is an ``EventSourceResponse`` whose body iterator drives
the generation; when the client goes away, sse-starlette cancels it, the client's
``stream`` generator closes its chain (CLOSE_SESSION to every hop, shielded) and the
servers free the sessions. A non-streamed answer watches ``http.disconnect`` beside the
generation for the same effect.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from protocol.errors import SwarmError
from swarm.errors import NoRoute

from .._format import credit_to_dicts, view_to_dict
from ..catalog import ServedModel, served_models
from ..client import GenerationResult, ModelNotServed, PromptTooLong
from ..runtime import InvalidArgument, ModelError, SamplingParams
from . import _openai as oa
from ._metrics import CONTENT_TYPE_LATEST, ApiMetrics

__all__ = ["SwarmApi", "ApiModel"]

log = logging.getLogger("peer.http")

STATIC = Path(__file__).parent / "static"


@dataclass(slots=True)
class ApiModel:
    """A model the API answers for: the name clients use and the swarm that serves it."""

    name: str
    swarm: Any  # peer.api.Swarm

    @property
    def model_id(self) -> str:
        return str(self.swarm.model)


@dataclass(frozen=True, slots=True)
class _Prepared:
    model: ApiModel
    prompt_ids: list[int]
    params: SamplingParams
    speculative: str | None = None  # "prompt-lookup" or None

    def drafting(self) -> Any:
        """The ``speculative=`` argument of the client's generate/stream."""
        if self.speculative is None:
            return None
        from ..speculative import Speculative
        from .._drafters import PromptLookup

        return Speculative(PromptLookup())


def error_response(error: oa.ApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status)


def api_error_of(exc: SwarmError) -> oa.ApiError:
    """The HTTP status and OpenAI error of a swarm's typed error."""
    if isinstance(exc, NoRoute):
        return oa.ApiError(503, str(exc), type="service_unavailable", code="no_route",
                           extra={"missing_blocks": [exc.start, exc.end]})
    if isinstance(exc, ModelNotServed):
        return oa.ApiError(503, str(exc), type="service_unavailable", code="model_not_served")
    if isinstance(exc, PromptTooLong):
        return oa.ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, InvalidArgument):
        return oa.ApiError(400, str(exc))
    if isinstance(exc, ModelError):
        return oa.ApiError(500, str(exc), type="server_error", code="model_error")
    return oa.ApiError(503, str(exc), type="service_unavailable", code="swarm_error")


class SwarmApi:
    """The app (``.app``, an ASGI callable) over ``models``.

    Args:
        models: the models to answer for, each with its connected ``Swarm``; the first is
            the web page's default.
    """

    def __init__(self, models: Sequence[ApiModel]) -> None:
        if not models:
            raise ValueError("the API needs at least one model")
        self.models = list(models)
        self._by_name: dict[str, ApiModel] = {}
        for m in self.models:
            self._by_name.setdefault(m.name, m)
            self._by_name.setdefault(m.model_id, m)
        self.metrics = ApiMetrics(lambda: [(m.name, m.swarm.client.auditor) for m in self.models])
        self.latency: dict[str, float] = {}  # peer id hex -> mean seconds per step, last measured
        self.app = Starlette(routes=[
            Route("/", self._index),
            Route("/health", self._health),
            Route("/metrics", self._metrics),
            Route("/v1/models", self._list_models),
            Route("/v1/models/{model:path}", self._get_model),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/api/swarm", self._swarm_view),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ], exception_handlers={HTTPException: self._http_error})

    async def warm_up(self) -> None:
        """Load each model's tokenizer now (in a thread) rather than in the first request."""
        for m in self.models:
            head = m.swarm.client.head
            try:
                await trio.to_thread.run_sync(lambda: head.tokenizer)
            except ModelError as exc:  # token-id prompts still work; text prompts will say why
                log.warning("%s", exc)

    # -- plumbing ---------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(oa.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                          code=code))

    def _count(self, endpoint: str, status: int) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()

    def _fail(self, endpoint: str, error: oa.ApiError) -> JSONResponse:
        self._count(endpoint, error.status)
        self.metrics.errors.labels(error.code or error.type).inc()
        return error_response(error)

    def model(self, name: str) -> ApiModel:
        """The model called ``name`` (its name or its ``name@digest`` id). Raises ApiError 404."""
        found = self._by_name.get(name)
        if found is None:
            known = ", ".join(m.name for m in self.models)
            raise oa.ApiError(404, f"the model {name!r} does not exist here; this API serves: {known}",
                              param="model", code="model_not_found")
        return found

    async def _prepare(self, req: oa.GenerationRequest) -> _Prepared:
        model = self.model(req.model)
        client = model.swarm.client
        head = client.head
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            ids = list(req.prompt)
            if min(ids) < 0 or max(ids) >= head.vocab_size:
                raise oa.ApiError(400, f"token ids must be in [0, {head.vocab_size})", param="prompt")
        else:
            ids = head.encode_prompt(req.prompt, chat=req.chat)
        room = client.max_length - len(ids)
        default = oa.DEFAULT_CHAT_MAX_TOKENS if req.chat else oa.DEFAULT_COMPLETION_MAX_TOKENS
        max_new = req.max_tokens if req.max_tokens is not None else max(min(default, room), 1)
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
                                stop=req.stop)
        if len(ids) + max_new > client.max_length:
            raise PromptTooLong(f"prompt of {len(ids)} tokens + max_tokens {max_new} exceeds the model's context "
                                f"of {client.max_length}; shorten the prompt or lower max_tokens")
        await client.plan()  # NoRoute / ModelNotServed now, while a status code can still say so
        return _Prepared(model, ids, params, req.speculative)

    def _observe(self, prepared: _Prepared, result: GenerationResult) -> None:
        name = prepared.model.name
        self.metrics.prompt_tokens.labels(name).inc(result.prompt_tokens)
        self.metrics.completion_tokens.labels(name).inc(len(result.token_ids))
        self.metrics.failovers.labels(name).inc(result.failovers)
        steps = max(len(result.token_ids), 1)
        for peer, seconds in result.hop_latency.items():
            self.latency[peer] = seconds / steps

    # -- generation -------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, "chat.completions", oa.parse_chat_request)

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", oa.parse_completion_request)

    async def _generate(self, request: Request, endpoint: str, parse: Any) -> Response:
        arrived = time.perf_counter()
        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise oa.ApiError(400, "the request body is not valid JSON") from None
            req = parse(body)
            prepared = await self._prepare(req)
        except oa.ApiError as error:
            return self._fail(endpoint, error)
        except SwarmError as exc:
            return self._fail(endpoint, api_error_of(exc))
        chat = endpoint == "chat.completions"
        if req.stream:
            self._count(endpoint, 200)
            events = self._stream(prepared, req, chat=chat, arrived=arrived)
            return EventSourceResponse(events, ping=15, headers={"Cache-Control": "no-cache"})
        try:
            result = await self._run_until_disconnect(request, prepared, arrived)
        except SwarmError as exc:
            return self._fail(endpoint, api_error_of(exc))
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        self._count(endpoint, 200)
        build = oa.chat_completion if chat else oa.completion
        return JSONResponse(build(id=oa.new_id("chatcmpl" if chat else "cmpl"), model=prepared.model.name,
                                  created=int(time.time()), text=result.text, result=result))

    async def _run_until_disconnect(self, request: Request, prepared: _Prepared, arrived: float
                                    ) -> GenerationResult | None:
        name = prepared.model.name
        client = prepared.model.swarm.client
        result: list[GenerationResult] = []
        first: list[float] = []

        def on_token(_: Any) -> None:
            if not first:
                first.append(time.perf_counter())

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        failed: list[SwarmError] = []
        self.metrics.active.labels(name).inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                try:
                    result.append(await client.generate(prepared.prompt_ids, prepared.params, on_token=on_token,
                                                        speculative=prepared.drafting()))
                except SwarmError as exc:  # raised below, outside the nursery (no exception group)
                    failed.append(exc)
                nursery.cancel_scope.cancel()
        finally:
            self.metrics.active.labels(name).dec()
        if failed:
            raise failed[0]
        if not result:
            self.metrics.cancelled.labels(name).inc()
            return None
        if first:
            self.metrics.ttft.labels(name).observe(first[0] - arrived)
        self._observe(prepared, result[0])
        return result[0]

    async def _stream(self, prepared: _Prepared, req: oa.GenerationRequest, *, chat: bool, arrived: float
                      ) -> AsyncIterator[str]:
        """The SSE ``data:`` payloads of one streamed answer, ending in ``[DONE]``."""
        name = prepared.model.name
        client = prepared.model.swarm.client
        ident, created = oa.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        usage = req.include_usage

        def chunk(text: str | None = None, *, finish: str | None = None, role: bool = False,
                  extension: dict[str, Any] | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                out = oa.chat_chunk(id=ident, model=name, created=created, delta=delta, finish_reason=finish,
                                    include_usage=usage, extension=extension)
            else:
                out = oa.completion_chunk(id=ident, model=name, created=created, text=text or "",
                                          finish_reason=finish, include_usage=usage, extension=extension)
            return json.dumps(out)

        finished = False
        self.metrics.active.labels(name).inc()
        try:
            if chat:
                yield chunk(role=True)
            results: list[GenerationResult] = []
            first = True
            try:
                async with aclosing(client.stream(prepared.prompt_ids, prepared.params, result_out=results,
                                                   speculative=prepared.drafting())) as gen:
                    async for event in gen:
                        if first:
                            first = False
                            self.metrics.ttft.labels(name).observe(time.perf_counter() - arrived)
                        if event.text or event.rewind:
                            # A rewind (an audit convicted a hop after its tokens were sent)
                            # asks the reader to drop that many earlier tokens.
                            yield chunk(event.text, extension={"rewind": event.rewind} if event.rewind else None)
            except SwarmError as exc:
                error = api_error_of(exc)
                self.metrics.errors.labels(error.code or error.type).inc()
                yield json.dumps(error.to_json())
                yield "[DONE]"
                finished = True
                return
            result = results[0]
            self._observe(prepared, result)
            yield chunk(finish=oa.OPENAI_FINISH.get(result.finish_reason, "stop"),
                        extension=oa.swarm_extension(result))
            if usage:
                tail: dict[str, Any] = json.loads(chunk(finish=None))
                tail["choices"] = []
                tail["usage"] = oa.usage(result.prompt_tokens, len(result.token_ids))
                yield json.dumps(tail)
            yield "[DONE]"
            finished = True
        finally:
            self.metrics.active.labels(name).dec()
            if not finished:
                self.metrics.cancelled.labels(name).inc()
                log.info("a client went away mid-stream: its generation is cancelled and its sessions closed")

    # -- models, health, metrics ------------------------------------------------------

    def _catalog_entries(self) -> list[ServedModel]:
        return [ServedModel(name=m.name, model_id=m.model_id, num_blocks=m.swarm.client.num_blocks)
                for m in self.models]

    @staticmethod
    def _model_json(entry: ServedModel) -> dict[str, Any]:
        return {"id": entry.name, "object": "model", "created": 0, "owned_by": "swarm",
                oa.EXTENSION_FIELD: {"model_id": entry.model_id, "num_blocks": entry.num_blocks,
                                     "hidden_size": entry.hidden_size, "servers": entry.servers,
                                     "origin": entry.origin}}

    async def _list_models(self, request: Request) -> Response:
        # Every model the swarm's index lists (origin "swarm": listed, not answered here).
        entries = await served_models(self._catalog_entries(), self.models[0].swarm.client.dht)
        self._count("models", 200)
        return JSONResponse({"object": "list", "data": [self._model_json(e) for e in entries]})

    async def _get_model(self, request: Request) -> Response:
        try:
            model = self.model(request.path_params["model"])
        except oa.ApiError as error:
            return self._fail("models", error)
        entry = next(e for e in self._catalog_entries() if e.model_id == model.model_id)
        self._count("models", 200)
        return JSONResponse(self._model_json(entry))

    async def _health(self, request: Request) -> Response:
        """200 when every model has a route through the swarm right now, else 503."""
        models: dict[str, Any] = {}
        for m in self.models:
            try:
                route = await m.swarm.client.plan()
            except NoRoute as exc:
                models[m.name] = {"route": False, "error": str(exc), "missing_blocks": [exc.start, exc.end]}
            except SwarmError as exc:
                models[m.name] = {"route": False, "error": str(exc)}
            else:
                models[m.name] = {"route": True, "hops": len(route.hops)}
        ok = all(v["route"] for v in models.values())
        status = 200 if ok else 503
        self._count("health", status)
        return JSONResponse({"status": "ok" if ok else "no_route", "models": models}, status_code=status)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- the web page -----------------------------------------------------------------

    async def _index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def _swarm_view(self, request: Request) -> Response:
        """The swarm view of one model (``?model=``, default the first) for the page."""
        try:
            model = self.model(request.query_params.get("model") or self.models[0].name)
        except oa.ApiError as error:
            return self._fail("swarm", error)
        swarm = model.swarm
        client = swarm.client
        view = await client.swarm_view()
        now = time.time()
        body = view_to_dict(view, now=now, reputation=client.reputation, latency=self.latency,
                            model_name=model.name, health=swarm.health())
        body["peer_id"] = client.host.peer_id.hex()
        body["credit"] = credit_to_dicts(swarm.credit()) if client.credit is not None else []
        body["models"] = [m.name for m in self.models]
        return JSONResponse(body)
