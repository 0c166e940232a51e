"""The ``swarm-peer`` command as a newcomer meets it (issue 15, section 3): each item
through real subprocesses, against real span servers on loopback (in this test's trio
run, or ``swarm-peer serve`` processes), with the tiny chat-capable Llama."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from peer.api import Swarm, SyncSwarm
from peer.cli import build_parser
from peer.cli_output import HeldLogHandler, TokenPrinter
from peer.demo import wait_ready
from swarm.dht import BootstrapFailed

from peer_helpers import start_server

ROOT = Path(__file__).resolve().parents[2]
POEM = "Write a poem about the sea."


@pytest.fixture
def env(tmp_path):
    """A private data and cache directory for the subprocesses (their default identity)."""
    return {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "SWARM_PEER_CACHE": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1"}


def cli(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "peer.cli", *args]


def run(args, env, *, input: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, input=input, capture_output=True, timeout=timeout, cwd=ROOT)


async def run_async(args, env, *, stdin: bytes = b"", merge: bool = False) -> subprocess.CompletedProcess:
    where = {"stderr": subprocess.STDOUT} if merge else {"capture_stderr": True}
    return await trio.run_process(args, env=env, stdin=stdin, capture_stdout=True, check=False, cwd=ROOT, **where)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.decode().strip()
    assert done.returncode == 1, err
    assert "\n" not in err, err
    assert err.startswith("swarm-peer: error: "), err
    return err


def result_of(stdout: bytes) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert all(line["type"] == "token" for line in lines[:-1])
    assert lines[-1]["type"] == "result"
    return lines[:-1], lines[-1]


# --- items 1, 3 (time to first token), 12 (JSON lines, stdin), 6 -------------------------


async def test_generate_applies_the_chat_template_unless_raw_and_streams_json_lines(chat_model, env):
    async with trio.open_nursery() as nursery:
        node = await start_server(nursery, chat_model, (0, 4))
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=chat_model, audit=0)
        head = swarm.client.head
        common = ["--bootstrap", node.address, "--model", chat_model, "--max-new-tokens", "6", "--json"]
        chat = await run_async(cli("generate", *common, POEM), env)
        assert chat.returncode == 0, chat.stderr.decode()
        tokens, result = result_of(chat.stdout)
        # item 1: the chat template is on by default, as in the Python API
        assert result["prompt_tokens"] == len(head.encode_prompt(POEM, chat=True))
        assert result["text"] == (await swarm.generate(POEM, max_new_tokens=6)).text
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        assert tokens
        assert "".join(t["text"] for t in tokens) == result["text"]
        # what the audits established (issue 11): one server, checked on the client's own copy
        assert result["verification"]["hop_steps"] == 6
        assert result["verification"]["unverifiable_hops"] == []
        # item 3: the first token is reported from the command's start, which includes
        # loading the head and joining the swarm (the swarm's own TTFT is inside it)
        assert result["first_token_after"] > result["timings"]["time_to_first_token"] > 0
        # --raw skips the template; '-' reads the prompt from standard input
        raw = await run_async(cli("generate", *common, "--raw", "-"), env, stdin=POEM.encode())
        assert raw.returncode == 0, raw.stderr.decode()
        assert result_of(raw.stdout)[1]["prompt_tokens"] == len(head.encode_prompt(POEM, chat=False))
        text = await run_async(cli("generate", *common[:-1], POEM), env)
        assert text.returncode == 0
        summary = text.stderr.decode().strip().splitlines()[-1]
        assert re.match(r"\[6 tokens, [\d.]+ tok/s, first token after [\d.]+ s \([\d.]+ s in the swarm\)", summary)
        nursery.cancel_scope.cancel()


def test_bad_input_is_one_line_before_anything_slow(env):
    # A model that does not exist: had anything slow (loading it) come first, the error
    # would be about the model. Each of these is about the input, at once.
    bad_model = ["--model", "/nonexistent/model"]
    cases = [
        (cli("generate", "--bootstrap", "127.0.0.1:1", *bad_model, b"caf\xe9 \xff"), None, "not valid UTF-8"),
        (cli("generate", "--bootstrap", "127.0.0.1:1", *bad_model, "-"), b"\xff\xfe", "standard input is not valid"),
        (cli("generate", "--bootstrap", "127.0.0.1:1", *bad_model, ""), None, "the prompt is empty"),
        (cli("generate", "--bootstrap", "127.0.0.1:1", *bad_model, "  \n"), None, "the prompt is empty"),
        (cli("generate", "--bootstrap", "127.0.0.1", *bad_model, "hi"), None, "bad bootstrap address"),
        (cli("status", "--bootstrap", "localhost:99999", *bad_model), None, "bad bootstrap address"),
        (cli("chat", "--bootstrap", "[::1", *bad_model), None, "bad bootstrap address"),
        (cli("generate", "--bootstrap", "127.0.0.1:1", *bad_model, "--temperature", "-1", "hi"), None,
         "temperature must be"),
    ]
    for args, stdin, message in cases:
        err = one_error_line(run(args, env, input=stdin))
        assert message in err, (args, err)


# --- item 7 ------------------------------------------------------------------------------


async def test_the_python_api_raises_bootstrap_failed_never_a_group(chat_model):
    for bad in (["127.0.0.1"], ["127.0.0.1:1"], ["no-such-host.invalid:5"], []):
        with pytest.raises(BootstrapFailed):
            await trio.to_thread.run_sync(lambda: SyncSwarm(bootstrap=bad, model=chat_model))
    async with trio.open_nursery() as nursery:
        with pytest.raises(BootstrapFailed, match="bad bootstrap address"):  # before loading anything
            await Swarm.connect(nursery, bootstrap=["localhost"], model="/nonexistent/model")


# --- item 2 ------------------------------------------------------------------------------


async def test_dht_maintenance_failures_about_stale_contacts_do_not_warn(caplog):
    from swarm.dht import DhtNode
    from swarm.errors import PeerUnreachable

    async def gone():
        raise PeerUnreachable("127.0.0.1:9", "connection refused")

    with caplog.at_level(logging.DEBUG, logger="swarm.dht"):
        await DhtNode._quietly(gone())
    assert [r.levelno for r in caplog.records if "maintenance" in r.getMessage()] == [logging.INFO]


# --- items 3, 4, 5, 8, 9, 10 with `swarm-peer serve` processes ----------------------------


def test_serve_says_what_it_does_and_refuses_busy_ports_and_identities(chat_model, env, tmp_path):
    key = tmp_path / "a.key"
    log = (tmp_path / "serve.err").open("w")
    # without --blocks: the swarm chooses; --num-blocks 100 is more than the model has
    proc = subprocess.Popen(cli("serve", "--model", chat_model, "--identity", str(key), "--num-blocks", "100",
                                "--threads", "1"), stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
    try:
        server = wait_ready(proc, timeout=300)
        join = proc.stdout.readline().strip()
        # item 9: a new swarm says how others join it
        assert join == f"swarm-peer: started a new swarm; others join it with: --bootstrap {server.address}"
        errors = (tmp_path / "serve.err").read_text()
        # item 9: what was chosen and why; item 3: progress of loading and the probe
        assert "swarm-peer: chose blocks 0:4: all 4 blocks: --num-blocks 100 is more than the model has" in errors
        assert "swarm-peer: loading blocks 0:4" in errors
        assert "swarm-peer: measuring the throughput" in errors
        port = server.address.rsplit(":", 1)[1]
        # item 4: a busy port is one line, before the model is even resolved
        err = one_error_line(run(cli("serve", "--model", "/nonexistent/model", "--port", port), env))
        assert f"port {port} on 127.0.0.1 is already in use" in err
        err = one_error_line(run(cli("serve", "--model", "/nonexistent/model", "--api", port), env))
        assert "--api" in err
        # item 5: the same identity in a second server is refused, naming the holder
        err = one_error_line(run(cli("serve", "--model", chat_model, "--identity", str(key)), env))
        assert f"is in use by another running server (pid {proc.pid})" in err
        # ... and a client given that identity goes as a newcomer instead of hiding the server
        client = run(cli("generate", "--bootstrap", server.address, "--model", chat_model, "--identity", str(key),
                         "--max-new-tokens", "2", POEM), env)
        assert client.returncode == 0, client.stderr.decode()
        assert f"is in use by a running server (pid {proc.pid}); this client uses a throwaway identity" \
            in client.stderr.decode()
        status = run(cli("status", "--bootstrap", server.address, "--model", chat_model, "--json"), env)
        assert status.returncode == 0, status.stderr.decode()
        view = json.loads(status.stdout)
        # item 8: when each announcement was last renewed and when it expires
        (entry,) = view["servers"]
        assert entry["addrs"] == [server.address]
        assert 0 <= entry["age"] < 600
        assert 0 < entry["expires_in"] <= 600
        # item 10: the models the swarm serves (its model index; tests/peer/test_model_info.py has two)
        assert view["models"] == [{"name": chat_model, "model_id": view["model"], "num_blocks": 4, "hidden_size": 64,
                                   "source": "", "servers": 1, "origin": "configured"}]
        text = run(cli("status", "--bootstrap", server.address, "--model", chat_model), env)
        assert re.search(r"RENEWED\s+EXPIRES IN", text.stdout.decode())
        assert re.search(r"\d+ s ago\s+\d+ min", text.stdout.decode())
        # item 3: status is fast: it needs neither torch nor transformers once the model is known
        no_torch = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
                    "from peer.cli import main; sys.exit(main(sys.argv[1:]))")
        quick = run([sys.executable, "-c", no_torch, "status", "--bootstrap", server.address, "--model",
                     chat_model], env)
        assert quick.returncode == 0, quick.stderr.decode()
        assert b"1 server(s)" in quick.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log.close()


# --- item 11 -----------------------------------------------------------------------------


async def test_a_model_without_a_tokenizer_is_one_line(tmp_path, env):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path / "no-tokenizer"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(path)
    async with trio.open_nursery() as nursery:
        node = await start_server(nursery, str(path), (0, 2))
        done = await run_async(cli("generate", "--bootstrap", node.address, "--model", str(path), "hello"), env)
        err = one_error_line(done)
        assert "has no tokenizer (none of tokenizer.json" in err
        assert "sentencepiece" not in err
        nursery.cancel_scope.cancel()


# --- item 12 -----------------------------------------------------------------------------


def test_version_and_help_for_every_option(env):
    done = run(cli("--version"), env)
    assert done.returncode == 0
    assert re.match(rb"swarm-peer \d+\.\d+\.\d+ \(wire protocol \d+\.\d+\)", done.stdout)
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) >= {"keygen", "serve", "api", "generate", "chat", "status", "demo"}
    for name, sub in [("swarm-peer", parser), *commands.items()]:
        for action in sub._actions:
            if action.dest in ("help", "chat", "command") or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


async def test_chat_keeps_the_history_and_streams(chat_model, env):
    async with trio.open_nursery() as nursery:
        node = await start_server(nursery, chat_model, (0, 4))
        done = await run_async(cli("chat", "--bootstrap", node.address, "--model", chat_model,
                                   "--max-new-tokens", "5", "--system", "Be brief."), env,
                               stdin=b"Hello there\nWhat did I just say?\n")
        assert done.returncode == 0, done.stderr.decode()
        turns = [line for line in done.stderr.decode().splitlines() if line.startswith("[")]
        assert len(turns) == 2
        prompts = [int(re.search(r"prompt (\d+) tokens", t).group(1)) for t in turns]
        # The second turn's prompt holds the system message, the first exchange and the new line.
        assert prompts[1] > prompts[0] + 5
        nursery.cancel_scope.cancel()


async def test_a_failover_warning_never_lands_inside_a_streamed_line(chat_model, env):
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, chat_model, (0, 2))
        second = await start_server(nursery, chat_model, (0, 2), bootstrap=[first.address])
        await start_server(nursery, chat_model, (2, 4), bootstrap=[first.address])
        killed = []

        async def kill_the_one_in_use():
            while True:
                for victim in (first, second):
                    if victim.server.open_sessions and victim.server.stats.steps >= 4:
                        victim.cancel_scope.cancel()  # its listener and connections close at once
                        killed.append(victim)
                        return
                await trio.sleep(0.005)

        nursery.start_soon(kill_the_one_in_use)
        # stderr into stdout: the order in which the two reach a terminal is kept
        done = await run_async(cli("generate", "--bootstrap", first.address, "--model", chat_model,
                                   "--max-new-tokens", "200", "--temperature", "0.8", "--seed", "3", POEM), env,
                               merge=True)
        out = done.stdout.decode()
        assert done.returncode == 0, out
        assert killed
        assert "1 failover(s)" in out
        warnings = [m.start() for m in re.finditer("swarm-peer: warning: ", out)]
        assert warnings, out
        for at in warnings:
            assert at == 0 or out[at - 1] == "\n", out[max(0, at - 80):at + 80]
        nursery.cancel_scope.cancel()


def test_held_log_records_wait_for_the_end_of_the_streamed_line():
    out, err = io.StringIO(), io.StringIO()
    handler = HeldLogHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.held")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        printer = TokenPrinter(out, handler)
        printer.write("Once upon")
        logger.warning("hop failed; re-routing")
        assert err.getvalue() == ""  # held: the line is not finished
        printer.write(" a time\n")
        assert err.getvalue() == "hop failed; re-routing\n"
        printer.write("there")
        logger.warning("again")
        printer.finish_line()
        assert out.getvalue() == "Once upon a time\nthere\n"
        assert err.getvalue().endswith("again\n")
    finally:
        logger.removeHandler(handler)


# --- the API beside a server (`serve --api`) and on its own (`swarm-peer api`) ---------


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """Lines of ``proc``'s stdout up to the one containing ``marker`` (a reader thread
    keeps the deadline honest)."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    while True:
        line = lines.get(timeout=timeout)
        if marker in line:
            return line


