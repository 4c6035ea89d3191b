"""The engine freezes its start-up heap so full collections skip it (engine/core.py)."""

from __future__ import annotations

import gc

from shardserve.engine.core import freeze_startup_heap


def test_freeze_startup_heap_freezes_live_objects_only() -> None:
    class Cycle:
        pass

    garbage = Cycle()
    garbage.self = garbage  # collectable only by the cycle collector
    del garbage
    try:
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not any(type(o) is Cycle for o in gc.get_objects())  # collected, not frozen
        freeze_startup_heap()  # again (a second engine): unfreezes, collects, freezes
        assert abs(gc.get_freeze_count() - frozen) < frozen // 2
    finally:
        gc.unfreeze()
