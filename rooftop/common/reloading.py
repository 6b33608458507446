"""Noticing that credential files changed, so they are re-read without a restart."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FileSignature", "file_signature"]

FileSignature = tuple[tuple[int, int, int] | None, ...]


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
