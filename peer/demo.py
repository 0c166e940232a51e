"""``swarm-peer demo``: a whole swarm on loopback, a real model, an answer.

Starts ``peers`` ``swarm-peer serve`` processes that split the model's blocks evenly
(the first one starts the DHT, the others bootstrap from it), asks the swarm one
question through the Python API while streaming the answer, prints the route and
tokens/s, then stops the servers with SIGTERM (they withdraw their announcements).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
import trio

from protocol.errors import SwarmError

from ._format import READY_PREFIX, format_route

if TYPE_CHECKING:
    from .api import Swarm
    from .client import TokenEvent

__all__ = ["run_demo", "start_server_process", "launch_server_process", "wait_ready", "ServerProcess", "split_blocks"]



class DemoError(SwarmError):
    """A demo server process failed to start."""


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans covering [0, num_blocks), sizes differing by at most one."""
    if not 1 <= parts <= num_blocks:
        raise DemoError(f"cannot split {num_blocks} blocks among {parts} peers")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class ServerProcess:
    """A ``swarm-peer serve`` child process and the address it announced."""

    def __init__(self, proc: subprocess.Popen[str], address: str, line: str) -> None:
        self.proc = proc
        self.address = address
        self.ready_line = line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait (SIGKILL after ``timeout``). Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server_process(model: str, blocks: tuple[int, int], *, identity: Path, bootstrap: Sequence[str] = (),
                         extra: Sequence[str] = (), timeout: float = 300.0,
                         stderr: int | IO[str] | None = None) -> ServerProcess:
    """Start ``swarm-peer serve`` and wait for its ready line (``timeout`` seconds)."""
    return wait_ready(launch_server_process(model, blocks, identity=identity, bootstrap=bootstrap, extra=extra,
                                            stderr=stderr), timeout=timeout)


def launch_server_process(model: str, blocks: tuple[int, int], *, identity: Path, bootstrap: Sequence[str] = (),
                          extra: Sequence[str] = (), stderr: int | IO[str] | None = None) -> subprocess.Popen[str]:
    """Start ``swarm-peer serve`` without waiting (see ``wait_ready``)."""
    cmd = [sys.executable, "-m", "peer.cli", "serve", "--model", model, "--blocks", f"{blocks[0]}:{blocks[1]}",
           "--identity", str(identity)]
    for addr in bootstrap:
        cmd += ["--bootstrap", addr]
    cmd += list(extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A session of its own: Ctrl-C at the terminal reaches only the demo, which stops its
    # servers once (a second signal would make a server quit at once instead of gracefully).
    return subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=stderr if stderr is not None else subprocess.DEVNULL,
                            text=True, env=env, cwd=Path(__file__).resolve().parent.parent, start_new_session=True)


def wait_ready(proc: subprocess.Popen[str], *, timeout: float = 300.0) -> ServerProcess:
    """Read ``proc``'s output until its ready line; a typed error if it exits or is late."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    args = list(proc.args) if isinstance(proc.args, (list, tuple)) else []
    what = " ".join(map(str, args[args.index("--blocks"):][:2])) if "--blocks" in args else "server"
    while True:
        line = proc.stdout.readline()
        if line.startswith(READY_PREFIX):
            address = line.split(" at ", 1)[1].split(" ", 1)[0]
            return ServerProcess(proc, address, line.strip())
        if not line and proc.poll() is not None:
            raise DemoError(f"server ({what}) exited with code {proc.returncode} before it was ready; run it "
                            f"alone to see why: {' '.join(map(str, args))}")
        if time.monotonic() > deadline:
            proc.kill()
            raise DemoError(f"server ({what}) was not ready after {timeout:.0f} s")


def run_demo(*, model: str, peers: int = 3, question: str, max_new_tokens: int = 40, web: bool = False,
             web_port: int = 8000) -> int:
    """Start the swarm, ask it ``question``, print the answer, route and speed; with
    ``web``, then serve the web page and API until Ctrl-C. Stops the servers either way."""
    from .runtime import resolve_model

    if web:
        from .cli_serve import check_port_free

        check_port_free("127.0.0.1", web_port, "--web-port")
    print(f"swarm-peer demo: resolving {model} ...", flush=True)
    info = resolve_model(model)
    spans = split_blocks(info.num_blocks, peers)
    # The peers and this client share the machine: one compute thread each avoids
    # OpenMP threads of several processes spinning against each other on few cores.
    threads = max(1, (os.cpu_count() or 1) // (peers + 1))
    torch.set_num_threads(threads)
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="swarm-peer-demo-") as tmp:
        try:
            t0 = time.monotonic()
            extra = ["--threads", str(threads)]
            print(f"starting {peers} peers for blocks " + ", ".join(f"{a}:{b}" for a, b in spans) + " ...", flush=True)
            servers.append(start_server_process(model, spans[0], identity=Path(tmp) / "peer0.key", extra=extra))
            print("  " + servers[0].ready_line, flush=True)
            # The others only need the first one's address: start them together.
            launched = [launch_server_process(model, span, identity=Path(tmp) / f"peer{i}.key",
                                              bootstrap=[servers[0].address], extra=extra)
                        for i, span in enumerate(spans[1:], start=1)]
            for proc in launched:
                try:
                    servers.append(wait_ready(proc))
                except DemoError:
                    for other in launched:
                        other.kill()
                    raise
                print("  " + servers[-1].ready_line, flush=True)
            print(f"swarm of {peers} peers up in {time.monotonic() - t0:.1f} s; asking: {question}\n", flush=True)
            trio.run(_ask, model, [s.address for s in servers], question, max_new_tokens,
                     web_port if web else None)
        finally:
            print("stopping the swarm ...", flush=True)
            codes = [s.stop() for s in servers]
            print(f"servers exited with codes {codes}", flush=True)
    if not web:
        print(f"\nTo chat with the swarm in a browser: swarm-peer demo --web, then open "
              f"http://127.0.0.1:{web_port}/ (the swarm and the page stay up until Ctrl-C).", flush=True)
    return 0


async def _ask(model: str, bootstrap: list[str], question: str, max_new_tokens: int, web_port: int | None) -> None:
    from .api import Swarm

    asked = time.monotonic()
    first: list[float] = []

    def show(event: TokenEvent) -> None:
        if not first:
            first.append(time.monotonic())
        print(event.text, end="", flush=True)

    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=bootstrap, model=model)
        result = await swarm.generate(question, max_new_tokens=max_new_tokens, chat=True, on_token=show)
        print()
        print(f"\nroute: {format_route(result.route)}")
        print(f"{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, first token after "
              f"{(first[0] if first else time.monotonic()) - asked:.2f} s", flush=True)
        if web_port is not None:
            await _serve_page(nursery, swarm, model, web_port)
        nursery.cancel_scope.cancel()


async def _serve_page(nursery: trio.Nursery, swarm: Swarm, model: str, port: int) -> None:
    from .http import ApiModel, SwarmApi, serve_http

    api = SwarmApi([ApiModel(model, swarm)])
    url = await nursery.start(functools.partial(serve_http, api.app, host="127.0.0.1", port=port))
    print(f"\nThe swarm stays up. Open {url} in a browser to chat with it and watch it "
          f"(OpenAI-compatible API at {url}v1). Ctrl-C stops everything.", flush=True)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            break
