"""``swarm-peer demo``: a whole swarm on loopback, a real model, an answer.

Starts ``peers`` ``swarm-peer serve`` processes that split the model's blocks evenly
(the first one starts the DHT, the others bootstrap from it), asks the swarm one
question through the Python API while streaming the answer, prints the route and
tokens/s, then stops the servers with SIGTERM (they withdraw their announcements).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from protocol.errors import SwarmError

__all__ = ["run_demo", "start_server_process", "ServerProcess", "split_blocks"]

READY_PREFIX = "swarm-peer: serving"


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
                         extra: Sequence[str] = (), timeout: float = 300.0, stderr=None) -> ServerProcess:
    """Start ``swarm-peer serve`` and wait for its ready line (``timeout`` seconds)."""
    cmd = [sys.executable, "-m", "peer.cli", "serve", "--model", model, "--blocks", f"{blocks[0]}:{blocks[1]}",
           "--identity", str(identity)]
    for addr in bootstrap:
        cmd += ["--bootstrap", addr]
    cmd += list(extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.DEVNULL,
                            text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if line.startswith(READY_PREFIX):
            address = line.split(" at ", 1)[1].split(" ", 1)[0]
            return ServerProcess(proc, address, line.strip())
        if not line and proc.poll() is not None:
            raise DemoError(f"server for blocks {blocks[0]}:{blocks[1]} exited with code {proc.returncode} "
                            f"before it was ready; run it alone to see why: {' '.join(cmd)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise DemoError(f"server for blocks {blocks[0]}:{blocks[1]} was not ready after {timeout:.0f} s")


def run_demo(*, model: str, peers: int = 3, question: str, max_new_tokens: int = 40) -> int:
    from .api import SyncSwarm
    from .cli import format_route
    from .runtime import resolve_model

    print(f"swarm-peer demo: resolving {model} ...", flush=True)
    info = resolve_model(model)
    spans = split_blocks(info.num_blocks, peers)
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="swarm-peer-demo-") as tmp:
        try:
            t0 = time.monotonic()
            for i, span in enumerate(spans):
                bootstrap = [servers[0].address] if servers else []
                print(f"starting peer {i + 1}/{peers} for blocks {span[0]}:{span[1]} ...", flush=True)
                servers.append(start_server_process(model, span, identity=Path(tmp) / f"peer{i}.key",
                                                    bootstrap=bootstrap))
                print("  " + servers[-1].ready_line, flush=True)
            print(f"swarm of {peers} peers up in {time.monotonic() - t0:.1f} s; asking: {question}\n", flush=True)
            with SyncSwarm(bootstrap=[s.address for s in servers], model=model) as swarm:
                result = swarm.generate(question, max_new_tokens=max_new_tokens, chat=True,
                                        on_token=lambda event: print(event.text, end="", flush=True))
            print()
            print(f"\nroute: {format_route(result.route)}")
            print(f"{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, first token after "
                  f"{result.time_to_first_token:.2f} s")
        finally:
            print("stopping the swarm ...", flush=True)
            codes = [s.stop() for s in servers]
            print(f"servers exited with codes {codes}", flush=True)
    return 0
