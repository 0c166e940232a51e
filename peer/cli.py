"""The ``swarm-peer`` command line: one binary for serving, generating, a demo and status.

Every expected failure prints one line starting with ``swarm-peer: error:`` and
exits non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from protocol import Identity, SwarmError

__all__ = ["main", "default_identity_path"]


def default_identity_path() -> Path:
    """Where the identity lives unless ``--identity`` says otherwise (XDG data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "swarm-peer" / "identity.key"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-peer",
        description="Distributed LLM inference on volunteer hardware: serve blocks, generate, run a demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    keygen = sub.add_parser("keygen", help="create this peer's Ed25519 identity (or show the existing one)")
    keygen.add_argument("--identity", metavar="PATH", help=f"key file (default: {default_identity_path()})")
    keygen.add_argument("--force", action="store_true", help="replace an existing identity")
    keygen.set_defaults(func=_cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SwarmError as exc:
        print(f"swarm-peer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
