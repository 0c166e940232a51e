"""The OpenAI-compatible HTTP API against real servers on loopback: in-process span
servers of a tiny random Llama that carries a real tokenizer and chat template, the
API served by hypercorn in the same trio run, and as clients the official ``openai``
package (in a worker thread: it blocks) and ``curl`` (a subprocess)."""

from __future__ import annotations

import functools
import json
import shutil
import urllib.error
import urllib.request

import openai
import pytest
import trio

from peer.api import Swarm
from peer.http import ApiModel, SwarmApi, serve_http

from peer_helpers import start_server

NAME = "tiny-chat"
MESSAGES = [{"role": "user", "content": "Write a poem about the sea."}]


async def api_on(nursery, model, spans, *, audit=0.0):
    """Servers for ``spans``, a Swarm client, and the API over it: (nodes, api, url)."""
    nodes = [await start_server(nursery, model, spans[0])]
    for span in spans[1:]:
        nodes.append(await start_server(nursery, model, span, bootstrap=[nodes[0].address]))
    swarm = await Swarm.connect(nursery, bootstrap=[nodes[0].address], model=model, audit=audit)
    api = SwarmApi([ApiModel(NAME, swarm)])
    url = await nursery.start(functools.partial(serve_http, api.app, port=0))
    return nodes, api, swarm, url


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=60)


