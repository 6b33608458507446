"""The agent's liveness heartbeat: a file its sampling loop touches, read by a probe.

Under systemd the sampling loop sends ``WATCHDOG=1``; a kubelet cannot receive that.
With ``heartbeat_file`` set, the sampler thread touches that file after each tick (at
most once a second), and ``agentctl alive FILE`` (a Kubernetes exec probe) fails once
the file is older than ``--max-age-s``: a loop wedged in a driver call, or dead, stops
touching it. The file is removed at start, so a heartbeat left by a previous container
in the same pod (an ``emptyDir`` outlives containers) never counts for the new one.
Stdlib only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEFAULT_MAX_AGE_S", "Heartbeat", "heartbeat_problem"]

log = logging.getLogger(__name__)

# What `agentctl alive` accepts by default: many 1 Hz ticks, so one slow NVML read
# (hundreds of ms on a busy driver) never restarts the agent.
DEFAULT_MAX_AGE_S = 30.0


class Heartbeat:
    """Touches ``path`` from the sampling loop; a no-op when ``path`` is None.

    Args:
        path: the heartbeat file (``heartbeat_file``); None: no heartbeat.
        every_s: the least time between two touches (a 100 Hz loop writes once a second).
        monotonic: the clock that spaces the touches.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        every_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._every_s = every_s
        self._monotonic = monotonic
        self._last_s = -float("inf")
        self._warned = False

    def clear(self) -> None:
        """Remove the file (at start and at shutdown): no tick yet, or no more ticks."""
        if self.path is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            self._warn(exc)

    def beat(self) -> None:
        """One tick done: touch the file, unless touched less than ``every_s`` ago."""
        if self.path is None:
            return
        now_s = self._monotonic()
        if now_s - self._last_s < self._every_s:
            return
        self._last_s = now_s
        try:
            self.path.touch()  # creates it, or sets its mtime to now
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        # Once: a heartbeat that cannot be written must not flood the log every tick;
        # the probe then fails and says why the agent looks dead.
        if not self._warned:
            self._warned = True
            log.warning("heartbeat_file %s: %s (liveness probes will fail)", self.path, exc)


def heartbeat_problem(
    path: Path, max_age_s: float, *, now_s: Callable[[], float] = time.time
) -> str | None:
    """Why the agent at ``path`` is not alive, in one line; None when it is.

    Alive: ``path`` exists and was touched at most ``max_age_s`` seconds ago (by the
    file's mtime against the wall clock, which the agent and the probe share).
    """
    try:
        mtime_s = os.stat(path).st_mtime
    except FileNotFoundError:
        return f"no heartbeat at {path}: the agent has not completed a sampling tick"
    except OSError as exc:
        return f"cannot read the heartbeat {path}: {exc.strerror or exc}"
    age_s = now_s() - mtime_s
    if age_s > max_age_s:
        return f"no sampling tick for {age_s:.0f} s (more than {max_age_s:g} s; {path})"
    return None
