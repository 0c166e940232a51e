"""The relay over real sockets on loopback: servers and clients in one trio process,
a tiny random-weight Llama saved as safetensors, compared with transformers."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer._chain import AllCandidatesFailed
from peer.api import Swarm
from peer.client import ModelNotServed, PromptTooLong
from peer.node import ServeOptions, run_server
from peer.runtime import InvalidArgument
from peer.server import SpanServer
from peer_helpers import reference, save_tiny_llama
from protocol import (
    CloseSession,
    Forward,
    Identity,
    OpenSession,
    SessionState,
    accept_result,
    encode_tensor,
    sign_forward,
)
from protocol.errors import ErrorCode, RemoteError
from swarm.dht import BootstrapFailed
from swarm.errors import NoRoute

NUM_LAYERS = 6
PROMPTS = [[1, 5, 9, 33, 7], [900, 2, 14], [42] * 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return str(path), save_tiny_llama(path, layers=NUM_LAYERS)


async def start(nursery, model, blocks, bootstrap=(), **kw):
    options = ServeOptions(model=model, blocks=blocks, bootstrap=tuple(bootstrap), **kw)
    return await nursery.start(functools.partial(run_server, Identity.generate(), options))


async def swarm_of(nursery, model, spans):
    nodes = [await start(nursery, model, spans[0])]
    for span in spans[1:]:
        nodes.append(await start(nursery, model, span, bootstrap=[nodes[0].address]))
    return nodes


async def test_greedy_relay_equals_transformers(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        nodes = await swarm_of(nursery, path, [(0, 2), (2, 3), (3, 6)])
        swarm = await Swarm.connect(nursery, bootstrap=[nodes[1].address], model=path)
        for prompt in PROMPTS:
            result = await swarm.generate(prompt, max_new_tokens=24)
            assert result.token_ids == reference(model, prompt, 24)
            assert [(h.start, h.end) for h in result.route] == [(0, 2), (2, 3), (3, 6)]
            assert result.failovers == 0
        streamed = [event.token_id async for event in swarm.stream(PROMPTS[0], max_new_tokens=10)]
        assert streamed == [t for t in reference(model, PROMPTS[0], 10) if t != 2]
        nursery.cancel_scope.cancel()


async def test_concurrent_clients_get_independent_outputs(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        nodes = await swarm_of(nursery, path, [(0, 3), (3, 6)])
        swarms = [await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=path) for _ in range(2)]
        results = {}

        async def run(i, swarm, prompt):
            results[i] = (await swarm.generate(prompt, max_new_tokens=16)).token_ids

        async with trio.open_nursery() as jobs:
            for i, prompt in enumerate(PROMPTS):
                jobs.start_soon(run, i, swarms[i % 2], prompt)
        for i, prompt in enumerate(PROMPTS):
            assert results[i] == reference(model, prompt, 16)
        nursery.cancel_scope.cancel()


async def test_failover_mid_generation_gives_identical_tokens(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        first = await start(nursery, path, (0, 3))
        second = await start(nursery, path, (0, 3), bootstrap=[first.address])
        await start(nursery, path, (3, 6), bootstrap=[first.address])
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=path)
        killed = []

        def crash_the_one_in_use(event):
            if event.index == 4:
                victim = first if first.server.open_sessions else second
                victim.cancel_scope.cancel()  # closes its listener and connections at once
                killed.append(victim)

        result = await swarm.generate(PROMPTS[0], max_new_tokens=20, on_token=crash_the_one_in_use)
        assert killed
        assert result.failovers >= 1
        assert result.token_ids == reference(model, PROMPTS[0], 20)
        assert killed[0].identity.peer_id.hex() not in [h.peer_id for h in result.route]
        nursery.cancel_scope.cancel()


class LyingServer(SpanServer):
    """Signs with a key that is not its identity's: clients must treat it as failed."""

    async def _forward(self, conn, msg):
        result = await super()._forward(conn, msg)
        return dataclasses.replace(result, signature=bytes(64))


