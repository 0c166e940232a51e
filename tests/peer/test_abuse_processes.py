"""Issue 10 items 1-4 and issue 12 items 2 and 4 against real ``swarm-peer serve``
processes on loopback: each attack of ``bench/_attacks.py`` runs, bounded in count and
time, while an honest client in this process generates; every honest generation must
complete with the tokens ``transformers`` gives, and no server's RSS (read from /proc)
may grow by more than a generous bound. Attackers live on 127.0.1.0/24 (they dial from
there), the honest client on 127.0.0.1. Timing is ``bench/abuse.py``'s business."""

from __future__ import annotations

import signal
import socket
import time

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from bench._attacks import ATTACKS, Server, Target, run_attack
from peer.api import Swarm
from peer.demo import ServerProcess, launch_server_process, start_server_process
from peer.runtime import resolve_model
from protocol import Identity, OpenSession
from protocol.errors import ErrorCode, RemoteError, SwarmError
from swarm.errors import PeerUnreachable
from swarm.transport import Host

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = [1, 5, 9, 33, 7, 250, 17]
NEW_TOKENS = 10
SPANS = ((0, 2), (2, 4))
HIDDEN, CONTEXT = 64, 512
#: RSS growth allowed a server during one attack (the benchmark's goal is 100 MB).
RSS_BOUND = 150 * 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abuse")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         eos_token_id=None, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = tmp / "tiny"
    model.save_pretrained(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    expected = out[0, len(PROMPT):].tolist()
    procs: list[ServerProcess] = []
    try:
        one = ["--threads", "1"]
        procs.append(start_server_process(str(path), SPANS[0], identity=tmp / "a.key", extra=one))
        procs.append(start_server_process(str(path), SPANS[1], identity=tmp / "b.key",
                                          bootstrap=[procs[0].address], extra=one))
        peers = trio.run(_peer_ids, [p.address for p in procs])
        target = Target(servers=tuple(Server(p.address, peer, span) for p, peer, span in zip(procs, peers, SPANS)),
                        model=resolve_model(str(path)).model_id, hidden=HIDDEN, num_blocks=4, context=CONTEXT)
        yield str(path), expected, procs, target, tmp
    finally:
        for proc in procs:
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.proc.wait(timeout=30)
            except Exception:
                proc.proc.kill()


async def _peer_ids(addresses):
    async with trio.open_nursery() as nursery:
        host = Host(Identity.generate())
        await nursery.start(host.run)
        ids = [(await host.connect(a)).peer_id for a in addresses]
        nursery.cancel_scope.cancel()
    return ids


async def under_attack(swarm, name: str, seconds: float):
    """Run attack ``name`` while an honest client generates; (generations, attack result,
    RSS growth per server)."""
    path, expected, procs, target, _ = swarm
    generations: list[list[int]] = []
    before = [rss(p.proc.pid) for p in procs]
    peak = list(before)
    result: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        client = await Swarm.connect(nursery, bootstrap=[procs[0].address], model=path, audit=0)
        assert (await client.generate(PROMPT, max_new_tokens=NEW_TOKENS)).token_ids == expected  # warm
        done = trio.Event()

        async def attack():
            result.update(await run_attack(name, target, seconds=seconds))
            done.set()

        async def sample():
            while not done.is_set():
                for i, p in enumerate(procs):
                    peak[i] = max(peak[i], rss(p.proc.pid))
                await trio.sleep(0.1)

        nursery.start_soon(attack)
        nursery.start_soon(sample)
        while not done.is_set():
            with trio.fail_after(120):
                generations.append((await client.generate(PROMPT, max_new_tokens=NEW_TOKENS)).token_ids)
        nursery.cancel_scope.cancel()
    growth = [p - b for p, b in zip(peak, before)]
    print(f"\n{name}: {result}; {len(generations)} honest generations; RSS growth "
          f"{', '.join(f'{g / 2**20:.0f} MB' for g in growth)}")
    assert generations
    assert all(tokens == expected for tokens in generations)
    assert max(growth) < RSS_BOUND
    return generations, result, growth


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_honest_generation_survives(swarm, name):
    """Issue 10 items 1-4, each attack in turn (see bench/_attacks.py for what each does)."""
    _, result, _ = await under_attack(swarm, name, seconds=5.0)
    if name == "parse-bomb":  # item 1: each bomb ended its connection at once
        assert result["bombs sent"] >= 2
        assert result["connections dropped"] == result["bombs sent"]
    elif name == "partial-flood":  # item 2
        assert result["connections dropped"] >= 1
    elif name == "socket-flood":  # item 3: beyond one address's share, sockets are closed at accept
        assert result["sockets closed by the victim"] >= 200
    elif name == "handshake-flood":
        assert result["connections closed by the victim"] >= 1
    elif name == "session-hog":  # item 4: four identities of one subnet get half the slots at most
        assert result["refusals"] >= 1
        assert result["sessions opened"] <= 2 * 8
    elif name == "once-flood":
        assert result["FORWARD_ONCE computed"] + result["refusals"] >= 1


async def test_sessions_a_failed_open_leaves_behind_expire(swarm):
    """Issue 12 item 2: opens that failed half-way left sessions that locked a server's
    slots for 300 s. A server closes sessions that got no step within 15 s."""
    path, expected, procs, target, _ = swarm
    server = target.servers[1]
    async with trio.open_nursery() as nursery:
        leakers = []
        for i in range(4):  # four identities, four sessions each: every slot of the victim's 16
            host = Host(Identity.generate())
            await nursery.start(host.run)
            conn = await host.connect(server.address)
            for _ in range(4):
                await conn.request(OpenSession(model=target.model, span=server.span, max_length=64))
            leakers.append(conn)
        with pytest.raises(RemoteError) as err:
            await leakers[0].request(OpenSession(model=target.model, span=server.span, max_length=64))
        assert err.value.code == ErrorCode.BUSY
        client = await Swarm.connect(nursery, bootstrap=[procs[0].address], model=path, audit=0)
        started = time.monotonic()
        with trio.fail_after(60):
            while True:
                try:
                    tokens = (await client.generate(PROMPT, max_new_tokens=NEW_TOKENS)).token_ids
                    break
                except SwarmError:  # all slots leaked: BUSY until the server expires them (a bug still raises)
                    await trio.sleep(1.0)
        assert tokens == expected
        print(f"\nfree again after {time.monotonic() - started:.1f} s")
        nursery.cancel_scope.cancel()


async def test_a_starting_server_answers_loading_never_not_served(swarm):
    """Issue 12 item 4: a restarted server listened 6-28 s before its handlers existed and
    answered "OpenSession is not served by this peer". Now: LOADING until it can serve."""
    path, expected, procs, target, tmp = swarm
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = launch_server_process(path, (2, 4), identity=tmp / "late.key", bootstrap=[procs[0].address],
                                 extra=["--threads", "1", "--port", str(port)])
    codes = []
    try:
        async with trio.open_nursery() as nursery:
            host = Host(Identity.generate())
            await nursery.start(host.run)
            with trio.fail_after(120):
                while True:
                    try:
                        conn = await host.connect(f"127.0.0.1:{port}", timeout=1.0)
                        await conn.request(OpenSession(model=target.model, span=(2, 4), max_length=8))
                        codes.append("opened")
                        break
                    except PeerUnreachable:
                        await trio.sleep(0.05)  # not listening yet
                    except RemoteError as exc:
                        codes.append(ErrorCode(exc.code))
                        assert exc.code == ErrorCode.LOADING, exc
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"\nwhile starting: {codes.count(ErrorCode.LOADING)} LOADING answers, then {codes[-1]}")
    assert codes[-1] == "opened"
