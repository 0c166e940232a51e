"""The client commands of ``swarm-peer``: ``generate``, ``chat`` and ``status``.

Everything a user can get wrong (the prompt, the addresses, the sampling arguments) is
checked before anything slow (loading the model's head, joining the DHT). Times are
measured from the command's start (``STARTED``), since that is what the user waited.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import trio

from protocol import Identity
from protocol.errors import SwarmError

from ._format import credit_to_dicts, format_credit, format_route, view_to_dict
from ._paths import default_identity_path
from .catalog import ServedModel, served_models
from .cli_output import JsonLinesPrinter, TokenPrinter
from .credit import ledger_path_for, neighbour_rows

__all__ = ["cmd_generate", "cmd_chat", "cmd_status", "read_prompt", "identity_and_ledger", "STARTED"]

#: When this process started, as ``time.monotonic()``: "first token after" counts from here.
STARTED = time.monotonic()


class InvalidPrompt(SwarmError):
    """The prompt is empty or not text."""


def read_prompt(text: str, stdin: Any = None) -> str:
    """The prompt argument, or standard input for ``-``; checked to be non-empty UTF-8.

    Raises:
        InvalidPrompt: empty, whitespace only, or not valid UTF-8.
    """
    if text == "-":
        data = (stdin or sys.stdin).buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidPrompt(f"the prompt on standard input is not valid UTF-8 (byte {exc.start}); "
                                f"re-encode it as UTF-8") from None
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that were not UTF-8 arrive as lone surrogates
            raise InvalidPrompt("the prompt is not valid UTF-8; re-encode it, or pass it on standard input "
                                "with '-'") from None
    if not text.strip():
        raise InvalidPrompt("the prompt is empty; give some text (or '-' to read it from standard input)")
    return text


def identity_and_ledger(path: str | None) -> tuple[Identity, str | None]:
    """The identity (and its ledger) of ``--identity`` or the default file if it exists;
    else a throwaway identity: generating needs no key file."""
    from .cli_serve import identity_holder

    path_ = Path(path) if path else default_identity_path()
    if path or path_.exists():
        holder = identity_holder(path_)
        if holder is None:
            return Identity.load(path_), str(ledger_path_for(path_))
        # One identity in two processes is one DHT node id at two addresses: each hides
        # the other. The server keeps it; this client goes as a newcomer.
        logging.getLogger("swarm-peer").warning(
            "the identity %s is in use by a running server (pid %s); this client uses a throwaway identity "
            "(no credit priority); to generate as that server, use its API (swarm-peer serve --api PORT)",
            path_, holder)
    return Identity.generate(), None


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    from .api import sampling_params

    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=tuple(args.stop))
    sampling_params(**kwargs)  # bad arguments fail before any connection is made
    draft = getattr(args, "draft", None)
    if draft is not None:
        from ._drafters import PROMPT_LOOKUP
        from .runtime import InvalidArgument

        if draft != PROMPT_LOOKUP and not Path(draft).exists():
            raise InvalidArgument(f"--draft {draft}: no such file or directory; give {PROMPT_LOOKUP} or the path "
                                  "of a draft model (local HF directory or .gguf file)")
        kwargs["speculative"] = draft
    return kwargs


def _summary(result: Any, *, first_token_at: float | None) -> str:
    first = f"{first_token_at - STARTED:.2f} s" if first_token_at is not None else "-"
    return (f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s, first token after {first} "
            f"({result.time_to_first_token:.2f} s in the swarm), prompt {result.prompt_tokens} tokens, "
            f"route: {format_route(result.route)}" + (f", {result.failovers} failover(s)" if result.failovers
                                                      else "")
            + (f", drafts kept {result.accepted}/{result.drafted}" if result.drafted else "") + "]")


async def _connect(nursery: trio.Nursery, args: argparse.Namespace) -> Any:
    from ._heap import freeze_loaded_heap
    from .api import Swarm, check_bootstrap

    check_bootstrap(args.bootstrap)
    identity, ledger = identity_and_ledger(args.identity)
    swarm = await Swarm.connect(nursery, bootstrap=args.bootstrap, model=args.model, step_timeout=args.timeout,
                                identity=identity, ledger_path=ledger)
    freeze_loaded_heap()  # the head is loaded
    return swarm


# --- generate ----------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from ._bootstrap import check_bootstrap

    prompt = read_prompt(args.prompt)
    check_bootstrap(args.bootstrap)
    kwargs = _sampling(args)
    return trio.run(_generate, args, prompt, kwargs)


async def _generate(args: argparse.Namespace, prompt: str, kwargs: dict[str, Any]) -> int:
    async with trio.open_nursery() as nursery:
        swarm = await _connect(nursery, args)
        printer = JsonLinesPrinter() if args.json else TokenPrinter()
        first: list[float] = []

        def on_token(event: Any) -> None:
            if not first:
                first.append(time.monotonic())
            printer.token(event)

        try:
            result = await swarm.generate(prompt, chat=not args.raw, on_token=on_token, **kwargs)
        finally:
            printer.finish_line()
        if isinstance(printer, JsonLinesPrinter):
            printer.result(result, first_token_after=(first[0] - STARTED) if first else None)
        else:
            print(_summary(result, first_token_at=first[0] if first else None), file=sys.stderr, flush=True)
        await swarm.aclose()
    return 0


# --- chat --------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    from ._bootstrap import check_bootstrap

    check_bootstrap(args.bootstrap)
    kwargs = _sampling(args)
    return trio.run(_chat, args, kwargs)


def _read_line(prompt: str) -> str | None:
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


async def _chat(args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    interactive = sys.stdin.isatty()
    async with trio.open_nursery() as nursery:
        swarm = await _connect(nursery, args)
        history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        if interactive:
            print(f"chatting with {swarm.model} through the swarm; /reset forgets the conversation, "
                  f"Ctrl-D or /exit ends it", file=sys.stderr)
        while True:
            line = await trio.to_thread.run_sync(_read_line, "you> " if interactive else "", abandon_on_cancel=True)
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                del history[1 if args.system else 0:]
                print("(conversation forgotten)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            read_prompt(line)
            history.append({"role": "user", "content": line})
            printer = TokenPrinter()
            if interactive:
                sys.stdout.write("swarm> ")
            t0 = time.monotonic()
            first: list[float] = []

            def on_token(event: Any) -> None:
                if not first:
                    first.append(time.monotonic())
                printer.token(event)

            try:
                result = await swarm.generate(history, on_token=on_token, **kwargs)
            except SwarmError as exc:  # one failed turn does not end the conversation
                printer.finish_line()
                history.pop()
                print(f"swarm-peer: error: {exc}", file=sys.stderr, flush=True)
                continue
            printer.finish_line()
            history.append({"role": "assistant", "content": result.text})
            took = f"{first[0] - t0:.2f} s" if first else "-"
            print(f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s, first token after {took}, "
                  f"prompt {result.prompt_tokens} tokens, route: {format_route(result.route)}]", file=sys.stderr,
                  flush=True)
        await swarm.aclose()
    return 0


# --- status ------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from ._bootstrap import check_bootstrap

    check_bootstrap(args.bootstrap)
    return trio.run(_status, args)


async def _status(args: argparse.Namespace) -> int:
    from swarm.announce import RECORD_KINDS, fetch_swarm_view
    from swarm.credit import Ledger
    from swarm.dht import DhtNode
    from swarm.health import PeerHealth
    from swarm.latency import refresh_rtts
    from swarm.transport import Host

    from ._format import format_models, format_status, models_to_dicts
    from .catalog import resolve_quickly

    model_id, num_blocks = await trio.to_thread.run_sync(resolve_quickly, args.model)
    async with trio.open_nursery() as nursery:
        host = Host(Identity.generate())
        await nursery.start(host.run)
        dht = DhtNode(host, kinds=RECORD_KINDS)
        # The bootstrap lookup fills the routing table; status needs no more than that to
        # ask for the block keys, so it does not wait for the DHT's maintenance.
        await nursery.start(functools.partial(dht.run, bootstrap=tuple(args.bootstrap)))
        view = await fetch_swarm_view(dht, model_id, num_blocks, concurrency=max(8, num_blocks))
        # Who is alive right now: one PING each, at once, within the PING timeout.
        health = PeerHealth()
        await refresh_rtts(host, health, {p: a.addrs for p, a in view.servers.items()}, force=True)
        seen = health.snapshot(trio.current_time())
        now = time.time()
        models = await served_models([ServedModel(name=args.model, model_id=model_id, num_blocks=num_blocks)], dht)
        ledger = None
        identity_path = Path(args.identity) if args.identity else default_identity_path()
        if args.identity or identity_path.exists():
            identity = Identity.load(identity_path)
            ledger = Ledger.open(str(ledger_path_for(identity_path)), identity.public_key)
        if args.json:
            body = view_to_dict(view, now=now, model_name=args.model, health=seen)
            body["models"] = models_to_dicts(models)
            body["credit"] = credit_to_dicts(neighbour_rows(ledger)) if ledger is not None else None
            print(json.dumps(body, indent=2))
        else:
            print(format_status(view, now=now, health=seen))
            print("\n" + format_models(models))
            if ledger is not None:
                print("\n" + format_credit(neighbour_rows(ledger), len(ledger)))
        nursery.cancel_scope.cancel()
    return 0
