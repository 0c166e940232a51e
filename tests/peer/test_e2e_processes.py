"""End to end with real processes: `swarm-peer serve` children on loopback serving
SmolLM2-135M-Instruct (the default model), a client in this process, and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from peer.api import Swarm
from peer.demo import ServerProcess, start_server_process
from peer.runtime import DEFAULT_MODEL
from swarm.errors import NoRoute

pytestmark = pytest.mark.slow

PROMPTS = ["The three primary colors are", "def fibonacci(n):", "Paris is the capital of"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def reference():
    """transformers' own greedy generate on the whole GGUF model, for each prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from peer.runtime import load_head
    from peer.runtime._sources import builtin_gguf_path

    head = load_head(DEFAULT_MODEL)
    path = builtin_gguf_path(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = head.encode_prompt(prompt, chat=False)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
        out[prompt] = gen[0, len(ids):].tolist()
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Blocks 0:10 twice (for failover), 10:20 and 20:30, each its own process."""
    tmp = tmp_path_factory.mktemp("e2e")
    procs: list[ServerProcess] = []
    try:
        one = ["--threads", "1"]  # four peers and the client share 2 cores
        procs.append(start_server_process(DEFAULT_MODEL, (0, 10), identity=tmp / "a.key", extra=one))
        boot = [procs[0].address]
        for name, span in [("b", (0, 10)), ("c", (10, 20)), ("d", (20, 30))]:
            procs.append(start_server_process(DEFAULT_MODEL, span, identity=tmp / f"{name}.key", bootstrap=boot,
                                              extra=one))
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


def peer_of(proc: ServerProcess) -> str:
    return proc.ready_line.split("(peer ", 1)[1].split(",", 1)[0]


async def test_relay_through_processes_equals_transformers_and_survives_kill(servers, reference):
    async with trio.open_nursery() as nursery:
        swarm = await Swarm.connect(nursery, bootstrap=[servers[2].address])
        view = await swarm.status()
        assert len(view.servers) == 4

        # Two concurrent clients: correct, independent outputs.
        other = await Swarm.connect(nursery, bootstrap=[servers[3].address])
        results = {}

        async def run(swarm_, prompt):
            results[prompt] = await swarm_.generate(prompt, max_new_tokens=NEW_TOKENS, chat=False)

        async with trio.open_nursery() as jobs:
            jobs.start_soon(run, swarm, PROMPTS[0])
            jobs.start_soon(run, other, PROMPTS[1])
        for prompt in PROMPTS[:2]:
            assert results[prompt].token_ids == reference[prompt], prompt

        # kill -9 the server in use for blocks 0:10 mid-generation: same tokens.
        route = await swarm.client.plan(fresh=True)
        victim = next(p for p in servers[:2] if peer_of(p) == route.hops[0].peer_id.hex())

        def kill(event):
            if event.index == 10:
                os.kill(victim.pid, signal.SIGKILL)

        result = await swarm.generate(PROMPTS[2], max_new_tokens=NEW_TOKENS, chat=False, on_token=kill)
        assert victim.proc.wait(5) == -signal.SIGKILL
        assert result.failovers >= 1
        assert result.token_ids == reference[PROMPTS[2]]
        assert peer_of(victim) not in [h.peer_id for h in result.route]

        # SIGTERM the survivor for 0:10: it exits 0 and withdraws its announcement, so no
        # new route uses it (the kill -9'd peer could not withdraw: its records stay until
        # they expire, and clients route around it when it fails, as above).
        survivor = next(p for p in servers[:2] if p is not victim)
        assert bytes.fromhex(peer_of(survivor)) in (await swarm.status()).servers
        assert survivor.stop() == 0
        view = await swarm.status()
        assert bytes.fromhex(peer_of(survivor)) not in view.servers
        try:  # only the kill -9'd peer announced 0:10 now; whether its records still answer varies
            route = await swarm.client.plan(fresh=True)
        except NoRoute:
            pass
        else:
            assert peer_of(survivor) not in [h.peer_id.hex() for h in route.hops]
        nursery.cancel_scope.cancel()


def test_demo_runs_to_completion():
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "peer.cli", "demo", "--max-new-tokens", "12"],
                          capture_output=True, text=True, timeout=600)
    print(done.stdout[-2000:], f"\n(demo took {time.monotonic() - t0:.0f} s)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "route: " in done.stdout
    assert "tokens/s" in done.stdout
    assert "servers exited with codes [0, 0, 0]" in done.stdout