async def test_a_span_served_only_by_a_liar_fails_with_a_typed_error(tiny, monkeypatch):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        monkeypatch.setattr("peer.node.SpanServer", LyingServer)
        liar = await start(nursery, path, (0, 3))
        monkeypatch.undo()
        await start(nursery, path, (3, 6), bootstrap=[liar.address])
        swarm = await Swarm.connect(nursery, bootstrap=[liar.address], model=path)
        with pytest.raises(AllCandidatesFailed, match="blocks 0..2"):
            await swarm.generate(PROMPTS[1], max_new_tokens=8)
        nursery.cancel_scope.cancel()


async def test_bad_signature_falls_back_to_honest_server(tiny, monkeypatch):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        monkeypatch.setattr("peer.node.SpanServer", LyingServer)
        liar = await start(nursery, path, (0, 3))
        monkeypatch.undo()
        honest = await start(nursery, path, (0, 3), bootstrap=[liar.address], max_sessions=1)
        await start(nursery, path, (3, 6), bootstrap=[liar.address])
        swarm = await Swarm.connect(nursery, bootstrap=[liar.address], model=path)
        result = await swarm.generate(PROMPTS[1], max_new_tokens=8)
        assert result.token_ids == reference(model, PROMPTS[1], 8)
        assert liar.identity.peer_id.hex() not in [h.peer_id for h in result.route]
        assert honest.identity.peer_id.hex() in [h.peer_id for h in result.route]
        nursery.cancel_scope.cancel()


async def test_typed_errors(tiny):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path, (0, 3))
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=path)
        with pytest.raises(NoRoute, match="blocks 3..5"):
            await swarm.generate(PROMPTS[0], max_new_tokens=4)
        with pytest.raises(PromptTooLong):
            await swarm.generate([1] * 120, max_new_tokens=20)
        for bad in [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop="x")]:
            with pytest.raises(InvalidArgument):
                await swarm.generate(PROMPTS[0], **bad)
        with pytest.raises(InvalidArgument):
            await swarm.generate([5000], max_new_tokens=2)
        with pytest.raises(BootstrapFailed):
            await Swarm.connect(nursery, bootstrap=["127.0.0.1:1"], model=path)
        nursery.cancel_scope.cancel()


async def test_model_not_served(tiny, tmp_path):
    path, _ = tiny
    other = tmp_path / "other"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(other)
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path, (0, 6))
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=str(other))
        with pytest.raises(ModelNotServed):
            await swarm.generate([1, 2], max_new_tokens=2)
        nursery.cancel_scope.cancel()


async def test_server_rejects_bad_requests(tiny):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path, (0, 3))
        model_id = node.server.model
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=path)
        host = swarm.client.host
        conn = await host.connect(node.address, peer_id=node.identity.peer_id)

        async def code_of(msg):
            with pytest.raises(RemoteError) as info:
                await conn.request(msg)
            return info.value.code

        assert await code_of(OpenSession(model="other@0", span=(0, 3), max_length=8)) == ErrorCode.MODEL_MISMATCH
        assert await code_of(OpenSession(model=model_id, span=(2, 5), max_length=8)) == ErrorCode.SPAN_NOT_SERVED
        opened = await conn.request(OpenSession(model=model_id, span=(0, 3), max_length=8))
        hidden = encode_tensor(torch.zeros(1, 2, 64))
        forged = Forward(session=opened.session, step=0, position=0, hidden=hidden, signature=bytes(64))
        assert await code_of(forged) == ErrorCode.BAD_SIGNATURE
        assert await code_of(dataclasses.replace(forged, step=3)) == ErrorCode.BAD_STATE
        assert await code_of(dataclasses.replace(forged, hidden=encode_tensor(torch.zeros(1, 9, 64)))) \
            == ErrorCode.MAX_LENGTH_EXCEEDED
        assert await code_of(dataclasses.replace(forged, hidden=encode_tensor(torch.zeros(1, 2, 32)))) \
            == ErrorCode.INVALID_REQUEST
        assert await code_of(CloseSession(session=bytes(16))) == ErrorCode.UNKNOWN_SESSION
        # sessions belong to the connection that opened them
        other = Identity.generate()
        from swarm.transport import Host

        intruder = Host(other)
        await nursery.start(intruder.run)
        with pytest.raises(RemoteError) as info:
            await intruder.request(node.address, CloseSession(session=opened.session))
        assert info.value.code == ErrorCode.UNKNOWN_SESSION
        await conn.request(CloseSession(session=opened.session))
        nursery.cancel_scope.cancel()


