"""peer._heap: after the freeze, full collections no longer scan what was loaded, and
garbage made afterwards is still collected."""

from __future__ import annotations

import gc
import weakref

import torch

from peer._heap import freeze_loaded_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_loaded_objects_leave_the_collector_and_new_cycles_are_still_collected():
    loaded = torch.nn.Linear(4, 4)  # something loaded: frozen with the rest
    try:
        freeze_loaded_heap()
        scanned = {id(o) for o in gc.get_objects()}
        assert gc.get_freeze_count() > len(scanned)
        assert id(loaded) not in scanned
        a, b = Node(), Node()
        a.other, b.other = b, a
        dead = weakref.ref(a)
        del a, b
        gc.collect()
        assert dead() is None
    finally:
        gc.unfreeze()
