"""Protocol limits (spec/SPEC.md, "Limits"). Exceeding one is a typed error and drops
the connection, never the peer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS", "NOISE_MAX_MESSAGE"]

#: Largest Noise message (ciphertext with its 16-byte tag), by the Noise spec.
NOISE_MAX_MESSAGE = 65535


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Limits a peer enforces on what it receives. All sizes in bytes."""

    max_message_size: int = 64 * 1024 * 1024  # one application message (CBOR item)
    max_tensor_elements: int = 1 << 25  # elements in one tensor (e.g. 2048 x 16384)
    max_tensor_dims: int = 4
    max_concurrent_requests: int = 64  # unanswered requests a peer may have open on us
    max_records_per_key: int = 64  # DHT values kept for one key
    max_record_size: int = 4096  # encoded size of one signed DHT record
    max_addresses: int = 8  # addresses in one node or announcement record
    handshake_timeout: float = 10.0  # seconds for the whole Noise handshake
    idle_timeout: float = 300.0  # seconds without traffic before a connection is closed

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"limit {name} must be positive")


DEFAULT_LIMITS = Limits()
