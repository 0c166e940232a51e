"""Peer identities: Ed25519 key pairs (spec/SPEC.md, "Identity").

A peer id is BLAKE2b-160 of the 32-byte Ed25519 public key; it is also the peer's
Kademlia node id. Key files hold the 32-byte seed, hex encoded with a header line,
are written atomically (temp file, fsync, rename) with mode 0600, and are refused if
other users can read them or if their content is not a key.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import nacl.exceptions
import nacl.signing

from .errors import BadSignature, IdentityError

__all__ = ["Identity", "peer_id_of", "verify_signature", "PEER_ID_SIZE", "PUBLIC_KEY_SIZE"]

PEER_ID_SIZE = 20
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_KEY_FILE_HEADER = "swarm-peer ed25519 seed v1"


def peer_id_of(public_key: bytes) -> bytes:
    """The 20-byte peer id of an Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, not {len(public_key)}")
    return hashlib.blake2b(public_key, digest_size=PEER_ID_SIZE).digest()


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature. Raises BadSignature if it does not verify."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise BadSignature("malformed public key or signature")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise BadSignature("signature does not verify") from None


class Identity:
    """An Ed25519 signing key and the peer id derived from it."""

    __slots__ = ("_signing_key", "public_key", "peer_id")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.peer_id: bytes = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (test vectors, tests)."""
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed has 32 bytes, not {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._signing_key.sign(message).signature

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id.hex()})"

    # -- files ------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file. Raises IdentityError if missing, corrupt or not private."""
        path = Path(path)
        try:
            st = path.stat()
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise IdentityError(f"identity file {path} does not exist (create it with 'swarm-peer keygen')") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"cannot read identity file {path}: {exc}") from None
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"identity file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run 'chmod 600 {path}'"
            )
        lines = text.split()
        if len(lines) != len(_KEY_FILE_HEADER.split()) + 1 or " ".join(lines[:-1]) != _KEY_FILE_HEADER:
            raise IdentityError(f"identity file {path} is not a swarm-peer key file")
        try:
            seed = bytes.fromhex(lines[-1])
        except ValueError:
            raise IdentityError(f"identity file {path} is corrupt (bad hex)") from None
        if len(seed) != 32:
            raise IdentityError(f"identity file {path} is corrupt (seed of {len(seed)} bytes)")
        return cls.from_seed(seed)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically with mode 0600."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, f"{_KEY_FILE_HEADER}\n{self.seed.hex()}\n".encode(), mode=0o600)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key file at ``path``, creating a new identity there if it is absent."""
        if not Path(path).exists():
            identity = cls.generate()
            identity.save(path)
            return identity
        return cls.load(path)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
