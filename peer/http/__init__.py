"""The swarm over HTTP: an OpenAI-compatible API, health, metrics and the web page.

``SwarmApi(models).app`` is the ASGI app; ``serve_http`` serves it with hypercorn's trio
worker inside the caller's trio run (``swarm-peer api``, ``serve --api``, ``demo --web``)::

    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=["127.0.0.1:31337"])
        api = SwarmApi([ApiModel("smollm2-135m-instruct", swarm)])
        url = await nursery.start(functools.partial(serve_http, api.app, port=8000))

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(streaming or not), ``GET /health``, ``GET /metrics``, the page at ``/`` and its data at
``GET /api/swarm``.
"""

from ._app import ApiModel, SwarmApi, api_error_of
from ._openai import ApiError
from ._server import serve_http, url_of

__all__ = ["SwarmApi", "ApiModel", "ApiError", "api_error_of", "serve_http", "url_of"]
