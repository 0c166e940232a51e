"""Serving the app with hypercorn's trio worker, inside the caller's trio run.

``serve_http`` is a ``run(*, task_status)``-style service: it binds, calls
``task_status.started(url)`` with the address it is reachable at, and serves until
cancelled. It shares the trio run with the swarm's own tasks (the ``Swarm``'s host, DHT
and credit service), so a request's generation is an ordinary task of this process.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["serve_http", "url_of"]

log = logging.getLogger("peer.http")


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def url_of(bind: str) -> str:
    """A URL a browser on this machine can open for hypercorn's ``http://HOST:PORT``
    (a wildcard bind is reached through loopback)."""
    return bind.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:") + "/"


async def serve_http(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` (ASGI) on ``host:port`` until cancelled (port 0: any free port).

    ``task_status.started`` gets the page's URL, e.g. ``http://127.0.0.1:8000/``.

    Raises:
        OSError: the address cannot be bound.
    """
    config = Config()
    config.bind = [_bind(host, port)]
    config.accesslog = None  # one line per request would drown the server's status line
    config.errorlog = log
    config.graceful_timeout = 1.0  # open streams are cancelled, and their sessions closed, on the way out
    config.keep_alive_timeout = 75.0

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        task_status.started(url_of(binds[0]))
