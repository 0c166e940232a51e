"""Availability under failures with real `swarm-peer serve` processes on loopback (issue
12 items 1, 2, 4 and 5): the faults are the real ones, kill -9, SIGSTOP and a restart
on the same identity and port, and each test asserts that an honest client completes
with exactly the tokens of `transformers` generate. The in-process versions, with
finer assertions, are in test_availability.py."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer.api import Swarm
from peer.demo import ServerProcess, launch_server_process, start_server_process, wait_ready
from protocol import CloseSession, OpenSession
from protocol.errors import ErrorCode, RemoteError
from swarm.errors import SwarmError

pytestmark = pytest.mark.slow

LAYERS = 6
PROMPT = [1, 5, 9, 33, 7]
ONE_THREAD = ["--threads", "1"]  # several peers and the client share 2 cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-processes")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return str(path), model


def reference(model, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    return out[0, len(PROMPT):].tolist()


@pytest.fixture
def procs():
    """Started server processes, every one killed (and reaped) at the end."""
    started: list[ServerProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.proc.kill()
            p.proc.wait()


def peer_id(proc: ServerProcess) -> bytes:
    return bytes.fromhex(proc.ready_line.split("(peer ", 1)[1].split(",", 1)[0].split(")", 1)[0])


def route_of(result) -> list[bytes]:
    return [bytes.fromhex(h.peer_id) for h in result.route]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 120.0) -> None:
    """Until something accepts TCP connections on ``port`` (a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def prefer(swarm, proc, *, over):
    """Routing goes by measurements: on a loaded machine the probes may rank the halves
    first, so the client is told that ``proc`` is the fast one."""
    now = trio.current_time()
    for p, seconds in [(proc, 1e-4)] + [(o, 0.05) for o in over]:
        swarm.client.health.observe_rtt(peer_id(p), 1e-4, now)
        swarm.client.health.observe_step(peer_id(p), now, seconds=seconds, blocks=1, tokens=1, success=False)


def start_whole_and_halves(path, procs, tmp_path, whole_extra):
    """Servers 0:6 (with ``whole_extra`` options), 0:3 and 3:6 in ``procs``; returns
    (whole, [half, half])."""
    procs.append(start_server_process(path, (0, LAYERS), identity=tmp_path / "whole.key",
                                      extra=ONE_THREAD + whole_extra))
    for span in [(0, 3), (3, 6)]:
        procs.append(start_server_process(path, span, identity=tmp_path / f"{span[0]}.key",
                                          bootstrap=[procs[0].address], extra=ONE_THREAD))
    return procs[0], procs[1:]


async def test_a_killed_server_is_failed_over_at_open_and_a_restarting_one_is_routed_around(tiny, procs, tmp_path):
    """Items 1 and 4: servers 0:3, 3:6 and 0:6; the 0:6 one is killed with -9 (its records
    stay): every generation completes through 0:3 + 3:6 and only the first tries the dead
    peer. Then it restarts on the same identity and port: a client whose view still holds
    its old record generates while it loads, and gets the same tokens."""
    path, model = tiny
    port = free_port()
    whole_args = dict(identity=tmp_path / "whole.key", extra=ONE_THREAD + ["--port", str(port)])
    whole, halves = start_whole_and_halves(path, procs, tmp_path, ["--port", str(port)])
    want = reference(model, 10)
    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=[halves[0].address], model=path, audit=None)
        swarm.client.view_ttl = 600.0  # plan on the view that still lists the dead peer
        prefer(swarm, whole, over=halves)
        first = await swarm.generate(PROMPT, max_new_tokens=10)
        assert first.token_ids == want
        assert route_of(first) == [peer_id(whole)]  # one hop beats two
        late = await Swarm.connect(nursery, bootstrap=[halves[1].address], model=path, audit=None)
        late.client.view_ttl = 600.0
        await late.client.swarm_view(fresh=True)
        whole.proc.kill()
        whole.proc.wait()
        results = [await swarm.generate(PROMPT, max_new_tokens=10) for _ in range(3)]
        for result in results:
            assert result.token_ids == want
            assert route_of(result) == [peer_id(h) for h in halves]
        assert results[0].failovers >= 1
        assert [r.failovers for r in results[1:]] == [0, 0]
        # Item 4: the same identity and port, loading; `late` never saw it fail.
        restarted = launch_server_process(path, (0, LAYERS), bootstrap=[halves[0].address], **whole_args)
        try:
            await trio.to_thread.run_sync(wait_listening, port)
            during = await late.generate(PROMPT, max_new_tokens=10)
            assert during.token_ids == want
            procs[0] = await trio.to_thread.run_sync(wait_ready, restarted)
        finally:
            if restarted.poll() is None and procs[0].proc is not restarted:
                restarted.kill()
                restarted.wait()
        after = await late.generate(PROMPT, max_new_tokens=10)
        assert after.token_ids == want
        nursery.cancel_scope.cancel()