def get(url: str) -> tuple[int, dict]:
    """GET ``url``: (status, JSON body), error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def sample(api: SwarmApi, name: str, **labels: str) -> float:
    return api.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def test_openai_client_chat_and_completions_streamed_and_not(chat_model):
    async with trio.open_nursery() as nursery:
        nodes, api, swarm, url = await api_on(nursery, chat_model, [(0, 2), (2, 4)])
        head = swarm.client.head
        reference = await swarm.generate(MESSAGES, max_new_tokens=12, temperature=0)
        raw_reference = await swarm.generate("Once upon a time", max_new_tokens=6, chat=False)

        def use():
            client = client_of(url)
            models = client.models.list()
            chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
            chunks = list(client.chat.completions.create(
                model=NAME, messages=MESSAGES, max_completion_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True}))
            completion = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6,
                                                   temperature=0)
            streamed = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6,
                                                      temperature=0, stream=True))
            seeded = [client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                                     top_p=0.9, seed=7).choices[0].message.content
                      for _ in range(2)]
            stopped = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6,
                                                temperature=0, stop=[raw_reference.text[3:6]])
            return models, chat, chunks, completion, streamed, seeded, stopped

        models, chat, chunks, completion, streamed, seeded, stopped = await trio.to_thread.run_sync(use)
        assert [m.id for m in models.data] == [NAME]
        assert models.data[0].model_extra["swarm"]["model_id"] == swarm.model

        # Non-streamed chat: the swarm's own answer, OpenAI's fields, and the route.
        assert chat.choices[0].message.content == reference.text
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage.prompt_tokens == len(head.encode_prompt(MESSAGES))
        assert chat.usage.completion_tokens == 12
        route = chat.model_extra["swarm"]["route"]
        assert [tuple(h["blocks"]) for h in route] == [(0, 2), (2, 4)]
        assert {h["peer_id"] for h in route} == {n.identity.peer_id.hex() for n in nodes}
        assert chat.model_extra["swarm"]["failovers"] == 0
        verification = chat.model_extra["swarm"]["verification"]  # issue 11: what the audits established
        assert verification["hop_steps"] == 2 * 12
        assert {"audited_steps", "verified_fraction",
                                                        "unverifiable_hops"} <= verification.keys()

        # Streamed chat: a role chunk, the same text in pieces, a finish chunk with the
        # route, then the usage-only chunk (include_usage).
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reference.text
        finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1
        assert finish[0].choices[0].finish_reason == "length"
        assert finish[0].model_extra["swarm"]["route"] == route
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 12

        # Completions use the prompt as is (no chat template).
        assert completion.choices[0].text == raw_reference.text
        assert "".join(c.choices[0].text for c in streamed) == raw_reference.text
        assert seeded[0] == seeded[1]  # same seed, same sample
        stop = raw_reference.text[3:6]
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == raw_reference.text[:raw_reference.text.index(stop)]
        nursery.cancel_scope.cancel()


async def test_errors_have_openais_shape_and_status(chat_model):
    async with trio.open_nursery() as nursery:
        _, api, swarm, url = await api_on(nursery, chat_model, [(0, 2)])  # blocks 2..3 served by nobody

        def use():
            client = client_of(url)
            errors = {}
            for name, call in [
                ("n", lambda: client.chat.completions.create(model=NAME, messages=MESSAGES, n=2)),
                ("tools", lambda: client.chat.completions.create(
                    model=NAME, messages=MESSAGES,
                    tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
                ("temperature", lambda: client.chat.completions.create(model=NAME, messages=MESSAGES,
                                                                        temperature=5)),
                ("model", lambda: client.chat.completions.create(model="nope", messages=MESSAGES)),
                ("no_route", lambda: client.chat.completions.create(model=NAME, messages=MESSAGES)),
                ("no_route_stream", lambda: list(client.completions.create(model=NAME, prompt="hi", stream=True))),
                ("too_long", lambda: client.completions.create(model=NAME, prompt="hi", max_tokens=100000)),
            ]:
                with pytest.raises(openai.APIStatusError) as info:
                    call()
                errors[name] = info.value
            health = get(url + "health")
            return errors, health

        errors, health = await trio.to_thread.run_sync(use)
        for name in ("n", "tools", "temperature", "too_long"):
            assert errors[name].status_code == 400, name
            assert errors[name].body["type"] == "invalid_request_error"
        assert errors["n"].body["code"] == "unsupported_parameter"
        assert errors["n"].body["param"] == "n"
        assert errors["tools"].body["param"] == "tools"
        assert errors["too_long"].body["code"] == "context_length_exceeded"
        assert errors["model"].status_code == 404
        assert errors["model"].body["code"] == "model_not_found"
        for name in ("no_route", "no_route_stream"):  # the stream fails before it starts: a status, not a 200
            assert errors[name].status_code == 503
            assert "blocks 2..3" in errors[name].body["message"]
            assert errors[name].body["swarm"]["missing_blocks"] == [2, 4]
        assert health[0] == 503
        assert health[1]["models"][NAME]["missing_blocks"] == [2, 4]
        assert sample(api, "swarm_api_errors_total", type="no_route") == 2
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_streams_server_sent_events_and_reads_health_and_metrics(chat_model):
    async with trio.open_nursery() as nursery:
        _, api, swarm, url = await api_on(nursery, chat_model, [(0, 4)])
        body = json.dumps({"model": NAME, "messages": MESSAGES, "max_tokens": 5, "stream": True, "temperature": 0})
        curl = ["curl", "-sS", "--fail-with-body", "--max-time", "120"]
        streamed = await trio.run_process([*curl, "-N", url + "v1/chat/completions", "-H",
                                           "Content-Type: application/json", "-d", body], capture_stdout=True)
        events = [line[len("data: "):] for line in streamed.stdout.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        reference = await swarm.generate(MESSAGES, max_new_tokens=5)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference.text
        health = await trio.run_process([*curl, url + "health"], capture_stdout=True)
        assert json.loads(health.stdout)["status"] == "ok"
        metrics = (await trio.run_process([*curl, url + "metrics"], capture_stdout=True)).stdout.decode()
        for name in ("swarm_api_requests_total", "swarm_api_completion_tokens_total",
                     "swarm_api_time_to_first_token_seconds_bucket", "swarm_api_failovers_total",
                     "swarm_api_audits_total", "swarm_api_errors_total"):
            assert name in metrics, name
        assert f'swarm_api_completion_tokens_total{{model="{NAME}"}} 5.0' in metrics
        nursery.cancel_scope.cancel()


async def test_two_concurrent_streams_get_their_own_answers(chat_model):
    async with trio.open_nursery() as nursery:
        nodes, api, swarm, url = await api_on(nursery, chat_model, [(0, 2), (2, 4)])
        prompts = ["Write a poem about the sea.", "Name three colors."]
        expected = [(await swarm.generate(p, max_new_tokens=24)).text for p in prompts]
        both_streaming = trio.Event()
        first_chunks = [0]
        token = trio.lowlevel.current_trio_token()

        def stream(prompt):
            pieces = []
            for chunk in client_of(url).chat.completions.create(
                    model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0,
                    stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    if not pieces:
                        trio.from_thread.run_sync(note_first, trio_token=token)
                    pieces.append(chunk.choices[0].delta.content)
            return "".join(pieces)

        def note_first():
            first_chunks[0] += 1
            if first_chunks[0] == 2:
                both_streaming.set()

        results = {}

        async def run(i):
            results[i] = await trio.to_thread.run_sync(stream, prompts[i])

        async with trio.open_nursery() as jobs:
            for i in range(2):
                jobs.start_soon(run, i)
        assert [results[0], results[1]] == expected
        assert both_streaming.is_set()
        assert sample(api, "swarm_api_active_generations", model=NAME) == 0
        nursery.cancel_scope.cancel()


async def test_a_client_that_disconnects_mid_stream_cancels_and_frees_the_sessions(chat_model):
    async with trio.open_nursery() as nursery:
        nodes, api, swarm, url = await api_on(nursery, chat_model, [(0, 2), (2, 4)])
        token = trio.lowlevel.current_trio_token()
        sessions_seen = []

        def read_two_chunks_then_hang_up():
            stream = client_of(url).completions.create(model=NAME, prompt="Once upon a time", max_tokens=400,
                                                       temperature=0, stream=True)
            for i, _ in enumerate(stream):
                if i == 1:
                    sessions_seen.append(trio.from_thread.run_sync(
                        lambda: sum(n.server.open_sessions for n in nodes), trio_token=token))
                    break
            stream.close()  # closes the HTTP connection mid-stream

        await trio.to_thread.run_sync(read_two_chunks_then_hang_up)
        assert sessions_seen == [2]  # one session per hop while it streamed
        with trio.fail_after(30):
            while sum(n.server.open_sessions for n in nodes) or sample(api, "swarm_api_cancelled_total", model=NAME) < 1:
                await trio.sleep(0.02)
        # Cancelled, not finished: 400 tokens were never generated nor counted.
        assert sample(api, "swarm_api_completion_tokens_total", model=NAME) == 0
        assert sample(api, "swarm_api_active_generations", model=NAME) == 0
        nursery.cancel_scope.cancel()


async def test_a_non_streamed_request_is_cancelled_when_its_client_goes(chat_model):
    async with trio.open_nursery() as nursery:
        nodes, api, swarm, url = await api_on(nursery, chat_model, [(0, 2), (2, 4)])
        body = json.dumps({"model": NAME, "prompt": "Once upon a time", "max_tokens": 450, "temperature": 0})
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        with trio.fail_after(30):
            while not sum(n.server.open_sessions for n in nodes):
                await trio.sleep(0.01)
        await stream.aclose()
        with trio.fail_after(30):
            while sum(n.server.open_sessions for n in nodes) or sample(api, "swarm_api_cancelled_total", model=NAME) < 1:
                await trio.sleep(0.02)
        assert sample(api, "swarm_api_completion_tokens_total", model=NAME) == 0
        nursery.cancel_scope.cancel()


def test_request_parsing_refuses_what_it_cannot_honour():
    from peer.http._openai import ApiError, parse_chat_request, parse_completion_request

    ok = parse_chat_request({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text",
                                                                                          "text": "be brief"}]},
                                                         {"role": "user", "content": "hi"}],
                             "max_tokens": 3, "stop": "x", "n": 1, "user": "u", "presence_penalty": 0})
    assert ok.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ok.stop == ("x",)
    assert ok.max_tokens == 3
    assert ok.temperature == 1.0
    assert ok.chat
    assert parse_completion_request({"model": "m", "prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    bad = [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ({"model": "m", "messages": MESSAGES, "n": 3}, "n"),
        ({"model": "m", "messages": MESSAGES, "n": True}, "n"),
        ({"model": "m", "messages": MESSAGES, "logprobs": True}, "logprobs"),
        ({"model": "m", "messages": MESSAGES, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": "m", "messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "messages": MESSAGES, "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"model": "m", "messages": MESSAGES, "something_new": 1}, "something_new"),
        ({"messages": MESSAGES}, "model"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": "a", "echo": True}, "echo"),
    ]
    for body, param in bad:
        parse = parse_completion_request if "prompt" in body else parse_chat_request
        with pytest.raises(ApiError) as info:
            parse(body)
        assert info.value.status == 400, body
        assert info.value.param == param, body
        assert set(info.value.to_json()["error"]) >= {"message", "type", "param", "code"}


async def test_speculative_prompt_lookup_passes_through_and_paths_are_refused(chat_model):
    from peer.http._openai import ApiError, parse_chat_request

    assert parse_chat_request({"model": "m", "messages": MESSAGES,
                               "speculative": "prompt-lookup"}).speculative == "prompt-lookup"
    with pytest.raises(ApiError) as info:  # a caller must not make the server load a model file
        parse_chat_request({"model": "m", "messages": MESSAGES, "speculative": "/etc/passwd"})
    assert info.value.param == "speculative"
    async with trio.open_nursery() as nursery:
        _, _, swarm, url = await api_on(nursery, chat_model, [(0, 2), (2, 4)])
        reference = await swarm.generate(MESSAGES, max_new_tokens=12, temperature=0)

        def use():
            return client_of(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12,
                                                          temperature=0, extra_body={"speculative": "prompt-lookup"})

        chat = await trio.to_thread.run_sync(use)
        assert chat.choices[0].message.content == reference.text
        nursery.cancel_scope.cancel()
