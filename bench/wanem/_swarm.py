"""Launch an emulated swarm: a proxy process and ``swarm-peer serve`` processes behind it.

``EmulatedSwarm`` is a context manager. On entry it picks a free real port on each
server node's address, starts the proxy (``python -m bench.wanem proxy``) with a route
per server node, then starts one ``swarm-peer serve`` per ``ServerSpec``, listening on
``node.ip:real_port``, announcing the proxy's ``node.ip:proxy_port`` and dialling from
``node.ip``; the first server starts the DHT and the others bootstrap through the
proxy from it. Clients join with ``connect`` (a ``peer.api.Swarm`` that listens and
dials from its node's address). On exit, whatever happened, the servers get SIGTERM
(SIGKILL after a grace) and then the proxy; the proxy prints its link statistics.
Every child also gets SIGTERM if this process dies without cleaning up (SIGKILL).

With ``proxy=False`` the servers announce their real addresses: the same processes and
addresses with no emulated network (the loopback baseline in the same run).

One server per node: replicas are nodes of their own in the same region.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ._topology import Topology

__all__ = ["ServerSpec", "EmulatedSwarm", "ProxyProcess", "EmulatorError", "exit_on_sigterm", "die_with_parent",
           "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "swarm-peer: serving"  # peer/cli.py's ready line
PROXY_READY = "wanem-proxy: ready "
PROXY_OVERHEAD = "wanem-proxy: overhead"


class EmulatorError(RuntimeError):
    """A process of the emulated swarm failed to start (the message says which and where its log is)."""


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit in the main thread, so ``with EmulatedSwarm(...)`` cleans up."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSpec:
    """One ``swarm-peer serve`` process on topology node ``node`` serving ``blocks`` (S, E).

    ``args``: more ``serve`` arguments. ``preexec``: run in the child before it execs
    (e.g. to join a memory cgroup, so that everything it allocates is charged there).
    """

    node: str
    blocks: tuple[int, int]
    args: tuple[str, ...] = ()
    preexec: Callable[[], None] | None = None


class _Lines:
    """Lines from a child's stdout with a deadline (a bare ``readline`` would wait forever)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.buffer = proc, proc.stdout.fileno(), b""

    def next(self, deadline: float) -> str | None:
        """The next line, or None at EOF or past ``deadline``."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")


def die_with_parent(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when this process dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``), then runs ``then``."""

    def preexec() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
        if then is not None:
            then()

    return preexec