async def test_a_session_computes_one_step_at_a_time(tiny):
    path, _ = tiny
    async with trio.open_nursery() as nursery:
        node = await start(nursery, path, (0, 3))
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=path)
        host = swarm.client.host
        conn = await host.connect(node.address, peer_id=node.identity.peer_id)
        opened = await conn.request(OpenSession(model=node.server.model, span=(0, 3), max_length=8))
        state = SessionState(client=host.peer_id, server=node.identity.peer_id, session=opened.session,
                             model=node.server.model, span=(0, 3), max_length=8)
        state.open()
        request = sign_forward(host.identity, state, encode_tensor(torch.randn(1, 2, 64)))
        answers = []

        async def first():
            answers.append(await conn.request(request))

        async with trio.open_nursery() as steps:
            # the one compute slot is taken by a small step (a big piece would open the
            # small-step slot next to it, and this step would not wait)
            async with node.compute.slot(b"another requester", small=True):
                steps.start_soon(first)
                with trio.fail_after(10):
                    while node.compute.waiting == 0:  # the step waits for the slot
                        await trio.sleep(0.01)
                with pytest.raises(RemoteError) as info:  # the same step again, while the first waits
                    await conn.request(request)
                assert info.value.code == ErrorCode.BAD_STATE
                assert "still being computed" in info.value.message
        accept_result(state, request, answers[0], server_public_key=conn.public_key)  # the first one is fine
        nursery.cancel_scope.cancel()


async def test_graceful_shutdown_withdraws_the_announcement(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        first = await start(nursery, path, (0, 3))
        leaving = await start(nursery, path, (0, 3), bootstrap=[first.address])
        await start(nursery, path, (3, 6), bootstrap=[first.address])
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=path)
        assert leaving.identity.peer_id in (await swarm.status()).servers
        await leaving.shutdown()
        view = await swarm.status()
        assert leaving.identity.peer_id not in view.servers
        assert len(view.servers) == 2
        result = await swarm.generate(PROMPTS[0], max_new_tokens=6)
        assert result.token_ids == reference(model, PROMPTS[0], 6)
        assert leaving.identity.peer_id.hex() not in [h.peer_id for h in result.route]
        nursery.cancel_scope.cancel()


async def test_a_server_that_chose_its_span_moves_to_where_the_swarm_is_weak(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        a = await start(nursery, path, (0, 3))
        b = await start(nursery, path, (0, 3), bootstrap=[a.address])
        # Without --blocks a server joins where the swarm is weakest: here 3..5, served by nobody.
        mover = await start(nursery, path, None, bootstrap=[a.address], num_blocks=3, rebalance_interval=0.2)
        assert mover.span == (3, 6)
        c = await start(nursery, path, (3, 6), bootstrap=[a.address])
        # Both servers of 0..2 leave: the mover moves there (3..5 stays served by c).
        await a.shutdown()
        await b.shutdown()
        with trio.fail_after(30):
            while mover.span != (0, 3):
                await trio.sleep(0.1)
        swarm = await Swarm.connect(nursery, bootstrap=[c.address], model=path)
        with trio.fail_after(30):  # one view per look: the mover's record there, with its new span
            while getattr((await swarm.status()).servers.get(mover.identity.peer_id), "span", None) != (0, 3):
                await trio.sleep(0.2)
        result = await swarm.generate(PROMPTS[0], max_new_tokens=8)
        assert result.token_ids == reference(model, PROMPTS[0], 8)
        assert [(h.start, h.end) for h in result.route] == [(0, 3), (3, 6)]
        nursery.cancel_scope.cancel()


def test_cli_reports_bad_arguments_in_one_line_before_connecting(capsys):
    from peer.cli import main

    assert main(["generate", "--bootstrap", "127.0.0.1:1", "--temperature", "-1", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("swarm-peer: error: temperature must be")
    assert "\n" not in err
    assert main(["serve", "--blocks", "5:2"]) == 1
    assert capsys.readouterr().err.strip() == "swarm-peer: error: --blocks 5:2: need 0 <= START < END"
