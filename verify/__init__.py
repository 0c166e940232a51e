"""Verification: spot-check audits by redundant recomputation, comparison with
calibrated tolerances, fraud proofs and reputation (DESIGN.md "Verification";
spec/SPEC.md "Verification").

- ``Auditor`` / ``AuditPolicy`` / ``PARANOID``: the client side (``verify._audit``).
- ``compare`` / ``tolerance_for``: the statistics and calibrated thresholds
  (``verify._compare``; ``python bench/calibrate.py`` measures them).
- ``judge``: the conviction rule, relative to the honest spread of the very inputs
  (``verify._judge``); ``NormBounds``: the calibrated activation range (``verify._bounds``).
- ``operator_of`` / ``tally``: independent voters and the weighted vote (``verify._voting``).
- ``verify_proof`` and the proof builders (``verify._proofs``).
- ``FraudProofService``: FRAUD_PROOF handling, gossip and DHT storage.
- ``Reputation``: per-peer standings with decay, bans, persistence.
"""

from ._audit import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_LOCAL_RECOMPUTE_BYTES,
    PARANOID,
    AuditOutcome,
    AuditPolicy,
    AuditResult,
    AuditStats,
    Auditor,
)
from ._bounds import BOUNDS_MARGIN, NormBounds, bounds_from_activations, load_bounds, record_path
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
from ._judge import SPREAD_FACTOR, Verdict, judge
from ._proofs import (
    InconclusiveProof,
    InvalidProof,
    LocalRecompute,
    SpanRecompute,
    check_proof,
    proof_digest,
    proof_from_bytes,
    proof_from_forward_once,
    proof_from_transcript,
    proof_to_bytes,
    recompute_prefix,
    replay_session,
    verify_proof,
)
from ._reputation import Ban, History, PeerStanding, Reputation, ReputationFileError
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
from ._voting import Ballot, Tally, VoteResult, draw_voter, operator_of, tally

__all__ = [
    "DEFAULT_AUDIT_RATE",
    "DEFAULT_LOCAL_RECOMPUTE_BYTES",
    "BOUNDS_MARGIN",
    "NormBounds",
    "bounds_from_activations",
    "load_bounds",
    "record_path",
    "SPREAD_FACTOR",
    "Verdict",
    "judge",
    "InconclusiveProof",
    "LocalRecompute",
    "SpanRecompute",
    "replay_session",
    "History",
    "Ballot",
    "Tally",
    "VoteResult",
    "draw_voter",
    "operator_of",
    "tally",
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
