"""Session rollback on a real server on loopback (spec 11.1, issue 16 section 2): a
FORWARD below the session's length cuts its KV cache there, and what follows equals a
fresh session fed the kept prefix; the result is signed over a history that records
the cut. A position past the length is refused with BAD_STATE and the session goes on."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

from peer.node import ServeOptions, run_server
from protocol import (
    Identity,
    OpenSession,
    SessionState,
    accept_result,
    decode_tensor,
    encode_tensor,
    sign_forward,
)
from protocol.errors import ErrorCode, RemoteError
from swarm.transport import Host
from verify import TOLERANCES, compare

H = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-rollback")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=H, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return str(path)


async def _session(host: Host, conn, node, max_length: int) -> SessionState:
    opened = await conn.request(OpenSession(model=node.server.model, span=(0, 3), max_length=max_length))
    state = SessionState(client=host.peer_id, server=node.identity.peer_id, session=opened.session,
                         model=node.server.model, span=(0, 3), max_length=max_length)
    state.open()
    return state


async def _step(host: Host, conn, state: SessionState, x: torch.Tensor, position: int | None = None) -> torch.Tensor:
    request = sign_forward(host.identity, state, encode_tensor(x), position=position)
    result = await conn.request(request, timeout=30)
    accept_result(state, request, result, server_public_key=conn.public_key)  # the signature covers the cut
    return decode_tensor(result.hidden)


async def test_rollback_equals_a_fresh_session_and_a_bad_position_is_refused(tiny):
    gen = torch.Generator().manual_seed(1)
    prompt, draft, fix = (torch.randn(1, n, H, generator=gen) for n in (5, 4, 2))
    async with trio.open_nursery() as nursery:
        options = ServeOptions(model=tiny, blocks=(0, 3))
        node = await nursery.start(functools.partial(run_server, Identity.generate(), options))
        host = Host(Identity.generate())
        await nursery.start(host.run)
        conn = await host.connect(node.address, peer_id=node.identity.peer_id)
        state = await _session(host, conn, node, 16)
        await _step(host, conn, state, prompt)
        await _step(host, conn, state, draft)  # 9 tokens: 2 drafted tokens kept, 2 rolled back
        got = await _step(host, conn, state, fix, position=7)
        assert (state.length, state.next_step) == (9, 3)
        assert [k for _, k in state.kept()] == [5, 2, 2]

        fresh = await _session(host, conn, node, 16)
        expected = (await _step(host, conn, fresh, torch.cat([prompt, draft[:, :2], fix], dim=1)))[:, 7:]
        verdict = compare(got, expected, tolerance=TOLERANCES["f32"], depth=3)
        assert verdict.ok, verdict

        # past the length: a typed error, and the session is where it was
        ahead = sign_forward(host.identity, state, encode_tensor(fix))
        ahead = dataclasses.replace(ahead, position=10, signature=host.identity.sign(b"-"))
        with pytest.raises(RemoteError) as info:
            await conn.request(ahead, timeout=30)
        assert info.value.code == ErrorCode.BAD_STATE
        assert "past the session's length 9" in info.value.message
        y = torch.randn(1, 1, H, generator=gen)
        after, again = await _step(host, conn, state, y), await _step(host, conn, fresh, y)
        assert compare(after, again, tolerance=TOLERANCES["f32"], depth=3).ok
        nursery.cancel_scope.cancel()
