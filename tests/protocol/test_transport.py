"""Transport framing: 2-byte frames of Noise ciphertext carrying 4-byte-length
application messages (spec/SPEC.md, "Transport")."""

import os
import struct

import pytest

from protocol._limits import Limits
from protocol._noise import MAX_NONCE, CipherState, NonceExhausted
from protocol._transport import (
    MAX_FRAME_PLAINTEXT,
    FrameReader,
    MessageDecoder,
    MessageEncoder,
    frame,
)
from protocol.errors import DecryptError, LimitExceeded, LocalProtocolError

KEY = bytes(range(32))


def channel(limits=None):
    limits = limits or Limits()
    return MessageEncoder(CipherState(KEY), limits), MessageDecoder(CipherState(KEY), limits)


def frames_of(data: bytes) -> list[bytes]:
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (content := reader.next_frame()) is not None:
        out.append(content)
    assert len(reader) == 0
    return out


def deliver(decoder: MessageDecoder, data: bytes) -> list[bytes]:
    for content in frames_of(data):
        decoder.feed_frame(content)
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


@pytest.mark.parametrize(
    ("size", "frames"),
    [(0, 1), (1, 1), (65515, 1), (65516, 2), (65519, 2), (65520, 2), (65515 + 65519, 2), (65515 + 65520, 3),
     (1 << 20, 17)],
)
def test_round_trip_and_frame_count(size, frames):
    encoder, decoder = channel()
    payload = os.urandom(size)
    data = encoder.encode(payload)
    contents = frames_of(data)
    assert len(contents) == frames
    assert all(16 < len(c) <= 65535 for c in contents)
    assert len(data) == size + 4 + frames * (2 + 16)
    assert deliver(decoder, data) == [payload]
    assert decoder.buffered == 0
    assert not decoder.in_message


def test_messages_in_sequence_share_the_counter():
    encoder, decoder = channel()
    payloads = [os.urandom(n) for n in (5, 70000, 0, 3)]
    data = b"".join(encoder.encode(p) for p in payloads)
    assert deliver(decoder, data) == payloads
    assert encoder.cipher.n == decoder.cipher.n == 1 + 2 + 1 + 1


def test_first_frame_layout():
    encoder = MessageEncoder(CipherState(KEY))
    data = encoder.encode(b"abc")
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2 == 4 + 3 + 16
    assert CipherState(KEY).decrypt_with_ad(b"", data[2:]) == b"\x00\x00\x00\x03abc"


def test_size_limit_on_send_and_receive():
    limits = Limits(max_message_size=1000)
    encoder, decoder = channel(limits)
    assert deliver(decoder, encoder.encode(bytes(1000))) == [bytes(1000)]
    with pytest.raises(LocalProtocolError):
        encoder.encode(bytes(1001))
    assert encoder.cipher.n == 1  # nothing was encrypted: the channel is still usable
    big_encoder = MessageEncoder(CipherState(KEY), Limits())
    big_encoder.cipher.n = 1
    data = big_encoder.encode(bytes(1001))
    with pytest.raises(LimitExceeded):
        deliver(decoder, data)
    assert decoder.buffered == 0  # refused before buffering a byte of it


def test_declared_length_is_checked_before_the_body_arrives():
    decoder = MessageDecoder(CipherState(KEY), Limits(max_message_size=10))
    sender = CipherState(KEY)
    with pytest.raises(LimitExceeded):
        decoder.feed_frame(sender.encrypt_with_ad(b"", struct.pack(">I", 2**32 - 1)))


def test_decoder_accepts_any_cutting_of_the_plaintext_stream():
    """Another implementation may pack messages together or split a header."""
    sender = CipherState(KEY)
    decoder = MessageDecoder(CipherState(KEY))
    stream = b"".join(struct.pack(">I", len(p)) + p for p in (b"one", b"", b"three", b"x" * 100))
    for piece in (stream[:2], stream[2:9], b"", stream[9:10], stream[10:]):
        decoder.feed_frame(sender.encrypt_with_ad(b"", piece))
    assert [decoder.next_message() for _ in range(5)] == [b"one", b"", b"three", b"x" * 100, None]


