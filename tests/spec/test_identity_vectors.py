"""spec/vectors/identity.json: the identity puzzle's derived seeds and hashes (section 3)."""

import json
from pathlib import Path

from protocol import PUZZLE_BITS, Identity, satisfies_puzzle
from protocol import PUZZLE_DOMAIN, derive_seed, puzzle_hash

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "identity.json"


def test_identity_vectors_replay():
    doc = json.loads(VECTORS.read_text())
    assert bytes.fromhex(doc["domain"]) == PUZZLE_DOMAIN
    assert doc["bits"] == PUZZLE_BITS
    for entry in doc["identities"]:
        seed = derive_seed(bytes.fromhex(entry["label"]), entry["counter"])
        identity = Identity.from_seed(seed)
        assert seed.hex() == entry["seed"]
        assert identity.peer_id.hex() == entry["peer_id"]
        assert puzzle_hash(identity.peer_id).hex() == entry["puzzle_hash"]
        assert satisfies_puzzle(identity.peer_id) is entry["solves"]


def test_generator_reproduces_identity_vectors(generator):
    text = json.dumps(generator.all_vectors()["identity.json"], indent=1) + "\n"
    assert VECTORS.read_text() == text, "run: python spec/make_vectors.py (identity.json is stale)"
