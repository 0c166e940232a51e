"""What a third party needs to learn from the swarm itself (issue 13 part 1, items 1, 3,
6 and 12; issue 15 section 3 item 10), against real servers on loopback serving two
different tiny models: MODEL_QUERY, the DHT's model index, L and H in announcements,
``swarm-peer status`` and ``GET /v1/models``; a quantized session's negotiated block
size; the error codes section 11.1 lists; and what a minimal client answers when a
server asks it for credit records."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch
import trio

from peer.catalog import served_models
from protocol import (
    CreditQuery,
    CreditReport,
    ErrorCode,
    Identity,
    ModelQuery,
    ModelReport,
    OpenSession,
    Ping,
    Pong,
    RemoteError,
    SessionState,
    VERSION_TEXT,
    accept_forward_once_result,
    accept_result,
    encode_tensor,
    sign_forward,
    sign_forward_once,
)
from swarm.announce import RECORD_KINDS, fetch_swarm_view
from swarm.dht import DhtNode
from swarm.transport import Host

from peer_helpers import start_server

ROOT = Path(__file__).resolve().parents[2]


async def _client(nursery, bootstrap: str) -> tuple[Host, DhtNode]:
    host = Host(Identity.generate())
    await nursery.start(host.run)
    dht = DhtNode(host, kinds=RECORD_KINDS)
    await nursery.start(functools.partial(dht.run, bootstrap=(bootstrap,)))
    return host, dht


async def test_the_swarm_lists_both_models_everywhere(chat_model, other_model, tmp_path):
    from peer.api import Swarm
    from peer.http import ApiModel, SwarmApi, serve_http

    async with trio.open_nursery() as nursery:
        chat = await start_server(nursery, chat_model, (0, 4), threads=1)
        other = await start_server(nursery, other_model, (0, 2), bootstrap=[chat.address], threads=1)
        host, dht = await _client(nursery, chat.address)

        # MODEL_QUERY: every server says what it serves, with L, H and the rest
        reports = {}
        for node in (chat, other):
            report = await host.request(node.address, ModelQuery(), peer_id=node.identity.peer_id)
            assert isinstance(report, ModelReport) and report.versions == (VERSION_TEXT,)
            (reports[node.server.model],) = report.models
        described = reports[chat.server.model]
        assert (described.num_blocks, described.hidden_size, described.span) == (4, 64, (0, 4))
        assert described.max_length == 512 and described.compute_dtype == "f32"
        assert described.source == ""  # a local path is not a public source
        assert "q8" in described.wire_dtypes
        assert (reports[other.server.model].num_blocks, reports[other.server.model].hidden_size) == (2, 32)

        # announcements carry L and H
        view = await fetch_swarm_view(dht, other.server.model, 2)
        (announcement,) = view.announcements
        assert (announcement.num_blocks, announcement.hidden_size) == (2, 32)

        # the model index: a client that knows no model id lists both
        listed = {m.model_id: m for m in await served_models([], dht)}
        assert set(listed) == {chat.server.model, other.server.model}
        assert (listed[other.server.model].num_blocks, listed[other.server.model].hidden_size) == (2, 32)
        assert all(m.origin == "swarm" and m.servers == 1 for m in listed.values())

        # swarm-peer status (a real process) lists them, text and JSON
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "SWARM_PEER_CACHE": str(tmp_path / "cache")}
        status = await trio.run_process([sys.executable, "-m", "peer.cli", "status", "--bootstrap", chat.address,
                                         "--model", chat_model, "--json"], env=env, cwd=ROOT, capture_stdout=True,
                                        capture_stderr=True, check=False)
        assert status.returncode == 0, status.stderr.decode()
        models = {m["model_id"]: m for m in json.loads(status.stdout)["models"]}
        assert set(models) == {chat.server.model, other.server.model}
        assert models[chat.server.model] | {"name": None} == {
            "name": None, "model_id": chat.server.model, "num_blocks": 4, "hidden_size": 64, "source": "",
            "servers": 1, "origin": "configured"}
        assert models[other.server.model]["origin"] == "swarm" and models[other.server.model]["hidden_size"] == 32
        text = await trio.run_process([sys.executable, "-m", "peer.cli", "status", "--bootstrap", chat.address,
                                       "--model", chat_model], env=env, cwd=ROOT, capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert "models the swarm serves (2):" in text.stdout.decode()
        assert other.server.model in text.stdout.decode()

        # GET /v1/models lists every model the swarm serves
        swarm = await Swarm.connect(nursery, bootstrap=[chat.address], model=chat_model, audit=0.0)
        url = await nursery.start(functools.partial(serve_http, SwarmApi([ApiModel("tiny-chat", swarm)]).app, port=0))

        def fetch():
            with urllib.request.urlopen(url + "v1/models", timeout=60) as response:
                return json.loads(response.read())

        body = await trio.to_thread.run_sync(fetch)
        entries = {e["swarm"]["model_id"]: e for e in body["data"]}
        assert set(entries) == {chat.server.model, other.server.model}
        assert entries[chat.server.model]["id"] == "tiny-chat"
        assert entries[other.server.model]["swarm"] | {"servers": 1} == {
            "model_id": other.server.model, "num_blocks": 2, "hidden_size": 32, "servers": 1, "origin": "swarm"}
        nursery.cancel_scope.cancel()


async def test_sessions_errors_and_a_minimal_client_against_real_servers(chat_model):
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, chat_model, (0, 4), threads=1)
        second = await start_server(nursery, chat_model, (0, 4), bootstrap=[first.address], threads=1)
        model = first.server.model
        # A minimal client: a bare transport that answers CREDIT_QUERY with no records.
        me = Identity.generate()
        host = Host(me)
        asked = trio.Event()

        async def no_records(conn, msg):
            asked.set()
            return CreditReport(records=())

        host.add_handler(CreditQuery, no_records)
        await nursery.start(host.run)
        conn = await host.connect(first.address, peer_id=first.identity.peer_id)

        async def refused(request, code):
            try:
                await conn.request(request)
            except RemoteError as exc:
                assert exc.code == code, exc
                return
            raise AssertionError(f"{request} was accepted")

        # item 6: OPEN_SESSION errors
        await refused(OpenSession(model=model, span=(0, 4), max_length=100_000), ErrorCode.MAX_LENGTH_EXCEEDED)
        await refused(OpenSession(model=model, span=(0, 4), max_length=0), ErrorCode.INVALID_REQUEST)
        await refused(OpenSession(model=model, span=(0, 4), max_length=8, wire_dtype="f32", blocksize=64),
                      ErrorCode.INVALID_REQUEST)
        await refused(OpenSession(model=model, span=(0, 4), max_length=8, wire_dtype="q8", blocksize=100),
                      ErrorCode.INVALID_REQUEST)

        # item 3: a q8 session with block size 64 answers in block size 64
        opened = await conn.request(OpenSession(model=model, span=(0, 4), max_length=8, wire_dtype="q8",
                                                blocksize=64))
        state = SessionState(client=me.peer_id, server=first.identity.peer_id, session=opened.session, model=model,
                             span=(0, 4), max_length=8, wire_dtype="q8", blocksize=64)
        state.open()
        torch.manual_seed(0)
        x = torch.randn(1, 3, 64)
        # item 6: FORWARD errors, none of which ends the connection or moves the session
        for bad in (encode_tensor(x, "q8", blocksize=128), encode_tensor(x, "f32"),
                    encode_tensor(torch.randn(1, 3, 32), "q8", blocksize=64),
                    encode_tensor(torch.randn(1, 0, 64), "q8", blocksize=64)):
            await refused(sign_forward(me, state, bad), ErrorCode.INVALID_REQUEST)
        request = sign_forward(me, state, encode_tensor(x, "q8", blocksize=64))
        result = await conn.request(request)
        assert result.hidden.dtype == "q8" and result.hidden.blocksize == 64
        accept_result(state, request, result, server_public_key=first.identity.public_key)

        # FORWARD_ONCE answers in its input's dtype and block size, and two honest
        # servers sign the same digest for the same activation
        digests = set()
        for node in (first, second):
            once, once_state = sign_forward_once(me, server=node.identity.peer_id, nonce=bytes(16), model=model,
                                                 span=(0, 4), hidden=encode_tensor(x, "nf4", blocksize=128))
            answer = await host.request(node.address, once, peer_id=node.identity.peer_id)
            assert (answer.hidden.dtype, answer.hidden.blocksize) == ("nf4", 128)
            accept_forward_once_result(once_state, once, answer, server_public_key=node.identity.public_key)
            digests.add(answer.hidden.digest())
        assert len(digests) == 1

        # item 12: the server asked this client for its records on the client's own
        # connection; the empty report is a full answer, and the connection stays
        with trio.fail_after(30):
            await asked.wait()
        assert conn.is_open and await conn.request(Ping()) == Pong()

        # ... and a client that serves nothing answers UNKNOWN_MESSAGE, which the server
        # takes as no records: it keeps serving that client
        bare = Host(Identity.generate())
        await nursery.start(bare.run)
        queried = trio.Event()
        exchange = first.credit.exchange
        outcome: list[BaseException | None] = []

        async def watched(peer):
            try:
                await exchange(peer)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
                raise
            finally:
                queried.set()

        first.credit.exchange = watched
        other = await bare.connect(first.address, peer_id=first.identity.peer_id)
        opened = await other.request(OpenSession(model=model, span=(0, 4), max_length=8))
        plain = SessionState(client=bare.identity.peer_id, server=first.identity.peer_id, session=opened.session,
                             model=model, span=(0, 4), max_length=8)
        plain.open()
        step = sign_forward(bare.identity, plain, encode_tensor(x[:, :1], "f32"))
        accept_result(plain, step, await other.request(step), server_public_key=first.identity.public_key)
        with trio.fail_after(30):
            await queried.wait()
        assert isinstance(outcome[0], RemoteError) and outcome[0].code == ErrorCode.UNKNOWN_MESSAGE
        assert other.is_open
        step = sign_forward(bare.identity, plain, encode_tensor(x[:, 1:2], "f32"))
        accept_result(plain, step, await other.request(step), server_public_key=first.identity.public_key)
        nursery.cancel_scope.cancel()
