"""Rate-limited logging: a line repeated by a flood is written once per interval.

A client that sends 300,000 poison batches must not write 300,000 WARNING lines
(the log is an operator's, and a disk). ``RateLimitedLog.log`` writes the first line
of a kind (``key``) at once, swallows the repeats for ``interval_s``, and the next
line after that says how many were left out. Memory is bounded: past ``max_keys``
kinds the least recently logged is forgotten (it may then log again early). Stdlib
only; thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Writes each kind of line at most once per ``interval_s``, counting the rest.

    Args:
        logger: where lines go.
        interval_s: the shortest gap between two lines of one kind.
        max_keys: how many kinds are remembered.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        # key -> [time of the last line written, repeats left out since]
        self._seen: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._lock = threading.Lock()
        self.suppressed = 0  # lines left out since construction

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line of kind ``key`` was written within the interval.

        Returns:
            Whether the line was written.
        """
        now_s = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now_s - entry[0] < self._interval_s:
                entry[1] += 1
                self.suppressed += 1
                return False
            left_out = int(entry[1]) if entry is not None else 0
            self._seen[key] = [now_s, 0]
            self._seen.move_to_end(key)
            if len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        if left_out:
            msg += " (%d more like it in the last %.0f s, not logged)"
            args = (*args, left_out, self._interval_s)
        self._logger.log(level, msg, *args)
        return True
