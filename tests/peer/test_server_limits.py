"""What one requester may take of a server (issue 10 item 4, issue 12 items 2 and 4):
sessions per identity and per address group, unused sessions expiring, FORWARD_ONCE
tokens per request and per requester, what one address group's identities hold
together (session slots, cache bytes, FORWARD_ONCE tokens, one turn of the
scheduler), the FORWARD size cap per connection, LOADING
before the span is served, and a restarted identity replacing its old record. Servers
are in this process (``run_server`` on loopback, a tiny random Llama); the attacks on
real ``swarm-peer serve`` processes are tests/peer/test_abuse_processes.py."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer.api import Swarm
from peer.node import ServeOptions, run_server
from peer.node import _replace_old_records as replace_old_records
from peer.server import answer_loading
from protocol import (
    Announcement,
    Identity,
    OpenSession,
    WireTensor,
    sign_forward_once,
)
from protocol.errors import ErrorCode, RemoteError
from swarm.announce import announcement_records, fetch_swarm_view, next_seq
from swarm.dht import DhtNode
from swarm.errors import PeerUnreachable
from swarm.transport import Host
from verify import record_kinds

NUM_LAYERS = 4
PROMPT = [1, 5, 9, 33, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=2, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    return str(path), out[0, len(PROMPT):].tolist()


async def start(nursery, model, blocks=(0, NUM_LAYERS), bootstrap=(), identity=None, **kw):
    options = ServeOptions(model=model, blocks=blocks, bootstrap=tuple(bootstrap), threads=1, **kw)
    return await nursery.start(functools.partial(run_server, identity or Identity.generate(), options))


async def client(nursery, source="127.0.0.1"):
    host = Host(Identity.generate(), host=source, source_host=source)
    await nursery.start(host.run)
    return host


async def code_of(conn, request) -> ErrorCode:
    with pytest.raises(RemoteError) as err:
        await conn.request(request)
    return err.value.code


async def test_one_identity_cannot_take_every_session_slot(tiny):
    path, expected = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path, max_sessions=8, max_sessions_per_peer=2)
        greedy = await (await client(nursery)).connect(node.address)
        opened = [await greedy.request(OpenSession(model=node.server.model, span=(0, 4), max_length=8))
                  for _ in range(2)]
        assert len({o.session for o in opened}) == 2
        assert await code_of(greedy, OpenSession(model=node.server.model, span=(0, 4), max_length=8)) \
            == ErrorCode.BUSY
        # a group of Sybils on one subnet gets a quarter of the slots at most
        sybils = [await (await client(nursery, f"127.0.1.{i + 1}")).connect(node.address) for i in range(3)]
        codes = []
        for conn in sybils:
            for _ in range(2):
                try:
                    await conn.request(OpenSession(model=node.server.model, span=(0, 4), max_length=8))
                    codes.append(None)
                except RemoteError as exc:
                    codes.append(exc.code)
        assert codes.count(None) == 2
        assert codes.count(ErrorCode.BUSY) == 4  # max_sessions // 4 per group
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=path, audit=0)
        assert (await swarm.generate(PROMPT, max_new_tokens=8)).token_ids == expected
        nursery.cancel_scope.cancel()


async def test_a_session_that_never_gets_a_step_expires(tiny):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path)
        now = [0.0]
        node.server._clock = lambda: now[0]  # the server's clock, for its sweep  # noqa: SLF001
        host = await client(nursery)
        conn = await host.connect(node.address)
        await conn.request(OpenSession(model=node.server.model, span=(0, 4), max_length=8))
        served = node.host.connections[host.peer_id]
        assert node.server.open_sessions == 1
        assert served.protected  # never trimmed while it has sessions
        now[0] = node.server.limits.unused_session_timeout - 1
        assert node.server.sweep() == []
        assert node.server.open_sessions == 1
        now[0] = node.server.limits.unused_session_timeout + 1
        assert len(node.server.sweep()) == 1
        assert node.server.open_sessions == 0
        assert not served.protected
        nursery.cancel_scope.cancel()


def once_request(identity, node, n_tokens):
    hidden = WireTensor(dtype="f32", shape=(1, n_tokens, 64), data=bytes(4 * 64 * n_tokens))
    request, _ = sign_forward_once(identity, server=node.identity.peer_id, nonce=bytes(16),
                                   model=node.server.model, span=(0, 4), hidden=hidden)
    return request


async def test_forward_once_tokens_are_capped_per_request_and_per_requester(tiny):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path)
        host = await client(nursery)
        conn = await host.connect(node.address)
        assert node.server.max_once_tokens == 128  # the model's context
        # one token over: refused before any compute, the connection stays (the size cap allows it)
        too_long = once_request(host.identity, node, 129)
        assert await code_of(conn, too_long) == ErrorCode.MAX_LENGTH_EXCEEDED
        # the per-requester budget: while 100 tokens are queued, 100 more are BUSY
        node.server.limits = type(node.server.limits)(max_once_tokens_per_peer=150)
        release = trio.Event()
        real_run = node.compute.run

        async def held_run(requester, fn, *, work=1, group=None, small=False):
            await release.wait()
            return await real_run(requester, fn, work=work, group=group, small=small)

        node.compute.run = held_run
        async with trio.open_nursery() as inner:
            inner.start_soon(conn.request, once_request(host.identity, node, 100))
            with trio.fail_after(10):
                while not node.server._once_tokens:  # noqa: SLF001 - until the first one is queued
                    await trio.sleep(0.01)
            assert await code_of(conn, once_request(host.identity, node, 100)) == ErrorCode.BUSY
            release.set()
        assert not node.server._once_tokens  # noqa: SLF001
        nursery.cancel_scope.cancel()


async def test_a_subnet_of_sybils_holds_at_most_its_share_of_the_cache(tiny):
    # issue 10 item 4, cache-fill: identities of one /24 each opening sessions of the
    # whole context up to their own cap. Together they get a quarter of the cache
    # budget; a client of another /24 still opens its sessions and gets its tokens.
    path, expected = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path, max_sessions=32)
        executor = node.server.executor
        per_session = executor.transient_bytes(128)  # what a whole-context session reserves
        executor.cache_bytes = 8 * per_session  # the budget (--cache-bytes) of 8 such sessions
        assert node.server.limits.max_sessions_per_group == 8  # the slots alone would allow 8
        share = executor.cache_bytes // 4
        sybils = [await (await client(nursery, f"127.0.1.{i + 1}")).connect(node.address) for i in range(4)]
        codes = []
        for conn in sybils:
            for max_length in (128, 128, 8):
                try:
                    await conn.request(OpenSession(model=node.server.model, span=(0, 4), max_length=max_length))
                    codes.append(None)
                except RemoteError as exc:
                    codes.append(exc.code)
        assert codes.count(None) == 2
        assert codes.count(ErrorCode.BUSY) == 10
        held = sum(s.reserved for s in node.server._sessions.values())  # noqa: SLF001
        assert held == 2 * per_session <= share
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=path, audit=0,
                                    listen_host="127.0.2.1", source_host="127.0.2.1")
        assert (await swarm.generate(PROMPT, max_new_tokens=8)).token_ids == expected
        nursery.cancel_scope.cancel()


async def test_a_subnet_shares_one_forward_once_budget_and_one_scheduler_turn(tiny):
    # issue 10 item 4, once-flood: FORWARD_ONCE tokens queued are capped per address
    # group too, and every piece goes to the scheduler with its requester's group (the
    # policy's fairness unit: tests/peer/test_scheduler_groups.py), an identity of one of
    # the server's own groups as its own.
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path)
        node.server.limits = type(node.server.limits)(max_once_tokens_per_group=150)
        release = trio.Event()
        real_run = node.compute.run
        groups: dict[bytes, object] = {}

        async def held_run(requester, fn, *, work=1, group=None, small=False):
            groups[requester] = group
            await release.wait()
            return await real_run(requester, fn, work=work, group=group, small=small)

        node.compute.run = held_run
        sybil_hosts = [await client(nursery, f"127.0.1.{i + 1}") for i in range(2)]
        sybils = [await h.connect(node.address) for h in sybil_hosts]
        honest_host = await client(nursery, "127.0.2.1")
        honest = await honest_host.connect(node.address)
        local_host = await client(nursery)
        local = await local_host.connect(node.address)
        async with trio.open_nursery() as inner:
            inner.start_soon(sybils[0].request, once_request(sybil_hosts[0].identity, node, 100))
            with trio.fail_after(10):
                while sybil_hosts[0].peer_id not in groups:
                    await trio.sleep(0.01)
            # the second identity of the /24 would pass the group's 150 tokens
            assert await code_of(sybils[1], once_request(sybil_hosts[1].identity, node, 100)) == ErrorCode.BUSY
            inner.start_soon(honest.request, once_request(honest_host.identity, node, 100))
            inner.start_soon(local.request, once_request(local_host.identity, node, 100))
            with trio.fail_after(10):
                while len(groups) < 3:
                    await trio.sleep(0.01)
            release.set()
        assert groups[sybil_hosts[0].peer_id] == "v4:127.0.1.0/24"
        assert groups[honest_host.peer_id] == "v4:127.0.2.0/24"
        assert groups[local_host.peer_id] == local_host.peer_id  # the server's own /24
        assert not node.server._group_once_tokens  # noqa: SLF001
        nursery.cancel_scope.cancel()


async def test_a_long_step_is_computed_in_chunks_and_the_tokens_stay(tiny):
    # a session step longer than chunk_tokens (the prompt's prefill) goes to the
    # scheduler in chunks of that many tokens, each cut by blocks to the quantum
    path, expected = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path)
        node.server.limits = type(node.server.limits)(chunk_tokens=2, quantum=4)
        jobs = []
        real_job = node.server.executor.forward_job

        def spy(*args, **kw):
            jobs.append(real_job(*args, **kw))
            return jobs[-1]

        node.server.executor.forward_job = spy
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=path, audit=0)
        assert (await swarm.generate(PROMPT, max_new_tokens=8)).token_ids == expected
        (prefill,) = [job for job in jobs if job.tokens == len(PROMPT)]
        # 2 + 2 + 1 tokens; 2 blocks a piece for the 2-token chunks, all 4 for the last
        assert [work for work, _ in prefill.pieces] == [4, 4, 4, 4, 4]
        nursery.cancel_scope.cancel()


async def test_a_forward_over_the_connections_cap_is_refused_from_its_head(tiny):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path)
        host = await client(nursery)
        conn = await host.connect(node.address)
        # no session opened on this connection: a FORWARD_ONCE larger than the context
        # of the model is refused by its size alone, and the connection dropped
        huge = once_request(host.identity, node, 2000)
        with pytest.raises(PeerUnreachable):
            await conn.request(huge)
        assert not conn.is_open
        nursery.cancel_scope.cancel()


async def test_a_loading_server_answers_loading(tiny):
    async with trio.open_nursery() as nursery:
        host = Host(Identity.generate())
        answer_loading(host, retry_after=lambda: 7.0)
        await nursery.start(host.run)
        conn = await (await client(nursery)).connect(host.listen_addrs[0])
        with pytest.raises(RemoteError) as err:
            await conn.request(OpenSession(model="m@0", span=(0, 1), max_length=8))
        assert err.value.code == ErrorCode.LOADING
        assert err.value.retry_after == 7.0
        nursery.cancel_scope.cancel()


async def test_a_restarted_identity_replaces_its_old_record_at_once(tiny):
    # An earlier process of this identity died without withdrawing: its records point
    # at an address where nothing listens. The new process replaces them as soon as it
    # joins the DHT, long before its own announcement (after loading) would.
    path, _ = tiny
    identity = Identity.generate()
    async with trio.open_nursery() as nursery:
        boot = await start(nursery, path, blocks=(0, 2))
        model = boot.server.model
        old_host = await client(nursery)
        old = DhtNode(old_host, kinds=record_kinds())
        await nursery.start(functools.partial(old.run, bootstrap=[boot.address]))
        dead = Announcement(peer_id=identity.peer_id, addrs=("127.0.0.1:9",), model=model, span=(2, 4),
                            throughput=100.0, free_sessions=16, expires=int(time.time() + 200))
        for record in announcement_records(identity, dead, seq=next_seq(None, time.time())):
            assert await old.store(record) >= 1
        view = await fetch_swarm_view(boot.dht, model, NUM_LAYERS)
        assert identity.peer_id in view.servers
        new_host = await client(nursery)
        new = DhtNode(new_host, kinds=record_kinds())
        await nursery.start(functools.partial(new.run, bootstrap=[boot.address]))
        await replace_old_records(new, identity, model, NUM_LAYERS)
        view = await fetch_swarm_view(boot.dht, model, NUM_LAYERS)
        assert identity.peer_id not in view.servers
        nursery.cancel_scope.cancel()