def test_partial_message_state():
    encoder, decoder = channel()
    contents = frames_of(encoder.encode(bytes(100000)))
    decoder.feed_frame(contents[0])
    assert decoder.in_message
    assert decoder.buffered == MAX_FRAME_PLAINTEXT - 4
    assert decoder.next_message() is None
    decoder.feed_frame(contents[1])
    assert not decoder.in_message
    assert decoder.next_message() == bytes(100000)


def test_tampered_byte_anywhere_in_a_frame():
    encoder, _ = channel()
    content = frames_of(encoder.encode(b"hello world"))[0]
    for position in range(len(content)):
        tampered = bytearray(content)
        tampered[position] ^= 0x01
        decoder = MessageDecoder(CipherState(KEY))
        with pytest.raises(DecryptError):
            decoder.feed_frame(bytes(tampered))
        assert decoder.cipher.n == 0


def test_replayed_and_reordered_frames():
    encoder, decoder = channel()
    first, second = frames_of(encoder.encode(b"a") + encoder.encode(b"b"))
    decoder.feed_frame(first)
    with pytest.raises(DecryptError):
        decoder.feed_frame(first)  # replay
    encoder, decoder = channel()
    first, second = frames_of(encoder.encode(b"a") + encoder.encode(b"b"))
    with pytest.raises(DecryptError):
        decoder.feed_frame(second)  # reordered


@pytest.mark.parametrize("size", [0, 1, 15])
def test_frame_shorter_than_a_tag(size):
    _, decoder = channel()
    with pytest.raises(DecryptError):
        decoder.feed_frame(bytes(size))


def test_truncated_ciphertext():
    encoder, decoder = channel()
    content = frames_of(encoder.encode(b"hello"))[0]
    with pytest.raises(DecryptError):
        decoder.feed_frame(content[:-1])


def test_nonce_exhaustion_is_typed_and_never_wraps():
    encoder, decoder = channel()
    encoder.cipher.n = decoder.cipher.n = MAX_NONCE - 1
    assert deliver(decoder, encoder.encode(b"last")) == [b"last"]  # n = 2**64-2 is the last usable
    with pytest.raises(NonceExhausted):
        encoder.encode(b"one too many")
    assert encoder.cipher.n == MAX_NONCE
    assert isinstance(NonceExhausted("x"), LocalProtocolError)
    forged = CipherState(KEY, MAX_NONCE - 1).encrypt_with_ad(b"", b"")  # a valid-looking frame
    with pytest.raises(DecryptError, match="exhausted"):
        decoder.feed_frame(forged)


def test_frame_reader_any_chunking():
    data = b"".join(frame(bytes([n % 256]) * n) for n in (0, 1, 300, 65535))
    whole = frames_of(data)
    for step in (1, 2, 3, 1000):
        reader = FrameReader()
        got = []
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
            while (content := reader.next_frame()) is not None:
                got.append(content)
        assert got == whole
        assert len(reader) == 0
    assert [len(c) for c in whole] == [0, 1, 300, 65535]


def test_frame_refuses_oversized_noise_messages():
    assert frame(bytes(65535))[:2] == b"\xff\xff"
    with pytest.raises(LocalProtocolError):
        frame(bytes(65536))


def test_encoder_accepts_bytearray_and_memoryview():
    encoder, decoder = channel()
    data = encoder.encode(bytearray(b"ab")) + encoder.encode(memoryview(b"x" * 70000))
    assert deliver(decoder, data) == [b"ab", b"x" * 70000]


def test_messages_before_an_oversized_header_are_delivered_first():
    sender = CipherState(KEY)
    decoder = MessageDecoder(CipherState(KEY), Limits(max_message_size=10))
    decoder.feed_frame(sender.encrypt_with_ad(b"", b"\x00\x00\x00\x02ok" + struct.pack(">I", 11)))
    assert decoder.next_message() == b"ok"
    with pytest.raises(LimitExceeded):
        decoder.next_message()
    with pytest.raises(LimitExceeded):
        decoder.feed_frame(sender.encrypt_with_ad(b"", b"more"))
