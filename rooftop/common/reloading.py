"""Files re-read when they change, so credentials rotate without a restart.

One pattern for every such file (the agent's TLS files and token, the collector's
certificate and token files): ``ReloadingFile.get()`` compares the files' signature
(mtime, size, inode) with the one it last loaded; when it changed, it loads again.
A load that fails keeps the last good value and is logged once per change, so a
half-written rotation never takes a working daemon down; at construction it is a
``ConfigError``, so a daemon never starts on unusable files.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from rooftop.common.errors import ConfigError

__all__ = ["FileSignature", "ReloadingFile", "file_signature"]

T = TypeVar("T")

FileSignature = tuple[tuple[int, int, int] | None, ...]

# What a load may raise for a bad file (ssl.SSLError is an OSError).
_LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, UnicodeDecodeError, ValueError, ConfigError)


def file_signature(paths: Sequence[Path | None]) -> FileSignature:
    """What tells a changed file (mtime, size, inode); None for an absent one."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        out.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class ReloadingFile(Generic[T]):
    """A value loaded from files, loaded again when any of them changes.

    Thread-safe. ``get()`` costs one ``stat`` per file while nothing changed.

    Args:
        paths: the files the value comes from (None entries are ignored: an optional
            file that is not configured).
        load: reads the files and returns the value; raises on a bad file.
        what: the files as a log line names them (``"collector TLS files"``).
        log: the caller's logger, so messages carry the caller's name.
        describe: what a successful reload did, for its log line; None: no line.
        level: the level of the "unusable, keeping the last good one" line.

    Raises:
        ConfigError: the files are unusable at construction.
    """

    def __init__(
        self,
        paths: Sequence[Path | None],
        load: Callable[[], T],
        *,
        what: str,
        log: logging.Logger,
        describe: Callable[[T, T], str | None] | None = None,
        level: int = logging.WARNING,
    ) -> None:
        self.what = what
        self.reloads = 0
        self._paths = tuple(paths)
        self._load = load
        self._log = log
        self._describe = describe
        self._level = level
        self._lock = threading.Lock()
        self._bad_sig: FileSignature | None = None
        self._sig = file_signature(self._paths)
        try:
            self._value = load()
        except ConfigError:
            raise
        except _LOAD_ERRORS as exc:
            raise ConfigError(f"{what} unusable: {exc}") from exc

    def get(self) -> T:
        """The current value: loaded again first when a file changed since the last load."""
        sig = file_signature(self._paths)
        with self._lock:
            if sig in (self._sig, self._bad_sig):
                return self._value
            try:
                value = self._load()
            except _LOAD_ERRORS as exc:
                self._bad_sig = sig  # once per change: the next change may be good
                self._log.log(
                    self._level,
                    "%s changed, but the new version is unusable (%s): keeping the last good one",
                    self.what,
                    exc,
                )
                return self._value
            if file_signature(self._paths) != sig:
                return self._value  # changed again while being read: the next get() retries
            old, self._value, self._sig = self._value, value, sig
            self.reloads += 1
        note = self._describe(old, value) if self._describe is not None else "reloaded"
        if note is not None:
            self._log.info("%s changed: %s", self.what, note)
        return value