def free_port(ip: str) -> int:
    """A port free on ``ip`` right now (each node has its own address, so nothing else
    is likely to take it before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((ip, 0))
        return int(probe.getsockname()[1])


class ProxyProcess:
    """``python -m bench.wanem proxy``: started by ``EmulatedSwarm``, or alone for other setups.

    ``routes``: node name -> the real port its server listens on (at the node's ip).
    After ``start``: ``addresses`` (node -> where the proxy listens for it) and
    ``overhead_line`` (the proxy's own overhead at zero delay, as it printed it).
    """

    def __init__(self, topology_path: Path, routes: Mapping[str, int], *, log_path: Path,
                 measure_overhead: bool = True) -> None:
        self.topology_path, self.routes, self.log_path = topology_path, dict(routes), log_path
        self.measure_overhead = measure_overhead
        self.addresses: dict[str, str] = {}
        self.overhead_line = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ProxyProcess:
        cmd = [sys.executable, "-m", "bench.wanem", "proxy", "--topology", str(self.topology_path)]
        for node, port in self.routes.items():
            cmd += ["--route", f"{node}={port}"]
        if not self.measure_overhead:
            cmd.append("--no-overhead")
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        lines = _Lines(self.proc)
        while (line := lines.next(deadline)) is not None:
            if line.startswith(PROXY_OVERHEAD):
                self.overhead_line = line.strip()
            elif line.startswith(PROXY_READY):
                self.addresses = json.loads(line[len(PROXY_READY):])
                return self
        self.stop()
        raise EmulatorError(f"the delay proxy did not start; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM (SIGKILL after ``timeout``); returns what it printed on the way out."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.proc = None
        return (out or b"").decode(errors="replace")


class _Server:
    def __init__(self, spec: ServerSpec, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.spec, self.proc, self.log_path = spec, proc, log_path
        self.address = ""
        self.ready_line = ""

    def wait_ready(self, deadline: float) -> None:
        lines = _Lines(self.proc)
        while (line := lines.next(deadline)) is not None:
            if line.startswith(READY_PREFIX):
                self.ready_line = line.strip()
                self.address = line.split(" at ", 1)[1].split(" ", 1)[0]
                return
        what = f"server on {self.spec.node} (blocks {self.spec.blocks[0]}:{self.spec.blocks[1]})"
        if self.proc.poll() is not None:
            raise EmulatorError(f"{what} exited with code {self.proc.returncode}; see {self.log_path}")
        raise EmulatorError(f"{what} was not ready in time; see {self.log_path}")

    def stop(self, timeout: float) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class EmulatedSwarm:
    """Servers on their own loopback addresses behind the delay proxy (module docstring).

    Args:
        topology: every ``ServerSpec.node`` and every client node must be in it.
        model: what the servers serve (``--model``) and clients load the head of.
        servers: one per node; the first one starts the DHT.
        workdir: identities, the topology file and every process's log go here.
        threads: ``--threads`` (and OMP_NUM_THREADS) of each server.
        proxy: False to skip the proxy (servers announce their real addresses).
        env: extra environment for the servers (and the proxy).
        timeout: seconds to wait for all servers to be ready.

    Raises (on entry): EmulatorError, with the log file to read.
    """

    def __init__(self, topology: Topology, model: str, servers: Sequence[ServerSpec], *, workdir: Path,
                 threads: int = 1, proxy: bool = True, env: Mapping[str, str] | None = None,
                 timeout: float = 300.0, stop_grace: float = 20.0) -> None:
        if not servers:
            raise EmulatorError("an emulated swarm needs at least one server")
        nodes = [s.node for s in servers]
        if len(set(nodes)) != len(nodes):
            raise EmulatorError(f"one server per node: {nodes}")
        for node in nodes:
            topology.node(node)
        self.topology, self.model, self.specs = topology, model, list(servers)
        self.workdir, self.threads, self.use_proxy = Path(workdir), threads, proxy
        self.env = dict(env or {})
        self.timeout, self.stop_grace = timeout, stop_grace
        self.proxy: ProxyProcess | None = None
        self.servers: list[_Server] = []
        self.proxy_report = ""

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> EmulatedSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        topo_path = self.workdir / "topology.toml"
        topo_path.write_text(self.topology.dumps())
        real = {s.node: free_port(self.topology.node(s.node).ip) for s in self.specs}
        announced = {node: f"{self.topology.node(node).ip}:{port}" for node, port in real.items()}
        if self.use_proxy:
            self.proxy = ProxyProcess(topo_path, real, log_path=self.workdir / "proxy.log").start()
            announced = dict(self.proxy.addresses)
        deadline = time.monotonic() + self.timeout
        first = self._launch(self.specs[0], real, announced, bootstrap=())
        first.wait_ready(deadline)
        rest = [self._launch(spec, real, announced, bootstrap=(first.address,)) for spec in self.specs[1:]]
        for server in rest:
            server.wait_ready(deadline)

    def _launch(self, spec: ServerSpec, real: Mapping[str, int], announced: Mapping[str, str],
                bootstrap: Sequence[str]) -> _Server:
        ip = self.topology.node(spec.node).ip
        cmd = [sys.executable, "-m", "peer.cli", "serve", "--model", self.model,
               "--blocks", f"{spec.blocks[0]}:{spec.blocks[1]}", "--identity", str(self.workdir / f"{spec.node}.key"),
               "--host", ip, "--port", str(real[spec.node]), "--announce-addr", announced[spec.node],
               "--source-addr", ip, "--threads", str(self.threads)]
        for addr in bootstrap:
            cmd += ["--bootstrap", addr]
        cmd += list(spec.args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads), **self.env}
        log_path = self.workdir / f"{spec.node}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO_ROOT,
                                    preexec_fn=die_with_parent(spec.preexec))
        server = _Server(spec, proc, log_path)
        self.servers.append(server)
        return server

    def stop(self) -> None:
        """Stop every server (SIGTERM, all at once), then the proxy. Safe to call twice."""
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.stop(self.stop_grace)
        self.servers.clear()
        if self.proxy is not None:
            self.proxy_report = self.proxy.stop()
            self.proxy = None

    # -- what scripts use ----------------------------------------------------------------

    @property
    def addresses(self) -> dict[str, str]:
        """Server node -> the address it announces (the proxy's, unless ``proxy=False``)."""
        return {s.spec.node: s.address for s in self.servers}

    @property
    def bootstrap(self) -> list[str]:
        return [s.address for s in self.servers]

    @property
    def overhead_line(self) -> str:
        return self.proxy.overhead_line if self.proxy is not None else ""

    def client_options(self, node: str) -> dict[str, Any]:
        """``Swarm.connect`` arguments that put a client on ``node`` (listen and dial from its ip)."""
        ip = self.topology.node(node).ip
        return {"listen_host": ip, "source_host": ip}

    async def connect(self, nursery: trio.Nursery, node: str, **kwargs: Any) -> Any:
        """A ``peer.api.Swarm`` client on ``node``; ``kwargs`` go to ``Swarm.connect``."""
        from peer.api import Swarm

        return await Swarm.connect(nursery, bootstrap=self.bootstrap, model=self.model,
                                   **self.client_options(node), **kwargs)
