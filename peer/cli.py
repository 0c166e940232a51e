"""The ``swarm-peer`` command line: one binary for serving, generating, chatting, the
HTTP API, a demo and status.

Every expected failure prints one line starting with ``swarm-peer: error:`` and exits
non-zero; tracebacks are for bugs only. The commands live in ``cli_serve`` (serve, api),
``cli_client`` (generate, chat, status) and ``demo``; the tables they print in
``_format``. Nothing heavy (torch, transformers) is imported until a command needs it,
so ``--help`` and ``--version`` are instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path

from protocol import VERSION_TEXT, Identity, SwarmError
from protocol.errors import swarm_error_in

from ._format import READY_PREFIX
from ._paths import default_identity_path
from .cli_output import install_cli_logging

__all__ = ["main", "build_parser", "default_identity_path", "READY_PREFIX"]

# A peer shares its machine (volunteer hardware, several peers per host in the demo):
# OpenMP threads that spin while waiting for work make every other process on the cores
# crawl (measured here: a 576-wide matmul 6x slower with two spinning threads under
# load, no slower idle with passive waits). Set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_MODEL = "smollm2-135m-instruct"  # peer.runtime.DEFAULT_MODEL, without importing torch for --help


def version() -> str:
    try:
        own = metadata.version("swarm-peer")
    except metadata.PackageNotFoundError:
        own = "unknown (not installed)"
    return f"swarm-peer {own} (wire protocol {VERSION_TEXT})"


# --- commands ----------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.identity or default_identity_path())
    if path.exists() and not args.force:
        identity = Identity.load(path)
        print(f"identity exists: {path}\npeer id: {identity.peer_id.hex()}")
        return 0
    identity = Identity.generate()
    identity.save(path)
    print(f"new identity written to {path} (mode 600)\npeer id: {identity.peer_id.hex()}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .cli_serve import cmd_serve

    return cmd_serve(args)


def _cmd_api(args: argparse.Namespace) -> int:
    from .cli_serve import cmd_api

    return cmd_api(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .cli_client import cmd_generate

    return cmd_generate(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    from .cli_client import cmd_chat

    return cmd_chat(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from .cli_client import cmd_status

    return cmd_status(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, peers=args.peers, question=args.question,
                    max_new_tokens=args.max_new_tokens, web=args.web, web_port=args.web_port)


# --- parser ------------------------------------------------------------------------------


def _identity_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--identity", metavar="PATH", help=f"{what} (default: {default_identity_path()})")


def _bootstrap_option(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--bootstrap", action="append", required=required, default=None if required else [],
                   metavar="HOST:PORT",
                   help="a peer already in the swarm; repeatable" + ("" if required else
                                                                     " (none: start a new swarm)"))


def _model_option(p: argparse.ArgumentParser, what: str = "model the swarm serves") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                   help=f"{what}: built-in name, local HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})")


def _sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens to generate at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this probability "
                   "mass (default 1: all)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (default 0: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeating tokens (default 1: off)")
    p.add_argument("--seed", type=int, help="seed of the sampler, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop when the text contains this; repeatable")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one hop may take for one step before it counts as failed (default 60)")
    p.add_argument("--draft", metavar="prompt-lookup|PATH",
                   help="speculative decoding: draft tokens with prompt lookup (n-gram matches in the prompt and "
                        "output) or a draft model with the same tokenizer (local HF directory or .gguf file), and "
                        "have the swarm verify several per step; the output is unchanged (default: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-peer",
        description="Distributed LLM inference on volunteer hardware: serve blocks, generate, chat, run an "
                    "OpenAI-compatible API, try a demo.",
    )
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    keygen = sub.add_parser("keygen", help="create this peer's Ed25519 identity (or show the existing one)")
    _identity_option(keygen, "key file")
    keygen.add_argument("--force", action="store_true", help="replace an existing identity")
    keygen.set_defaults(func=_cmd_keygen)

    serve = sub.add_parser("serve", help="serve a span of a model's blocks to the swarm")
    _model_option(serve, "the model to serve")
    serve.add_argument("--blocks", metavar="S:E", help="serve blocks S..E-1 (default: where the swarm is weakest)")
    serve.add_argument("--num-blocks", type=int, metavar="N",
                       help="how many blocks to serve when choosing the span (default: all)")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 or :: for "
                       "all interfaces)")
    serve.add_argument("--port", type=int, default=0, help="listen port (default: any free port)")
    serve.add_argument("--announce-addr", action="append", default=[], metavar="HOST:PORT",
                       help="address to announce instead of the bound one (NAT); repeatable")
    _bootstrap_option(serve, required=False)
    serve.add_argument("--source-addr", metavar="HOST",
                       help="local address to dial other peers from (multi-homed hosts; default: the kernel's choice)")
    _identity_option(serve, "key file; one running server per identity")
    serve.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    serve.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on GPU)")
    serve.add_argument("--quant", choices=["int8", "nf4"], help="quantize the served blocks' weights (bitsandbytes)")
    serve.add_argument("--max-sessions", type=int, default=16, help="concurrent inference sessions (default 16)")
    serve.add_argument("--cache-bytes", type=int, help="memory budget for KV caches in bytes (default: a quarter "
                       "of the memory available after loading, half the free GPU memory on a GPU)")
    serve.add_argument("--threads", type=int,
                       help="torch threads for compute (default: one per core; use fewer when several peers share "
                            "a machine)")
    serve.add_argument("--compute-slots", type=int, default=1,
                       help="steps computed at once; more wait, served in order of the requesters' credit")
    serve.add_argument("--max-batch", type=int, default=16,
                       help="decode steps of different sessions computed together as one forward, chosen in "
                            "credit order (default 16; 1 turns batching off)")
    serve.add_argument("--api", type=int, metavar="PORT",
                       help="also serve the OpenAI-compatible HTTP API and the web page on this port")
    serve.add_argument("--api-host", default="127.0.0.1", metavar="HOST",
                       help="listen address of --api (default 127.0.0.1)")
    serve.set_defaults(func=_cmd_serve)

    api = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API and the web page for a swarm")
    _bootstrap_option(api, required=True)
    api.add_argument("--model", action="append", metavar="NAME_OR_PATH",
                     help=f"a model to answer for; repeatable (default: {DEFAULT_MODEL})")
    api.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any free port)")
    _identity_option(api, "generate as this peer (default key file if present): serving earns priority;")
    api.add_argument("--timeout", type=float, default=60.0,
                     help="seconds one hop may take for one step before it counts as failed (default 60)")
    api.set_defaults(func=_cmd_api)

    gen = sub.add_parser("generate", help="generate text with a swarm")
    gen.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    _bootstrap_option(gen, required=True)
    _model_option(gen)
    gen.add_argument("--raw", action="store_true",
                     help="use the prompt as is, without the model's chat template (which is on by default)")
    gen.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    gen.add_argument("--json", action="store_true",
                     help="print JSON lines: one per token as it comes, then the result with route and timings")
    _sampling_options(gen, 64)
    _identity_option(gen, "generate as this peer (default: the default key file if present): serving earns "
                     "priority;")
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat with a swarm (history kept, answers streamed)")
    _bootstrap_option(chat, required=True)
    _model_option(chat)
    chat.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    _sampling_options(chat, 256)
    _identity_option(chat, "chat as this peer (default: the default key file if present);")
    chat.set_defaults(func=_cmd_chat)

    status = sub.add_parser("status", help="show which peers serve which blocks, gaps, and your credit")
    _bootstrap_option(status, required=True)
    _model_option(status)
    status.add_argument("--json", action="store_true", help="print the swarm view as JSON")
    _identity_option(status, "show this identity's credit (default key file if present);")
    status.set_defaults(func=_cmd_status)

    demo = sub.add_parser("demo", help="run a local swarm of peer processes with the default model and ask it")
    _model_option(demo, "the model to run")
    demo.add_argument("--peers", type=int, default=3, help="server processes (default 3)")
    demo.add_argument("--question", default="What is the capital of France? Answer in one sentence.",
                      help="what to ask the swarm")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate at most (default 40)")
    demo.add_argument("--web", action="store_true",
                      help="keep the swarm up and serve the web page and API until Ctrl-C")
    demo.add_argument("--web-port", type=int, default=8000, help="port of the web page with --web (default 8000)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_cli_logging(args.verbose)
    if args.command != "keygen":
        from . import _progress

        _progress.enable()  # first-run conversion, loading, throughput probe
    try:
        return args.func(args)
    except (SwarmError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        leaf = _expected_error(exc)
        if leaf is None:
            raise
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        print(f"swarm-peer: error: {leaf}", file=sys.stderr)
        return 1


def _expected_error(exc: BaseException) -> BaseException | None:
    """A KeyboardInterrupt or SwarmError (possibly wrapped by trio in exception groups)."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    if isinstance(exc, BaseExceptionGroup) and any(isinstance(e, KeyboardInterrupt) for e in exc.exceptions):
        return KeyboardInterrupt()
    return swarm_error_in(exc)


if __name__ == "__main__":
    sys.exit(main())
