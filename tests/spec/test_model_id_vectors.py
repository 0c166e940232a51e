"""spec/vectors/model-id.json, recomputed from the files as a third party would (spec
section 1, "Model id"): the JSON-to-CBOR rule is written out here again from the spec's
text rather than taken from ``protocol``, and the weight file's manifest and SHA-256
come from its own bytes."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from protocol import cbor_encode, make_model_id, model_id_document

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "model-id.json"
SPEC = Path(__file__).resolve().parents[2] / "spec" / "SPEC.md"


def _spec_config_keys() -> list[str]:
    """The key list of section 1, read from the spec's text."""
    text = SPEC.read_text().split("### Model id", 1)[1].split("- `manifest`", 1)[0]
    listed = text.split("whose keys are among", 1)[1].split("(those", 1)[0]
    return [k.strip(" `,\n") for k in listed.replace("\n", " ").split("`,") if k.strip(" `,\n")]


def _cbor_value(value):
    """Section 1's rule: integral numbers up to 2^53 are integers; objects are sorted pairs."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return [[k, _cbor_value(value[k])] for k in sorted(value, key=lambda k: k.encode())]
    if isinstance(value, list):
        return [_cbor_value(v) for v in value]
    return value


def test_directory_vector_recomputes_from_its_files():
    doc = json.loads(VECTORS.read_text())["directory"]
    config = json.loads(doc["files"]["config.json"])
    weights = bytes.fromhex(doc["files"]["model.safetensors"])
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    keys = _spec_config_keys()
    assert "rope_scaling" in keys and "max_position_embeddings" in keys and len(keys) == 21
    pairs = [[k, _cbor_value(config[k])] for k in sorted(config, key=lambda k: k.encode()) if k in keys]
    manifest = sorted([n, info["shape"], info["dtype"]] for n, info in header.items() if n != "__metadata__")
    sha = hashlib.sha256(weights).digest()
    assert sha.hex() == doc["file_sha256"]["model.safetensors"]
    document = cbor_encode(["swarm/1/model-id", pairs, manifest, [sha]])
    assert document.hex() == doc["document_hex"]
    digest = hashlib.blake2b(document, digest_size=8).hexdigest()
    assert digest == doc["digest"] and doc["model_id"] == f"{doc['name']}@{digest}"
    # and the reference's own function agrees
    assert model_id_document(config, [(n, s, d) for n, s, d in manifest], [sha]).hex() == doc["document_hex"]
    # 10000.0 in config.json is the integer 10000: what JavaScript's JSON.parse would give
    assert ["rope_theta", 10000] in pairs


def test_gguf_vector_is_the_files_digest_alone():
    doc = json.loads(VECTORS.read_text())["gguf"]
    document = cbor_encode(["swarm/1/model-id", [], [], [bytes.fromhex(doc["file_sha256"])]])
    assert document.hex() == doc["document_hex"]
    assert make_model_id(doc["name"], document) == doc["model_id"]


def test_keys_the_digest_ignores_do_not_change_it():
    doc = json.loads(VECTORS.read_text())["directory"]
    config = json.loads(doc["files"]["config.json"])
    weights = bytes.fromhex(doc["files"]["model.safetensors"])
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    manifest = [(n, i["shape"], i["dtype"]) for n, i in header.items()]
    sha = [hashlib.sha256(weights).digest()]
    base = model_id_document(config, manifest, sha)
    assert model_id_document({**config, "transformers_version": "9.9"}, manifest, sha) == base
    assert model_id_document({**config, "rope_theta": 10000}, manifest, sha) == base
    assert model_id_document({**config, "rope_theta": 10000.5}, manifest, sha) != base
