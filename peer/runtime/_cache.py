"""On-disk cache: converted GGUF tensors, tokenizers and file digests.

Root: ``$SWARM_PEER_CACHE`` if set, else ``$XDG_CACHE_HOME/swarm-peer``, else
``~/.cache/swarm-peer``, created mode 0700 (an existing root open to others is
tightened to 0700: whoever can write converted weights decides what this peer serves
under the model's id). Everything is written atomically (temp file + rename), so a
crash leaves the old entry or the new one, never half of one; entries are keyed by
the SHA-256 of the source file, so a changed source never meets a stale entry.

Converted entries are also checked on load (``HashManifest``): a manifest next to them
holds the SHA-256 of each entry's bytes as written, keyed by the source file's digest;
an entry whose bytes differ (tampered with, or damaged on disk) is converted again.

File digests are SHA-256 (the same value the Hugging Face Hub shows as a weight
file's LFS oid, so a local copy and a hub copy of one model get one model id).
Hashing gigabytes on every start would be slow, so digests are memoised in
``digests.json`` keyed by (absolute path, size, mtime_ns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: concurrent writers may drop each other's manifest entries (re-converted later)
    fcntl = None  # type: ignore[assignment]

__all__ = ["cache_root", "file_sha256", "atomic_write", "atomic_dir", "HashManifest"]

log = logging.getLogger("swarm.runtime")

_MEMO_NAME = "digests.json"
_MANIFEST_FORMAT = 1


def cache_root() -> Path:
    """The cache directory (created on first use)."""
    env = os.environ.get("SWARM_PEER_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "swarm-peer"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = root.stat()
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(root, stat.S_IMODE(st.st_mode) & 0o700)
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


class HashManifest:
    """SHA-256 of each converted entry in a cache directory, for the source ``source_digest``.

    Stored as ``hashes.json`` (``{"format", "source", "entries": {name: sha256}}``) in the
    entry directory. A manifest recorded for another source is ignored whole. Updates
    are read-merge-write under an advisory lock, so processes converting different
    blocks of one model at once keep each other's entries.

    This catches entries changed behind the runtime's back (a damaged disk, or an edit
    of one block file); someone who can rewrite the whole directory could rewrite the
    manifest too, which is why the cache root is 0700.
    """

    NAME = "hashes.json"

    def __init__(self, directory: Path, source_digest: str) -> None:
        self.directory = directory
        self.path = directory / self.NAME
        self.source = source_digest

    def _entries(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT or data.get("source") != self.source:
            return {}
        entries = data.get("entries")
        return {k: v for k, v in entries.items() if isinstance(v, str)} if isinstance(entries, dict) else {}

    def check(self, name: str) -> bool | None:
        """True if the entry file ``name`` holds what was recorded for it, False if it differs
        (or cannot be read), None if nothing was recorded (an entry from before manifests,
        or a lost update)."""
        expected = self._entries().get(name)
        if expected is None:
            return None
        try:
            with (self.directory / name).open("rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest() == expected
        except OSError:
            return False

    def record(self, name: str, data: bytes) -> None:
        """Record ``data``'s hash for ``name`` (an unwritable cache is silently skipped)."""
        try:
            with self._locked():
                entries = self._entries()
                entries[name] = hashlib.sha256(data).hexdigest()
                body = {"format": _MANIFEST_FORMAT, "source": self.source, "entries": entries}
                atomic_write(self.path, json.dumps(body, sort_keys=True).encode(), mode=0o600)
        except OSError:
            pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        fd = os.open(self.directory, os.O_RDONLY)  # the entry directory itself is the lock: no extra file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
