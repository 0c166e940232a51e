import hashlib
import os

import pytest

from protocol import BadSignature, Identity, IdentityError, peer_id_of, verify_signature


def test_peer_id_is_blake2b_160_of_public_key():
    ident = Identity.from_seed(bytes(32))
    assert ident.peer_id == hashlib.blake2b(ident.public_key, digest_size=20).digest()
    assert peer_id_of(ident.public_key) == ident.peer_id


def test_sign_and_verify():
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    verify_signature(ident.public_key, b"hello", sig)
    with pytest.raises(BadSignature):
        verify_signature(ident.public_key, b"hellO", sig)
    with pytest.raises(BadSignature):
        verify_signature(Identity.generate().public_key, b"hello", sig)
    with pytest.raises(BadSignature):
        verify_signature(ident.public_key, b"hello", sig[:10])


def test_key_file_round_trip_is_private_and_atomic(tmp_path):
    path = tmp_path / "sub" / "id.key"
    ident = Identity.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Identity.load(path).peer_id == ident.peer_id
    assert Identity.load_or_create(path).peer_id == ident.peer_id
    assert [p.name for p in path.parent.iterdir()] == ["id.key"]  # no temp file left behind


def test_key_file_errors(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "missing")
    path = tmp_path / "k"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)
    for content in ["garbage", "swarm-peer ed25519 seed v1\nzz", "swarm-peer ed25519 seed v1\n00ff", "\x00\xff"]:
        path.write_text(content, encoding="latin-1")
        os.chmod(path, 0o600)
        with pytest.raises(IdentityError):
            Identity.load(path)