def test_serve_with_api_and_the_api_command_answer_openai_clients(chat_model, env, tmp_path):
    import openai

    server = subprocess.Popen(cli("serve", "--model", chat_model, "--identity", str(tmp_path / "s.key"),
                                  "--threads", "1", "--api", "0"), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    api = None
    try:
        beside = _read_until(server, "OpenAI-compatible API and web page at ")
        beside_url = beside.rsplit(" at ", 1)[1].strip()
        client = openai.OpenAI(base_url=beside_url + "v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": POEM}],
                                                max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens == 4
        (hop,) = answer.model_extra["swarm"]["route"]
        api = subprocess.Popen(cli("api", "--bootstrap", hop["address"], "--model", chat_model, "--port", "0"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        line = _read_until(api, "OpenAI-compatible API at ")
        api_url = line.split(" at ", 1)[1].split("v1 ", 1)[0]
        other = openai.OpenAI(base_url=api_url + "v1", api_key="unused", max_retries=0, timeout=120)
        again = other.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": POEM}],
                                              max_tokens=4, temperature=0)
        assert again.choices[0].message.content == answer.choices[0].message.content
        assert [m.id for m in other.models.list().data] == [chat_model]
    finally:
        for proc in (api, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        if api is not None:
            assert api.wait(60) == 0


# --- speculative decoding (issue 16 section 2) -------------------------------------------


async def test_generate_with_a_draft_gives_the_same_text_and_reports_the_drafts(chat_model, env):
    async with trio.open_nursery() as nursery:
        node = await start_server(nursery, chat_model, (0, 4))
        common = ["--bootstrap", node.address, "--model", chat_model, "--max-new-tokens", "12", "--json", POEM]
        plain = await run_async(cli("generate", *common), env)
        drafted = await run_async(cli("generate", "--draft", "prompt-lookup", *common), env)
        assert drafted.returncode == 0, drafted.stderr.decode()
        assert result_of(drafted.stdout)[1]["token_ids"] == result_of(plain.stdout)[1]["token_ids"]
        assert "drafted" in result_of(drafted.stdout)[1]["speculative"]
        nursery.cancel_scope.cancel()
    err = one_error_line(run(cli("generate", "--bootstrap", "127.0.0.1:1", "--draft", "/nonexistent/draft", "hi"),
                             env))
    assert "--draft /nonexistent/draft: no such file" in err