async def test_a_failed_open_leaves_no_session_on_the_hops_it_opened(tiny, procs, tmp_path):
    """Item 2: the head serves one session at a time; the tail hangs (SIGSTOP) while a
    route through both opens, so the open fails after the head's session was opened. That
    client stays connected, and another client still gets the head's one slot."""
    path, model = tiny
    procs.append(start_server_process(path, (0, 3), identity=tmp_path / "head.key",
                                      extra=ONE_THREAD + ["--max-sessions", "1"]))
    procs.append(start_server_process(path, (3, 6), identity=tmp_path / "tail.key", bootstrap=[procs[0].address],
                                      extra=ONE_THREAD))
    head, tail = procs
    want = reference(model, 6)
    async with trio.open_nursery() as nursery:
        first = await Swarm.connect(nursery, bootstrap=[head.address], model=path, audit=None, step_timeout=10.0)
        assert (await first.generate(PROMPT, max_new_tokens=6)).token_ids == want  # measured both
        os.kill(tail.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(30):
                with pytest.raises(SwarmError, match="blocks 3..5"):
                    await first.generate(PROMPT, max_new_tokens=6)
        finally:
            os.kill(tail.pid, signal.SIGCONT)
        other = await Swarm.connect(nursery, bootstrap=[tail.address], model=path, audit=None)
        with trio.fail_after(60):
            result = await other.generate(PROMPT, max_new_tokens=6)
        assert result.token_ids == want
        assert route_of(result) == [peer_id(head), peer_id(tail)]
        nursery.cancel_scope.cancel()


async def generate_stopping(swarm, proc, *, within: float):
    """16 tokens, SIGSTOPping ``proc`` at the fifth, within ``within`` seconds (one step
    timeout at most, for the whole generation); SIGCONT after."""
    stopped: list[int] = []

    def stop_it(event) -> None:
        if event.index == 4 and not stopped:
            os.kill(proc.pid, signal.SIGSTOP)
            stopped.append(proc.pid)

    try:
        with trio.fail_after(within):
            result = await swarm.generate(PROMPT, max_new_tokens=16, on_token=stop_it)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert stopped
    return result


async def test_a_stopped_server_costs_less_than_the_step_timeout(tiny, procs, tmp_path):
    """Item 5: two replicas of 0:6; the one in use is SIGSTOPped mid-generation. The step
    is hedged on (or failed over to) the other replica well within one step timeout, and
    the tokens are the same."""
    path, model = tiny
    procs.append(start_server_process(path, (0, LAYERS), identity=tmp_path / "a.key", extra=ONE_THREAD))
    procs.append(start_server_process(path, (0, LAYERS), identity=tmp_path / "b.key", bootstrap=[procs[0].address],
                                      extra=ONE_THREAD))
    by_peer = {peer_id(p): p for p in procs}
    want = reference(model, 16)
    step_timeout = 40.0
    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=[procs[1].address], model=path, audit=None,
                                    step_timeout=step_timeout)
        warm = await swarm.generate(PROMPT, max_new_tokens=4)
        in_use = by_peer[route_of(warm)[0]]
        result = await generate_stopping(swarm, in_use, within=step_timeout)
        assert result.token_ids == want
        assert result.hedges + result.failovers >= 1
        assert route_of(result) == [peer for peer in by_peer if peer != peer_id(in_use)]
        nursery.cancel_scope.cancel()


async def test_a_stopped_server_is_hedged_by_several_hops(tiny, procs, tmp_path):
    """Item 5 when no other server covers the stopped hop's blocks alone: servers 0:6
    (in use, one session slot), 0:3 and 3:6; the 0:6 one is SIGSTOPped mid-generation.
    A route 0:3 + 3:6 takes over (the history replayed there) well within one step
    timeout, with the same tokens; once SIGCONTed, the stopped server frees the session
    the client let go of, so its one slot opens again."""
    path, model = tiny
    whole, halves = start_whole_and_halves(path, procs, tmp_path, ["--max-sessions", "1"])
    want = reference(model, 16)
    step_timeout = 40.0
    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=[halves[0].address], model=path, audit=None,
                                    step_timeout=step_timeout)
        swarm.client.view_ttl = 600.0  # plan (and hedge) on the cached view
        prefer(swarm, whole, over=halves)
        warm = await swarm.generate(PROMPT, max_new_tokens=4)
        assert route_of(warm) == [peer_id(whole)]
        result = await generate_stopping(swarm, whole, within=step_timeout)
        assert result.token_ids == want
        assert result.hedges >= 1
        assert route_of(result) == [peer_id(h) for h in halves]
        conn = await swarm.client.host.connect(whole.address, peer_id=peer_id(whole), timeout=10)
        with trio.fail_after(30):  # a deadline: the woken server reads the CLOSE_SESSION it was sent
            while True:
                try:
                    opened = await conn.request(OpenSession(model=swarm.client.model, span=(0, LAYERS), max_length=32),
                                                timeout=10)
                    break
                except RemoteError as exc:
                    if exc.code != ErrorCode.BUSY:
                        raise
                    await trio.sleep(0.1)
        await conn.request(CloseSession(session=opened.session), timeout=10)
        nursery.cancel_scope.cancel()


def test_the_ready_line_names_the_peer(tmp_path: Path) -> None:
    """The helpers above read the peer id from the ready line; keep them honest."""
    line = "swarm-peer: serving blocks 0:6 of m at 127.0.0.1:1 (peer " + "ab" * 20 + ", 1.0 tok/s)"
    proc = ServerProcess(None, "127.0.0.1:1", line)  # type: ignore[arg-type]
    assert peer_id(proc) == bytes.fromhex("ab" * 20)
