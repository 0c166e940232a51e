"""Framing on the byte stream and the encrypted message layer (spec/SPEC.md, "Transport").

Theory of operation. The TCP stream is a sequence of frames: a 2-byte big-endian
length, then that many bytes of Noise message (handshake message or transport
ciphertext, at most 65,535 bytes with its 16-byte tag). ``FrameReader`` cuts frames
out of whatever bytes arrive; it keeps one ``bytearray`` and deletes consumed bytes
from its front, which CPython does in O(1) by moving the start pointer, so a stream
fed in any chunking is processed in linear time.

After the handshake the decrypted plaintexts form one byte stream of application
messages, each a 4-byte big-endian length then that many bytes. ``MessageEncoder``
starts every application message in a new Noise message and cuts it into pieces of
at most 65,519 plaintext bytes. ``MessageDecoder`` accepts any cutting (several
messages in one Noise message, a header split across two), checks a declared length
against ``Limits.max_message_size`` before buffering any of its bytes, and collects
the pieces of a long message as memoryviews joined once at the end, so a message
costs one copy whatever its size.

Per-type caps (spec section 6, "Application messages"): given a ``cap(type, id)``
callback (the request multiplexer's, ``Channel.message_cap``), the decoder also
reads the envelope's head, ``[type, id, ...``, from the message's first
``ENVELOPE_HEAD_MAX`` (19) bytes, and refuses the message if its declared length is
above that type's cap, before it buffers more than those bytes. ``incomplete``
tells the shell the declared length of a message being collected, so that it can
account the memory and hold the sender to a deadline (section 15).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from ._cbor import ENVELOPE_HEAD_MAX, envelope_head
from ._limits import DEFAULT_LIMITS, NOISE_MAX_MESSAGE, Limits
from ._noise import TAGLEN, CipherState
from .errors import DecryptError, LimitExceeded, LocalProtocolError, RemoteProtocolError

Buffer = bytes | bytearray | memoryview

__all__ = [
    "APP_HEADER_SIZE",
    "FRAME_HEADER_SIZE",
    "MAX_FRAME_PLAINTEXT",
    "MessageCap",
    "FrameReader",
    "MessageDecoder",
    "MessageEncoder",
    "frame",
]

FRAME_HEADER_SIZE = 2
APP_HEADER_SIZE = 4
#: Plaintext bytes one Noise transport message can carry.
MAX_FRAME_PLAINTEXT = NOISE_MAX_MESSAGE - TAGLEN
#: The largest application message the 4-byte length can declare.
MAX_APP_LENGTH = 2**32 - 1

#: ``cap(type, id)``: the most bytes a message with that envelope head may declare.
MessageCap = Callable[[int, int], int]

_FRAME = struct.Struct(">H")
_APP = struct.Struct(">I")


def frame(noise_message: bytes) -> bytes:
    """``noise_message`` with its 2-byte length prefix."""
    if len(noise_message) > NOISE_MAX_MESSAGE:
        raise LocalProtocolError(f"Noise message of {len(noise_message)} bytes exceeds {NOISE_MAX_MESSAGE}")
    return _FRAME.pack(len(noise_message)) + noise_message


class FrameReader:
    """Cuts 2-byte-length-prefixed frames out of a byte stream fed in any chunks."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        """Bytes received and not yet returned as a frame."""
        return len(self._buf)

    def feed(self, data: Buffer) -> None:
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next complete frame's content, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < FRAME_HEADER_SIZE:
            return None
        end = FRAME_HEADER_SIZE + ((buf[0] << 8) | buf[1])
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            content = view[FRAME_HEADER_SIZE:end].tobytes()
        del buf[:end]
        return content


class MessageEncoder:
    """Encrypts application messages into frames with the sending ``CipherState``."""

    __slots__ = ("_max_size", "cipher")

    def __init__(self, cipher: CipherState, limits: Limits = DEFAULT_LIMITS) -> None:
        self.cipher = cipher
        self._max_size = min(limits.max_message_size, MAX_APP_LENGTH)

    def encode(self, payload: Buffer) -> bytes:
        """The frames that carry ``payload`` as one application message.

        Raises:
            LocalProtocolError: ``payload`` is longer than ``Limits.max_message_size``
                (nothing was encrypted; the connection is still usable).
            NonceExhausted: the sending key has been used 2**64-1 times.
        """
        size = len(memoryview(payload))
        if size > self._max_size:
            raise LocalProtocolError(
                f"application message of {size} bytes exceeds the limit of {self._max_size}"
            )
        encrypt = self.cipher.encrypt_with_ad
        first = MAX_FRAME_PLAINTEXT - APP_HEADER_SIZE
        if size <= first:
            ciphertext = encrypt(b"", _APP.pack(size) + payload)
            return _FRAME.pack(len(ciphertext)) + ciphertext
        view = memoryview(payload)
        pieces = [_APP.pack(size) + view[:first]]
        pieces += [view[i : i + MAX_FRAME_PLAINTEXT].tobytes() for i in range(first, size, MAX_FRAME_PLAINTEXT)]
        out: list[bytes] = []
        for piece in pieces:
            ciphertext = encrypt(b"", piece)
            out.append(_FRAME.pack(len(ciphertext)))
            out.append(ciphertext)
        return b"".join(out)


class MessageDecoder:
    """Decrypts frames with the receiving ``CipherState`` and reassembles messages.

    ``cap`` (optional, settable later): see the module docstring; without it, only
    ``Limits.max_message_size`` bounds a message and its bytes may be anything.
    """

    __slots__ = ("_checked", "_error", "_expected", "_have", "_header", "_max_size", "_parts", "_ready", "cap",
                 "cipher")

    def __init__(self, cipher: CipherState, limits: Limits = DEFAULT_LIMITS, cap: MessageCap | None = None) -> None:
        self.cipher = cipher
        self.cap = cap
        self._max_size = limits.max_message_size
        self._header = bytearray()  # a length header split across Noise messages
        self._expected = -1  # declared length of the message being collected, -1: none
        self._checked = True  # whether that message's envelope head passed its cap
        self._parts: list[memoryview] = []
        self._have = 0
        self._ready: deque[bytes] = deque()
        self._error: RemoteProtocolError | None = None  # raised once the messages before it are taken

    @property
    def buffered(self) -> int:
        """Plaintext bytes held for messages not yet complete (at most the limit + 4)."""
        return len(self._header) + self._have

    @property
    def in_message(self) -> bool:
        """Whether the stream stopped now would cut an application message."""
        return bool(self._header) or self._expected >= 0

    @property
    def incomplete(self) -> int:
        """The declared length of the message being collected (0: none, or it is complete)."""
        return max(self._expected, 0)

    def next_message(self) -> bytes | None:
        """The next complete message, or None.

        Raises:
            LimitExceeded: the stream declared an oversized message after the
                messages already returned.
            DecodeError: a message's first bytes cannot start an envelope (only with ``cap``).
        """
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def _fail(self, error: RemoteProtocolError) -> None:
        self._error = error
        if not self._ready:
            raise error

    def _check(self, head: bytes | memoryview, length: int) -> bool:
        """Whether a message of ``length`` bytes starting with ``head`` is within its cap
        (else the error is recorded, or raised if no message is ready before it)."""
        assert self.cap is not None
        try:
            parsed = envelope_head(head)
        except RemoteProtocolError as exc:
            self._fail(exc)
            return False
        assert parsed is not None  # ENVELOPE_HEAD_MAX bytes always suffice
        cap = self.cap(*parsed)
        if length > cap:
            self._fail(LimitExceeded(
                f"a message of type {parsed[0]} declaring {length} bytes exceeds that type's cap of {cap}"))
            return False
        return True

    def feed_frame(self, ciphertext: bytes) -> None:
        """Decrypt one transport message and queue the messages it completes.

        Raises:
            DecryptError: authentication failed, or the frame is shorter than a tag.
            LimitExceeded: a declared message length exceeds the limit or its type's
                cap. If the same Noise message completed messages before that header,
                they are returned by ``next_message`` first, and it raises the error after.
            DecodeError: with ``cap``, a message whose first bytes are no envelope head
                (reported the same way).
        """
        if self._error is not None:
            raise self._error
        self.feed_plaintext(self.decrypt(ciphertext))

    def decrypt(self, ciphertext: bytes) -> bytes:
        """The plaintext of the next transport message, for ``feed_plaintext``: the
        costly half of ``feed_frame``, which touches nothing but the cipher (a shell
        may run it in a worker thread while nothing else receives).

        Raises:
            DecryptError: authentication failed, or the frame is shorter than a tag.
        """
        if len(ciphertext) < TAGLEN:
            raise DecryptError(f"transport frame of {len(ciphertext)} bytes is shorter than its tag")
        return self.cipher.decrypt_with_ad(b"", ciphertext)

    def feed_plaintext(self, plaintext: bytes) -> None:
        """Queue the messages one decrypted transport message completes (the rest of
        ``feed_frame``; plaintexts in the order ``decrypt`` returned them)."""
        if self._error is not None:
            raise self._error
        pos, end = 0, len(plaintext)
        while pos < end:
            if self._expected < 0:
                if not self._header and end - pos >= APP_HEADER_SIZE:
                    (length,) = _APP.unpack_from(plaintext, pos)
                    pos += APP_HEADER_SIZE
                else:
                    take = min(APP_HEADER_SIZE - len(self._header), end - pos)
                    self._header += plaintext[pos : pos + take]
                    pos += take
                    if len(self._header) < APP_HEADER_SIZE:
                        break
                    (length,) = _APP.unpack(self._header)
                    self._header.clear()
                if length > self._max_size:
                    self._fail(LimitExceeded(
                        f"application message of {length} bytes exceeds the limit of {self._max_size}"))
                    return
                # A message shorter than an envelope head cannot be costly: no cap to check.
                checked = self.cap is None or length < ENVELOPE_HEAD_MAX
                if not checked and end - pos >= ENVELOPE_HEAD_MAX:  # the head is here: check in place
                    if not self._check(memoryview(plaintext)[pos : pos + ENVELOPE_HEAD_MAX], length):
                        return
                    checked = True
                if checked and end - pos >= length:  # the common case: the whole message is here
                    self._ready.append(plaintext[pos : pos + length])
                    pos += length
                else:
                    self._expected = length
                    self._checked = checked
            else:
                take = min(end - pos, self._expected - self._have)
                if not self._checked:  # collect only the envelope head until it passed
                    take = min(take, ENVELOPE_HEAD_MAX - self._have)
                self._parts.append(memoryview(plaintext)[pos : pos + take])
                self._have += take
                pos += take
                if not self._checked and self._have >= ENVELOPE_HEAD_MAX:
                    head = b"".join(self._parts)
                    self._parts = [memoryview(head)]
                    if not self._check(head, self._expected):
                        return
                    self._checked = True
                if self._have == self._expected:
                    self._ready.append(b"".join(self._parts))
                    self._parts.clear()
                    self._have = 0
                    self._expected = -1
                    self._checked = True
