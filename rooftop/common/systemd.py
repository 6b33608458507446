"""systemd's side of a daemon: ``sd_notify``, the watchdog interval, and stopping on SIGTERM.

Both daemons (``agentctl agent``, ``agentctl collector``) run as ``Type=notify`` units:
``READY=1`` once serving, ``WATCHDOG=1`` every ``WatchdogSec/2`` from the main loop,
``STOPPING=1`` on the way out. Stdlib only.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

__all__ = ["StopSignals", "sd_notify", "watchdog_interval_s"]

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's ``$NOTIFY_SOCKET``; False if none.

    Stdlib only: one datagram on a Unix socket (``@name`` is the abstract namespace).
    """
    address = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify(%s): %s", state, exc)
        return False
    return True


# How often ``StopSignals.wait()`` with no timeout looks without being woken: never (None)
# where the handlers are installed, since the wakeup socket wakes it wherever the
# signal lands; off the main thread (no handlers, nothing to wake it) once a second.
_SIGNAL_POLL_S: float | None = None
_UNHANDLED_POLL_S = 1.0


class StopSignals:
    """SIGTERM and SIGINT, waited for safely from the main thread (a context manager).

    The handler only records the signal: no ``Event.set()``, no logging, since both
    take locks. Python runs a handler in the main thread between two bytecodes,
    wherever that thread is, even inside a lock the handler would take: an
    ``Event.set()`` here once ran inside ``Event.wait()``, which held the Event's lock,
    and waited for itself forever (SIGTERM hung the agent for good).

    Waking: Python's C-level handler writes to a socketpair (``signal.set_wakeup_fd``)
    in whichever thread the kernel gave the signal to, often one of gRPC's, where
    nothing would interrupt the main thread's wait; ``wait`` selects on it. Off the
    main thread (tests) no handler is installed and ``wait`` just waits.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[signal.Signals, Any] = {}
        self._previous_fd: int | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous_fd = signal.set_wakeup_fd(
                self._wake_w.fileno(), warn_on_full_buffer=False
            )
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received.append(signum)

    def wait(self, timeout_s: float | None = None) -> str | None:
        """Wait up to ``timeout_s`` (None: until a signal); the signal's name once one came.

        Returns ``"SIGTERM"`` or ``"SIGINT"``, or None at the timeout. Off the main thread
        no handler is installed, and None means a second.
        """
        if timeout_s is None:
            timeout_s = _SIGNAL_POLL_S if self._previous else _UNHANDLED_POLL_S
        if not self.received and select.select([self._wake_r], [], [], timeout_s)[0]:
            self._wake_r.recv(64)
        return signal.Signals(self.received[0]).name if self.received else None

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
        self._wake_r.close()
        self._wake_w.close()


def watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """Half of systemd's ``WatchdogSec`` (as systemd advises), when it is set for us."""
    usec = env.get(WATCHDOG_USEC_ENV, "")
    pid = env.get(WATCHDOG_PID_ENV, "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
