"""Verification: spot-check audits by redundant recomputation, comparison with
calibrated tolerances, fraud proofs and reputation (DESIGN.md "Verification";
spec/SPEC.md "Verification").

- ``Auditor`` / ``AuditPolicy`` / ``PARANOID``: the client side (``verify._audit``).
- ``compare`` / ``tolerance_for``: the statistics and calibrated thresholds
  (``verify._compare``; ``python bench/calibrate.py`` measures them).
- ``verify_proof`` and the proof builders (``verify._proofs``).
- ``FraudProofService``: FRAUD_PROOF handling, gossip and DHT storage.
- ``Reputation``: per-peer standings with decay, bans, persistence.
"""

from ._audit import DEFAULT_AUDIT_RATE, PARANOID, AuditOutcome, AuditPolicy, AuditResult, AuditStats, Auditor
from ._compare import (
    MARGIN,
    TOLERANCES,
    Comparison,
    Tolerance,
    compare,
    first_mismatch,
    row_statistics,
    tolerance_for,
)
from ._proofs import (
    InvalidProof,
    check_proof,
    proof_digest,
    proof_from_bytes,
    proof_from_forward_once,
    proof_from_transcript,
    proof_to_bytes,
    recompute_prefix,
    verify_proof,
)
from ._reputation import Ban, PeerStanding, Reputation, ReputationFileError
from ._service import Compute, FraudProofService
from ._store import (
    FRAUD_KIND,
    FRAUD_PART_KIND,
    FRAUD_RECORD_KINDS,
    fetch_proofs,
    fraud_key,
    part_key,
    proof_records,
    publish_proof,
    record_kinds,
)

__all__ = [
    "DEFAULT_AUDIT_RATE",
    "PARANOID",
    "AuditOutcome",
    "AuditPolicy",
    "AuditResult",
    "AuditStats",
    "Auditor",
    "MARGIN",
    "TOLERANCES",
    "Comparison",
    "Tolerance",
    "compare",
    "first_mismatch",
    "row_statistics",
    "tolerance_for",
    "InvalidProof",
    "check_proof",
    "proof_digest",
    "proof_from_bytes",
    "proof_from_forward_once",
    "proof_from_transcript",
    "proof_to_bytes",
    "recompute_prefix",
    "verify_proof",
    "Ban",
    "PeerStanding",
    "Reputation",
    "ReputationFileError",
    "Compute",
    "FraudProofService",
    "FRAUD_KIND",
    "FRAUD_PART_KIND",
    "FRAUD_RECORD_KINDS",
    "fetch_proofs",
    "fraud_key",
    "part_key",
    "proof_records",
    "publish_proof",
    "record_kinds",
]
