"""Peer identities: Ed25519 key pairs (spec/SPEC.md, "Identity").

A peer id is BLAKE2b-160 of the 32-byte Ed25519 public key; it is also the peer's
Kademlia node id. Key files hold the 32-byte seed, hex encoded with a header line,
are written atomically (temp file, fsync, rename) with mode 0600, and are refused if
other users can read them or if their content is not a key.

The identity puzzle (S/Kademlia's static puzzle, section 4.2 of Baumgart and Mies):
a peer id is valid only if ``BLAKE2b-256(PUZZLE_DOMAIN || peer_id)`` starts with
``PUZZLE_BITS`` zero bits. Checking costs one hash; minting costs about
``2 ** PUZZLE_BITS`` key generations (a fraction of a second on one core), so a flood
of fresh identities costs CPU time in proportion to its size. ``Identity.generate``
searches random seeds until the puzzle holds; ``Identity.derive`` searches
deterministically (test vectors, tests).
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

__all__ = [
    "Identity",
    "peer_id_of",
    "verify_signature",
    "satisfies_puzzle",
    "puzzle_hash",
    "derive_seed",
    "derive_counter",
    "PEER_ID_SIZE",
    "PUBLIC_KEY_SIZE",
    "PUZZLE_BITS",
    "PUZZLE_DOMAIN",
]

PEER_ID_SIZE = 20
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_KEY_FILE_HEADER = "swarm-peer ed25519 seed v1"
#: Leading zero bits the puzzle hash of a valid peer id has (spec "Identity").
PUZZLE_BITS = 12
PUZZLE_DOMAIN = b"swarm/1/id-puzzle:"
_DERIVE_DOMAIN = b"swarm/1/derive-seed:"


def peer_id_of(public_key: bytes) -> bytes:
    """The 20-byte peer id of an Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, not {len(public_key)}")
    return hashlib.blake2b(public_key, digest_size=PEER_ID_SIZE).digest()


def puzzle_hash(peer_id: bytes) -> bytes:
    """``BLAKE2b-256(PUZZLE_DOMAIN || peer_id)``, whose leading bits the puzzle constrains."""
    return hashlib.blake2b(PUZZLE_DOMAIN + peer_id, digest_size=32).digest()


def satisfies_puzzle(peer_id: bytes, bits: int = PUZZLE_BITS) -> bool:
    """Whether ``peer_id`` solves the identity puzzle: its puzzle hash starts with
    ``bits`` zero bits (big-endian bit order)."""
    if len(peer_id) != PEER_ID_SIZE:
        return False
    return int.from_bytes(puzzle_hash(peer_id)[:4], "big") >> (32 - bits) == 0 if bits else True


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
    def generate(cls, *, bits: int = PUZZLE_BITS) -> Identity:
        """A new random identity whose peer id solves the puzzle (about ``2 ** bits``
        key generations: a fraction of a second on one core)."""
        while True:
            identity = cls(nacl.signing.SigningKey.generate())
            if satisfies_puzzle(identity.peer_id, bits):
                return identity

    @classmethod
    def derive(cls, label: bytes, *, start: int = 0, bits: int = PUZZLE_BITS) -> Identity:
        """The deterministic identity of ``label``: the seed ``derive_seed(label,
        counter)`` for the first ``counter >= start`` whose peer id solves the puzzle.
        Passing the known counter (``derive_counter``) as ``start`` skips the search."""
        return cls.from_seed(derive_seed(label, derive_counter(label, start=start, bits=bits)))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte seed, puzzle or not (key files are checked by
        ``load``; peers' ids by the handshake)."""
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
        identity = cls.from_seed(seed)
        if not satisfies_puzzle(identity.peer_id):
            raise IdentityError(
                f"identity file {path} holds a key whose peer id does not solve the identity puzzle "
                f"(made by an older swarm-peer); run 'swarm-peer keygen --force' to replace it"
            )
        return identity

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


def derive_seed(label: bytes, counter: int) -> bytes:
    """``BLAKE2b-256(b"swarm/1/derive-seed:" || label || counter)``, the counter as 4
    big-endian bytes: the candidate seeds ``Identity.derive`` tries in order."""
    return hashlib.blake2b(_DERIVE_DOMAIN + label + counter.to_bytes(4, "big"), digest_size=32).digest()


def derive_counter(label: bytes, *, start: int = 0, bits: int = PUZZLE_BITS) -> int:
    """The first counter from ``start`` whose derived seed's peer id solves the puzzle."""
    counter = start
    while not satisfies_puzzle(peer_id_of(bytes(nacl.signing.SigningKey(derive_seed(label, counter)).verify_key)),
                               bits):
        counter += 1
    return counter


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
