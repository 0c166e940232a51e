"""Keeping the cyclic garbage collector off what a process loaded once.

A peer's process holds a few hundred thousand long-lived objects (the interpreter,
torch, transformers, the model's modules) that are never garbage. CPython's full
collections scan them all: measured on a ``swarm-peer serve`` of a tiny model, 370,000
objects, 170-230 ms a collection, one every several seconds while serving, and every
session's step waits for it (the event loop and the compute thread both stop). After
``gc.freeze`` a full collection scans only what was allocated since. Frozen objects
are still freed when their last reference goes; only cycles among them would stay.

Called by the command line once loading is done, never by the library (``peer.api``):
the heap of a program that imports it is its own business.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_loaded_heap"]


def freeze_loaded_heap() -> None:
    """Collect what is garbage now, then exempt every surviving object from later
    collections."""
    gc.collect()
    gc.freeze()
