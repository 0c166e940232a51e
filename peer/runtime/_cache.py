"""On-disk cache: converted GGUF tensors, tokenizers and file digests.

Root: ``$SWARM_PEER_CACHE`` if set, else ``$XDG_CACHE_HOME/swarm-peer``, else
``~/.cache/swarm-peer``. Everything is written atomically (temp file + rename), so a
crash leaves the old entry or the new one, never half of one; entries are keyed by
the SHA-256 of the source file, so a changed source never meets a stale entry.

File digests are SHA-256 (the same value the Hugging Face Hub shows as a weight
file's LFS oid, so a local copy and a hub copy of one model get one model id).
Hashing gigabytes on every start would be slow, so digests are memoised in
``digests.json`` keyed by (absolute path, size, mtime_ns).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from protocol import atomic_write

__all__ = ["cache_root", "file_sha256", "atomic_write", "atomic_dir"]

_MEMO_NAME = "digests.json"


def cache_root() -> Path:
    """The cache directory (created on first use)."""
    env = os.environ.get("SWARM_PEER_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "swarm-peer"
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, memoised by (path, size, mtime_ns)."""
    path = path.resolve()
    st = path.stat()
    key = str(path)
    stamp = [st.st_size, st.st_mtime_ns]
    memo_path = cache_root() / _MEMO_NAME
    memo = _read_memo(memo_path)
    hit = memo.get(key)
    if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
        return str(hit[2])
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo = _read_memo(memo_path)  # re-read: another process may have added entries
    memo[key] = [*stamp, digest]
    try:
        atomic_write(memo_path, json.dumps(memo, sort_keys=True).encode())
    except OSError:
        pass  # a read-only cache only costs us re-hashing next time
    return digest


def _read_memo(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class atomic_dir:
    """Context manager that builds a directory in a temp sibling and renames it into place.

    If ``final`` appears meanwhile (another process won the race) the new copy is
    dropped: both were built from the same keyed source.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}."))
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.tmp is not None
        if exc_type is None:
            try:
                os.replace(self.tmp, self.final)
                return
            except OSError:
                if not self.final.is_dir():
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
        shutil.rmtree(self.tmp, ignore_errors=True)
