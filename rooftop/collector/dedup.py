"""Dedup: which seqs of each (agent_id, boot_id) were applied, so a resend is not applied twice.

Pure and single-threaded (the ingest loop owns it). An agent resends what it has not
seen acked; a seq at or below the contiguous mark, or above it but applied already,
is a duplicate. A gap that cannot fill (the agent's spool dropped those batches) is
given up on instead of holding every later ack back (DESIGN §7).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Deduplicator"]


@dataclass(slots=True)
class _Seqs:
    contiguous: int = 0  # every seq <= this was applied (or skipped as missing)
    ahead: set[int] = field(default_factory=set)  # applied seqs above a gap
    last_used_s: float = 0.0


class Deduplicator:
    """Which seqs of each (agent_id, boot_id) were applied; pure, single-threaded.

    Args:
        max_ahead: applied seqs kept above a gap before the gap is given up on.
        max_keys: (agent_id, boot_id) pairs remembered; the least recently used go.
        clock: for least-recently-used bookkeeping.
    """

    def __init__(
        self,
        *,
        max_ahead: int = 1024,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_ahead = max_ahead
        self._max_keys = max_keys
        self._clock = clock
        self._keys: dict[tuple[str, str], _Seqs] = {}

    def is_duplicate(self, key: tuple[str, str], seq: int) -> bool:
        """Whether ``seq`` of ``key`` was applied already."""
        st = self._keys.get(key)
        return st is not None and (seq <= st.contiguous or seq in st.ahead)

    def acked(self, key: tuple[str, str]) -> int:
        """The highest contiguous seq applied for ``key`` (0 when none)."""
        st = self._keys.get(key)
        return st.contiguous if st is not None else 0

    def commit(self, key: tuple[str, str], seq: int, *, first_on_stream: bool) -> tuple[int, int]:
        """Record ``seq`` as applied.

        Args:
            key: (agent_id, boot_id).
            seq: the applied (or rejected, hence consumed) seq.
            first_on_stream: no seq of ``key`` was committed on this stream yet: the
                agent resumed from its oldest retained batch.

        Returns:
            (highest contiguous seq, seqs skipped as missing).
        """
        st = self._keys.get(key)
        if st is None:
            if len(self._keys) >= self._max_keys:
                oldest = min(self._keys, key=lambda k: self._keys[k].last_used_s)
                del self._keys[oldest]
            st = self._keys[key] = _Seqs()
        st.last_used_s = self._clock()
        skipped = 0
        if first_on_stream and seq > st.contiguous + 1 and not st.ahead:
            # The agent resumes from its oldest retained batch: what lies between was
            # dropped by its spool (or applied by a collector before a restart).
            skipped = seq - 1 - st.contiguous
            st.contiguous = seq - 1
        if seq == st.contiguous + 1:
            st.contiguous = seq
        elif seq > st.contiguous:
            st.ahead.add(seq)
            if len(st.ahead) > self._max_ahead:
                # The gap will not fill: stop holding every later ack back for it.
                low = min(st.ahead)
                skipped += low - 1 - st.contiguous
                st.contiguous = low - 1
        while st.contiguous + 1 in st.ahead:
            st.contiguous += 1
            st.ahead.discard(st.contiguous)
        return st.contiguous, skipped
