"""Server-to-server push (spec section 11.3) over real sockets on loopback: in-process
servers and clients, a tiny random Llama, compared with star relay and transformers."""

from __future__ import annotations

import dataclasses

import pytest
import trio


from peer.api import Swarm
from peer_helpers import reference, save_tiny_llama, start_server
from protocol import decode_tensor, encode_tensor, push_onward

NUM_LAYERS = 6
PROMPTS = [[1, 5, 9, 33, 7], [900, 2, 14]]
SPANS = [(0, 2), (2, 3), (3, 6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-push")
    return str(path), save_tiny_llama(path, layers=NUM_LAYERS)


async def swarm_of(nursery, model, spans):
    nodes = [await start_server(nursery, model, spans[0])]
    for span in spans[1:]:
        nodes.append(await start_server(nursery, model, span, bootstrap=[nodes[0].address]))
    return nodes


async def test_push_generation_equals_star_and_transformers(tiny):
    path, model = tiny
    async with trio.open_nursery() as nursery:
        nodes = await swarm_of(nursery, path, SPANS)
        push = await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=path, relay="push", audit=0)
        star = await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=path, relay="star", audit=0)
        for prompt in PROMPTS:
            pushed = await push.generate(prompt, max_new_tokens=16)
            starred = await star.generate(prompt, max_new_tokens=16)
            assert pushed.token_ids == starred.token_ids == reference(model, prompt, 16)
            assert [(h.start, h.end) for h in pushed.route] == SPANS
            assert pushed.failovers == 0
            assert pushed.pushed_steps == 16
            assert starred.pushed_steps == 0
        nursery.cancel_scope.cancel()


async def test_a_hop_failing_mid_push_is_reported_and_replaced_with_identical_tokens(tiny, caplog):
    path, model = tiny
    caplog.set_level("INFO", logger="swarm.client")
    async with trio.open_nursery() as nursery:
        head = await start_server(nursery, path, (0, 2))
        middle = [await start_server(nursery, path, (2, 4), bootstrap=[head.address]) for _ in range(2)]
        await start_server(nursery, path, (4, 6), bootstrap=[head.address])
        swarm = await Swarm.connect(nursery, bootstrap=[head.address], model=path, relay="push", audit=0)
        killed = []

        def crash_the_middle_hop_in_use(event):
            if event.index == 4:
                victim = middle[0] if middle[0].server.open_sessions else middle[1]
                victim.cancel_scope.cancel()  # its listener and connections close at once
                killed.append(victim)

        result = await swarm.generate(PROMPTS[0], max_new_tokens=16, on_token=crash_the_middle_hop_in_use)
        assert result.token_ids == reference(model, PROMPTS[0], 16)
        victim_id = killed[0].identity.peer_id.hex()
        assert result.failovers >= 1
        assert victim_id not in [h.peer_id for h in result.route]
        # the first hop saw it and said so, signed; the next steps were pushed again
        reports = [r.getMessage() for r in caplog.records if "reports" in r.getMessage()]
        assert any(head.identity.peer_id.hex()[:12] in m and victim_id[:12] in m for m in reports)
        assert 16 - 5 - 1 <= result.pushed_steps < 16
        nursery.cancel_scope.cancel()


def _tampering_onward(tamperers):
    """``push_onward`` for servers that hand on other bytes than they signed: the last
    output of what a server in ``tamperers`` sends on is shifted by 0.5."""
    real = push_onward

    def onward(request, output):
        message = real(request, output)
        if request.route[request.index].peer_id in tamperers:
            last = message.outputs[-1]
            shifted = encode_tensor(decode_tensor(last.hidden) + 0.5, last.hidden.dtype)
            message = dataclasses.replace(message, outputs=message.outputs[:-1] + (
                dataclasses.replace(last, hidden=shifted),))
        return message

    return onward


@pytest.mark.parametrize("where", ["first", "last"])
async def test_a_hop_that_pushes_other_bytes_than_it_signed_is_refused(tiny, monkeypatch, caplog, where):
    """The first hop tampers: the next hop refuses its input (BAD_SIGNATURE) and tells
    the client; the last hop tampers: the client refuses its output. Either way the
    tamperer is replaced and the tokens are those of transformers."""
    path, model = tiny
    caplog.set_level("INFO", logger="swarm.client")
    tamperers: set[bytes] = set()
    monkeypatch.setattr("peer.server.push_onward", _tampering_onward(tamperers))
    async with trio.open_nursery() as nursery:
        first = [await start_server(nursery, path, (0, 3))]
        first.append(await start_server(nursery, path, (0, 3), bootstrap=[first[0].address]))
        last = [await start_server(nursery, path, (3, 6), bootstrap=[first[0].address]) for _ in range(2)]
        swarm = await Swarm.connect(nursery, bootstrap=[first[0].address], model=path, relay="push", audit=0)
        group = first if where == "first" else last
        chosen = []

        def start_tampering(event):
            if event.index == 3:
                chosen.append(group[0] if group[0].server.open_sessions else group[1])
                tamperers.add(chosen[0].identity.peer_id)

        result = await swarm.generate(PROMPTS[0], max_new_tokens=12, on_token=start_tampering)
        assert result.token_ids == reference(model, PROMPTS[0], 12)
        tamperer = chosen[0].identity.peer_id.hex()
        assert result.failovers >= 1
        assert tamperer not in [h.peer_id for h in result.route]
        messages = [r.getMessage() for r in caplog.records]
        if where == "first":  # the next hop's signed report names the tamperer and the typed error
            assert any("reports" in m and tamperer[:12] in m and "signature" in m.lower() for m in messages)
        else:
            assert any("BadSignature" in m or "signature" in m.lower() for m in messages if "push step" in m)
        nursery.cancel_scope.cancel()
