"""The Noise Protocol Framework, revision 34, for ``Noise_XX_25519_ChaChaPoly_SHA256``
(spec/SPEC.md, "Handshake").

Theory of operation: the three objects of the Noise spec (section 5), named as there.
``CipherState`` holds a ChaCha20-Poly1305 key and a 64-bit counter; the 96-bit IETF
nonce is 4 zero bytes then the counter little-endian (section 12.3). The counter
value 2**64-1 is reserved (section 5.1): reaching it is an error, never a wrap.
``SymmetricState`` holds the chaining key ``ck`` and the handshake hash ``h`` and
derives keys with HKDF over HMAC-SHA256 (section 4.3). ``HandshakeState`` runs a
pattern's message tokens for one role. Only patterns without pre-messages or PSKs
are supported: XX, which the swarm uses, and NN, kept because the published test
vectors cover it and it exercises the same code with fewer tokens.

X25519 and the AEAD come from libsodium through PyNaCl's low-level bindings; they
do not check argument lengths for X25519, so this module does. libsodium refuses a
DH result of all zeros (a low-order public key); that aborts the handshake, which
section 12.1 allows.

Errors: a failed authentication is ``DecryptError``; a message too short for its
tokens or an invalid public key is ``HandshakeError``; encrypting with an exhausted
counter is ``NonceExhausted`` (the caller must stop sending on that key).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import nacl.bindings
import nacl.exceptions
import nacl.utils

from .errors import DecryptError, HandshakeError, LocalProtocolError

__all__ = [
    "DHLEN",
    "HASHLEN",
    "MAX_NONCE",
    "PATTERNS",
    "TAGLEN",
    "CipherState",
    "HandshakeState",
    "NonceExhausted",
    "SymmetricState",
    "dh",
    "generate_private_key",
    "hkdf",
    "public_key_of",
]

DHLEN = 32
HASHLEN = 32
TAGLEN = 16
#: The reserved counter value (Noise section 5.1): no message may use it.
MAX_NONCE = 2**64 - 1

#: Message patterns (Noise section 7.5), without pre-messages.
PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "NN": (("e",), ("e", "ee")),
    "XX": (("e",), ("e", "ee", "s", "es"), ("s", "se")),
}

_NONCE = struct.Struct("<4xQ")
_aead_encrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt
_aead_decrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt


class NonceExhausted(LocalProtocolError):
    """This side has sent 2**64-1 messages with one key; it must not send any more."""


# -- primitives (Noise section 4) ----------------------------------------------


def generate_private_key() -> bytes:
    """A fresh X25519 private key (32 random bytes; X25519 clamps them itself)."""
    return nacl.utils.random(DHLEN)


def public_key_of(private_key: bytes) -> bytes:
    """The X25519 public key of ``private_key``."""
    if not isinstance(private_key, bytes) or len(private_key) != DHLEN:
        raise ValueError(f"an X25519 private key is {DHLEN} bytes")
    return nacl.bindings.crypto_scalarmult_base(private_key)


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """X25519. Raises HandshakeError for a public key that gives the all-zero result."""
    if len(private_key) != DHLEN or len(public_key) != DHLEN:
        raise HandshakeError(f"X25519 keys are {DHLEN} bytes")
    try:
        return nacl.bindings.crypto_scalarmult(private_key, public_key)
    except nacl.exceptions.RuntimeError:
        raise HandshakeError("X25519 with a low-order public key") from None


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    """HKDF of Noise section 4.3: 2 or 3 outputs of HASHLEN bytes each."""
    temp_key = _hmac(chaining_key, input_key_material)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp_key, out2 + b"\x03")


# -- CipherState (Noise section 5.1) -------------------------------------------


class CipherState:
    """A ChaCha20-Poly1305 key ``k`` (or none) and its message counter ``n``."""

    __slots__ = ("_key", "n")

    def __init__(self, key: bytes | None = None, n: int = 0) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("a CipherState key is 32 bytes")
        self._key = key
        self.n = n

    def has_key(self) -> bool:
        return self._key is not None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and advance the counter; without a key, return ``plaintext``.

        Raises:
            NonceExhausted: the counter reached 2**64-1.
        """
        if self._key is None:
            return plaintext
        n = self.n
        if n >= MAX_NONCE:
            raise NonceExhausted("Noise nonce exhausted: no more messages can be sent on this connection")
        ciphertext = _aead_encrypt(plaintext, ad, _NONCE.pack(n), self._key)
        self.n = n + 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt, advancing the counter only on success.

        Raises:
            DecryptError: authentication failed (tampered, replayed, reordered,
                truncated) or the counter reached 2**64-1.
        """
        if self._key is None:
            return ciphertext
        n = self.n
        if n >= MAX_NONCE:
            raise DecryptError("Noise nonce exhausted: the peer sent more messages than a key allows")
        try:
            plaintext = _aead_decrypt(ciphertext, ad, _NONCE.pack(n), self._key)
        except nacl.exceptions.CryptoError:
            raise DecryptError(f"Noise message {n} failed authentication") from None
        self.n = n + 1
        return plaintext


# -- SymmetricState (Noise section 5.2) ----------------------------------------


class SymmetricState:
    """The chaining key, the handshake hash and the current handshake cipher."""

    __slots__ = ("cipher", "ck", "h")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher = CipherState(temp_k[:32])

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return CipherState(temp_k1[:32]), CipherState(temp_k2[:32])


# -- HandshakeState (Noise section 5.3) ----------------------------------------


class HandshakeState:
    """One side of a Noise handshake for a pattern of ``PATTERNS``.

    ``static_private_key`` is needed for patterns with an ``s`` token. Passing
    ``ephemeral_private_key`` makes the run deterministic (test vectors only: an
    ephemeral key must never be reused).
    """

    __slots__ = (
        "_ciphers",
        "_e",
        "_e_pub",
        "_index",
        "_messages",
        "_re",
        "_rs",
        "_s",
        "_s_pub",
        "_symmetric",
        "initiator",
        "protocol_name",
    )

    def __init__(
        self,
        pattern: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        static_private_key: bytes | None = None,
        ephemeral_private_key: bytes | None = None,
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"unsupported Noise pattern {pattern!r}")
        self.protocol_name = f"Noise_{pattern}_25519_ChaChaPoly_SHA256"
        self.initiator = initiator
        self._messages = PATTERNS[pattern]
        self._index = 0
        self._symmetric = SymmetricState(self.protocol_name.encode("ascii"))
        self._symmetric.mix_hash(prologue)
        self._s = static_private_key
        self._s_pub = public_key_of(static_private_key) if static_private_key is not None else None
        self._e = ephemeral_private_key
        self._e_pub = public_key_of(ephemeral_private_key) if ephemeral_private_key is not None else None
        self._rs: bytes | None = None
        self._re: bytes | None = None
        self._ciphers: tuple[CipherState, CipherState] | None = None
        if self._s is None and any("s" in m for m in self._messages):
            raise ValueError(f"pattern {pattern} needs a static key")

    # -- read-only views -------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._ciphers is not None

    @property
    def handshake_hash(self) -> bytes:
        """``h``; after the last message it is the channel binding value (section 11.2)."""
        return self._symmetric.h

    @property
    def static_public_key(self) -> bytes | None:
        return self._s_pub

    @property
    def remote_static(self) -> bytes | None:
        return self._rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        return self._re

    def is_my_turn(self) -> bool:
        """Whether the next message of the pattern is ours to write."""
        return (self._index % 2 == 0) == self.initiator

    def split(self) -> tuple[CipherState, CipherState]:
        """(sending, receiving) cipher states once the handshake is complete."""
        if self._ciphers is None:
            raise LocalProtocolError("the Noise handshake is not complete")
        c1, c2 = self._ciphers
        return (c1, c2) if self.initiator else (c2, c1)

    # -- messages --------------------------------------------------------------

    def _next_tokens(self, writing: bool) -> tuple[str, ...]:
        if self._ciphers is not None or self._index >= len(self._messages):
            raise LocalProtocolError("the Noise handshake is already complete")
        if self.is_my_turn() != writing:
            raise LocalProtocolError("it is not this side's turn to " + ("write" if writing else "read"))
        return self._messages[self._index]

    def _dh_token(self, token: str) -> bytes:
        # "es" is DH(initiator e, responder s): each side uses its own half.
        first, second = token[0], token[1]
        if self.initiator:
            local, remote = (self._e if first == "e" else self._s), (self._re if second == "e" else self._rs)
        else:
            local, remote = (self._e if second == "e" else self._s), (self._re if first == "e" else self._rs)
        assert local is not None
        assert remote is not None
        return dh(local, remote)

    def _finish_message(self) -> None:
        self._index += 1
        if self._index == len(self._messages):
            self._ciphers = self._symmetric.split()

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message carrying ``payload``."""
        tokens = self._next_tokens(writing=True)
        sym = self._symmetric
        parts: list[bytes] = []
        for token in tokens:
            if token == "e":
                if self._e is None:
                    self._e = generate_private_key()
                    self._e_pub = public_key_of(self._e)
                assert self._e_pub is not None
                parts.append(self._e_pub)
                sym.mix_hash(self._e_pub)
            elif token == "s":
                assert self._s_pub is not None
                parts.append(sym.encrypt_and_hash(self._s_pub))
            else:
                sym.mix_key(self._dh_token(token))
        parts.append(sym.encrypt_and_hash(payload))
        self._finish_message()
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; return its payload.

        Raises:
            HandshakeError: the message is too short or carries an invalid key.
            DecryptError: an encrypted part failed authentication.
        """
        tokens = self._next_tokens(writing=False)
        sym = self._symmetric
        pos = 0
        for token in tokens:
            if token == "e":
                if len(message) - pos < DHLEN:
                    raise HandshakeError("Noise handshake message too short for an ephemeral key")
                self._re = message[pos : pos + DHLEN]
                pos += DHLEN
                sym.mix_hash(self._re)
            elif token == "s":
                size = DHLEN + (TAGLEN if sym.cipher.has_key() else 0)
                if len(message) - pos < size:
                    raise HandshakeError("Noise handshake message too short for a static key")
                self._rs = sym.decrypt_and_hash(message[pos : pos + size])
                pos += size
            else:
                sym.mix_key(self._dh_token(token))
        rest = message[pos:]
        if sym.cipher.has_key() and len(rest) < TAGLEN:
            raise HandshakeError("Noise handshake message too short for its payload tag")
        payload = sym.decrypt_and_hash(rest)
        self._finish_message()
        return payload
