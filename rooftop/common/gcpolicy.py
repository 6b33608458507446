"""The cyclic GC in a long-running daemon: start-up's objects frozen, collections rarer.

Both daemons load, at start-up, what lives as long as the process (modules, protobuf
descriptors, config, restored state: ~40,000 tracked objects in the agent). ``tune``
collects once and freezes them, so no later collection walks them again, and raises
the thresholds: by default the youngest generation is collected every 700 net
allocations, which at 2,000 batches/s in the collector was a collection every other
batch (~7 % of its ingest thread, py-spy, 700 agents) and in the agent at 1 Hz one or
two a second, each waking the older generations' walks in turn. Neither daemon makes
many reference cycles, so collecting less often costs little memory. ``restore`` puts
both back: a daemon run inside a test or an embedding leaves the GC as it found it.
"""

from __future__ import annotations

import gc

__all__ = ["THRESHOLDS", "restore", "tune"]

THRESHOLDS = (20_000, 20, 20)


def tune(thresholds: tuple[int, int, int] = THRESHOLDS) -> tuple[int, int, int]:
    """Collect, freeze what is alive, set ``thresholds``; the thresholds before."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return before


def restore(thresholds: tuple[int, int, int]) -> None:
    """Undo ``tune``: unfreeze and set the thresholds it returned."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)
