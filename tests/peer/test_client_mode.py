"""DHT client mode (spec 10, "Routing table"): a ``Swarm`` client claims no listen
address, so no server admits it as a routing-table contact (it is never asked to
answer lookups or hold records) while it looks up and generates like any peer;
``dht_server=True`` makes it a contact like a server."""

from __future__ import annotations

import trio

from peer.api import Swarm
from peer_helpers import reference, save_tiny_llama, start_server

PROMPT = [1, 5, 9, 33, 7]


async def test_a_client_is_no_dht_contact_unless_it_asks_to_serve_the_dht(tmp_path):
    model = save_tiny_llama(tmp_path, layers=2, special_tokens=False)
    path = str(tmp_path)
    want = reference(model, PROMPT, 4)
    async with trio.open_nursery() as nursery:
        a = await start_server(nursery, path, (0, 2))
        b = await start_server(nursery, path, (0, 2), bootstrap=[a.address])
        client = await Swarm.connect(nursery, bootstrap=[a.address], model=path, audit=None)
        serving = await Swarm.connect(nursery, bootstrap=[a.address], model=path, audit=None, dht_server=True)
        for swarm in (client, serving):
            assert (await swarm.generate(PROMPT, max_new_tokens=4)).token_ids == want
        client_id, serving_id = client.client.host.peer_id, serving.client.host.peer_id

        with trio.fail_after(20):  # the DHT server is verified at its address and admitted
            while a.dht.routing.get(serving_id) is None or b.dht.routing.get(serving_id) is None:
                await trio.sleep(0.02)
        assert a.host.connections[client_id].listen_addrs == ()
        assert a.dht.routing.get(client_id) is None
        assert b.dht.routing.get(client_id) is None
        # The client itself keeps a table of the servers, and looks up through it.
        assert {a.host.peer_id, b.host.peer_id} <= {c.id for c in client.client.dht.routing.contacts()}
        await client.aclose()
        await serving.aclose()
        nursery.cancel_scope.cancel()
