"""The dedup marks in the collector's state directory, so a restart applies nothing twice.

``state_dir/dedup-marks.jsonl`` holds one JSON line ``["agent_id", "boot_id", mark]``
per change of a pair's contiguous mark; the last line of a pair wins. A thread
group-commits what changed every ``flush_interval_s`` (one append and one fsync for
every stream's changes together), and when the log has grown past a few times the
live pairs it rewrites it whole (temp file, fsync, rename, fsync of the directory).

Why nothing is applied twice after a SIGKILL: with a state directory the collector
acks a pair only up to its *durable* mark (``Deduplicator(durable_acks=True)``).
Every seq an agent saw acked is on disk, so after a restart its resend of it is a
duplicate; a seq applied but not yet durable was never acked, so the agent resends
it and the restarted collector, whose fleet state (in memory) died with the old
process, applies it for the first time there. The cost is ack latency: up to one
``flush_interval_s`` plus an fsync. Across a *failover* to another collector (another
state directory) delivery is at-least-once: what the dead one applied but never
acked is applied again; gauges are keyed by sample time, so doing so is idempotent.

A torn last line (a SIGKILL mid-append) or an unreadable file is one log line; what
was read before it stays, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from rooftop.collector.dedup import DEFAULT_MAX_KEYS, Deduplicator, Key, MarkHandle
from rooftop.common.errors import ConfigError

__all__ = ["MARKS_FILE", "MarkStore"]

log = logging.getLogger(__name__)

MARKS_FILE = "dedup-marks.jsonl"
# Rewrite the log whole once it holds this many times the live pairs (plus a floor).
_COMPACT_FACTOR = 4
_COMPACT_MIN_LINES = 10_000


def _parse_line(line: bytes) -> tuple[str, str, int]:
    agent_id, boot_id, mark = json.loads(line)
    if not (isinstance(agent_id, str) and isinstance(boot_id, str)):
        raise TypeError("ids must be strings")
    if not isinstance(mark, int) or isinstance(mark, bool) or mark < 0:
        raise TypeError("the mark must be a non-negative integer")
    return agent_id, boot_id, mark


class MarkStore:
    """Keeps a ``Deduplicator``'s marks durable in ``directory``.

    Lifecycle: ``load()`` before any stream, ``start()``, ``flush(timeout_s)``,
    ``shutdown(timeout_s)`` (a last flush; idempotent).

    Args:
        directory: the collector's ``state_dir`` (created if missing).
        dedup: whose marks are kept; its acks wait for durability.
        flush_interval_s: the longest a changed mark waits for its fsync.
        max_keys: pairs kept in the file (the least recently changed go).
        fsync: injected by tests.

    Raises:
        ConfigError: the directory cannot be created.
    """

    def __init__(
        self,
        directory: Path,
        dedup: Deduplicator,
        *,
        flush_interval_s: float = 0.05,
        max_keys: int = DEFAULT_MAX_KEYS,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"collector.state_dir: cannot create {directory}: {exc.strerror}"
            ) from exc
        self.path = directory / MARKS_FILE
        self._dedup = dedup
        self._interval_s = flush_interval_s
        self._max_keys = max_keys
        self._fsync = fsync
        self._marks: OrderedDict[Key, int] = OrderedDict()  # what the file says
        self._lines = 0  # lines in the file
        self._fd: int | None = None
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._retry: list[tuple[Key, int, MarkHandle]] = []
        dedup.durable_acks = True

    def load(self) -> int:
        """Restore the marks on disk into the dedup table; how many pairs were restored."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            reason = exc.strerror
        else:
            reason = None
        if reason is not None:
            # One line, no traceback: a damaged state file must not stop the collector.
            log.error(
                "collector.state_dir: cannot read %s (%s): starting with no dedup marks",
                self.path,
                reason,
            )
            return 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                agent_id, boot_id, mark = _parse_line(line)
            except (ValueError, TypeError) as exc:
                # A torn append after a SIGKILL, or damage: keep what came before.
                torn = number == len(lines)  # the last piece, with no newline after it
                log.warning(
                    "collector.state_dir: %s line %d is %s (%s): kept the %d mark(s) before it",
                    self.path,
                    number,
                    "torn" if torn else "corrupt",
                    exc,
                    len(self._marks),
                )
                break
            key = (agent_id, boot_id)
            self._marks[key] = mark
            self._marks.move_to_end(key)
            self._lines += 1
            if len(self._marks) > self._max_keys:
                self._marks.popitem(last=False)
        for key, mark in self._marks.items():
            self._dedup.restore(key, mark)
        if self._marks:
            log.info("collector.state_dir: restored %d dedup mark(s)", len(self._marks))
            # Rewrite: drops a torn tail, so the next append starts on a clean line.
            with self._io_lock:
                self._compact()
        return len(self._marks)

    def start(self) -> None:
        """Start the group-commit thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="rooftop-marks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.flush()
            except Exception:  # thread boundary: the next round tries again
                log.exception("collector.state_dir: writing dedup marks failed")

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write and fsync the changed marks; True when they are durable."""
        del timeout_s  # one append and one fsync: bounded by the disk, not a wait
        with self._io_lock:
            changed = self._retry + self._dedup.take_dirty()
            self._retry = []
            if not changed:
                return True
            out = bytearray()
            for key, mark, _ in changed:
                self._marks[key] = mark
                self._marks.move_to_end(key)
                out += json.dumps([key[0], key[1], mark]).encode() + b"\n"
            while len(self._marks) > self._max_keys:
                self._marks.popitem(last=False)
            try:
                if self._lines + len(changed) > max(
                    _COMPACT_MIN_LINES, _COMPACT_FACTOR * len(self._marks)
                ):
                    self._compact()
                else:
                    fd = self._open()
                    os.write(fd, bytes(out))
                    self._fsync(fd)
                    self._lines += len(changed)
            except OSError as exc:
                self._close()
                # Not durable: the acks wait; say it once until it works again.
                if not self._failing:
                    log.error(  # noqa: TRY400 - one line; a traceback adds nothing
                        "collector.state_dir: cannot write %s (%s): acks wait until it works",
                        self.path,
                        exc.strerror,
                    )
                self._failing = True
                self._retry = changed  # taken again with the next round's changes
                return False
            if self._failing:
                log.info("collector.state_dir: %s is written again", self.path)
                self._failing = False
            for _, mark, handle in changed:
                Deduplicator.made_durable(handle, mark)
            return True

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _compact(self) -> None:
        """Rewrite the file from ``self._marks``: temp, fsync, rename, fsync the directory."""
        self._close()
        tmp = self.path.with_suffix(".tmp")
        body = b"".join(
            json.dumps([k[0], k[1], m]).encode() + b"\n" for k, m in self._marks.items()
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            self._fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._lines = len(self._marks)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and write what changed last (SIGTERM). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self.flush()
        except OSError as exc:
            log.error(  # noqa: TRY400 - one line; a traceback adds nothing
                "collector.state_dir: last write of dedup marks failed: %s", exc.strerror
            )
        finally:
            with self._io_lock:
                self._close()
