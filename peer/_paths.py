"""Where a peer keeps its files by default (no heavy imports: used by ``--help``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_identity_path"]


def default_identity_path() -> Path:
    """Where the identity lives unless ``--identity`` says otherwise (XDG data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "swarm-peer" / "identity.key"
