"""The identity puzzle (protocol/_identity.py, spec section 3): minting costs, checking
is one hash, and every place a peer id arrives refuses one that does not solve it."""

from __future__ import annotations

import hashlib

import pytest

from protocol import PUZZLE_BITS, Identity, IdentityError, satisfies_puzzle
from protocol._handshake import Handshake, HandshakeError, Role
from protocol._identity import PUZZLE_DOMAIN, derive_counter, derive_seed, puzzle_hash

CHEAP = Identity.from_seed(bytes(32))  # a key nobody searched for: its id fails the puzzle


def test_the_puzzle_is_leading_zero_bits_of_a_domain_separated_hash():
    assert PUZZLE_BITS == 12
    assert PUZZLE_DOMAIN == b"swarm/1/id-puzzle:"
    for identity in (Identity.generate(), CHEAP):
        digest = hashlib.blake2b(PUZZLE_DOMAIN + identity.peer_id, digest_size=32).digest()
        assert puzzle_hash(identity.peer_id) == digest
        assert satisfies_puzzle(identity.peer_id) == (int.from_bytes(digest, "big") >> (256 - PUZZLE_BITS) == 0)
    assert not satisfies_puzzle(CHEAP.peer_id)
    assert satisfies_puzzle(CHEAP.peer_id, bits=0)
    assert not satisfies_puzzle(b"short")


def test_derive_is_a_deterministic_search_and_start_skips_it():
    label = b"test label"
    counter = derive_counter(label)
    identity = Identity.derive(label)
    assert identity.seed == derive_seed(label, counter)
    assert satisfies_puzzle(identity.peer_id)
    assert all(not satisfies_puzzle(Identity.from_seed(derive_seed(label, c)).peer_id) for c in range(counter))
    assert Identity.derive(label, start=counter).seed == identity.seed


def test_the_handshake_refuses_a_peer_id_without_a_solved_puzzle():
    for initiator, responder in ((CHEAP, Identity.generate()), (Identity.generate(), CHEAP)):
        a, b = Handshake(initiator, Role.INITIATOR), Handshake(responder, Role.RESPONDER)
        b.read_message(a.write_message())
        if responder is CHEAP:  # the initiator checks the responder's payload in message 2
            with pytest.raises(HandshakeError, match="identity puzzle"):
                a.read_message(b.write_message())
        else:  # the responder checks the initiator's in message 3
            a.read_message(b.write_message())
            with pytest.raises(HandshakeError, match="keygen --force"):
                b.read_message(a.write_message())


def test_an_old_key_file_that_fails_the_puzzle_says_to_make_a_new_one(tmp_path):
    path = tmp_path / "identity.key"
    CHEAP.save(path)
    with pytest.raises(IdentityError, match=r"run 'swarm-peer keygen --force'"):
        Identity.load(path)
    with pytest.raises(IdentityError, match="identity puzzle"):
        Identity.load_or_create(path)
    Identity.generate().save(path)
    assert satisfies_puzzle(Identity.load(path).peer_id)
