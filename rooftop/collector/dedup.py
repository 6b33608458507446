"""Dedup: which seqs of each (agent_id, boot_id) were applied, so a resend is not applied twice.

Single-threaded (the ingest loop owns it), except the hand-over of changed marks to
``rooftop.collector.marks`` (the state directory), which takes a lock. An agent
resends what it has not seen acked; a seq at or below the contiguous mark, or above
it but applied already, is a duplicate. A gap that cannot fill (the agent's spool
dropped those batches) is given up on instead of holding every later ack back
(DESIGN §7); the seqs given up on are remembered as *holes* (bounded), so one that
does arrive late (out of order: ``1,3,2,5,4,6``) is applied, not called a duplicate.
Of the seqs a resumed stream skips, those at or below the batch's ``acked_seq`` (what
the agent saw acked by any collector) were delivered to another collector while the
agent was away: they are counted apart (``acked_elsewhere``), not as missing.

Seqs are not trusted blindly (SECURITY.md, "Sequence numbers and agent identity"): a
seq above ``MAX_SEQ``, or more than ``max_seq_jump`` past a known boot's mark, is
``SeqCheck.TOO_FAR``: the caller rejects it in-band and it never moves the mark, so
one forged ``seq = 2^63`` can no longer ack (and so discard) another agent's batches.

Memory is bounded: ``max_keys`` (agent_id, boot_id) pairs, least recently used
evicted in O(1) (an ``OrderedDict``); per pair at most ``max_ahead`` seqs above a
gap and ``max_holes`` hole ranges.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

__all__ = [
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_SEQ_JUMP",
    "MAX_SEQ",
    "Committed",
    "Deduplicator",
    "MarkHandle",
    "SeqCheck",
]

# No boot sends more batches than this: 2^40 is 34,000 years at one batch a second.
# Anything above is forged or corrupt, whether or not the boot is known.
MAX_SEQ = 2**40
# How far past a known boot's contiguous mark a seq may jump: about 11.6 days of
# batches at one a second, beyond anything an agent's spool (≈ 20 h) can resume past.
DEFAULT_MAX_SEQ_JUMP = 1_000_000
# (agent_id, boot_id) pairs remembered: a pair costs ~300 bytes, so ~30 MiB at the bound.
DEFAULT_MAX_KEYS = 100_000

Key = tuple[str, str]


class SeqCheck(Enum):
    """What ``Deduplicator.check`` says about a seq."""

    NEW = "new"  # apply it
    DUPLICATE = "duplicate"  # applied already
    TOO_FAR = "too_far"  # beyond MAX_SEQ or max_seq_jump past the mark: reject


class Committed(NamedTuple):
    """What ``Deduplicator.commit`` did: the new mark and the seqs it skipped."""

    contiguous: int  # the highest contiguous seq now
    missing: int  # seqs skipped that nobody acked: the agent dropped them
    acked_elsewhere: int = 0  # seqs skipped that the agent says another collector acked


@dataclass(slots=True, eq=False)
class _Seqs:
    contiguous: int = 0  # every seq <= this was applied (or given up on, see holes)
    ahead: set[int] = field(default_factory=set)  # applied seqs above a gap
    holes: list[list[int]] = field(default_factory=list)  # [lo, hi] given up on, sorted
    durable: int = 0  # the mark as last written to the state directory
    restored: int = 0  # the mark loaded from the state directory (0: none)


class Deduplicator:
    """Which seqs of each (agent_id, boot_id) were applied.

    Args:
        max_ahead: applied seqs kept above a gap before the gap is given up on.
        max_keys: (agent_id, boot_id) pairs remembered; the least recently used go.
        max_seq_jump: the furthest a seq may lie past a known pair's contiguous mark.
        max_holes: gaps (ranges) per pair remembered as fillable by a late seq.
        durable_acks: acks report only marks written to the state directory
            (``rooftop.collector.marks`` sets this): a SIGKILL then re-applies nothing
            the agent saw acked.
    """

    def __init__(
        self,
        *,
        max_ahead: int = 1024,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_seq_jump: int = DEFAULT_MAX_SEQ_JUMP,
        max_holes: int = 16,
        durable_acks: bool = False,
    ) -> None:
        self._max_ahead = max_ahead
        self._max_keys = max_keys
        self._max_seq_jump = max_seq_jump
        self._max_holes = max_holes
        self.durable_acks = durable_acks
        self._keys: OrderedDict[Key, _Seqs] = OrderedDict()
        # Marks changed since the state directory last took them (marks.py's thread).
        self._dirty: dict[Key, _Seqs] = {}
        self._dirty_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def max_seq_jump(self) -> int:
        """The furthest a seq may lie past a known pair's contiguous mark."""
        return self._max_seq_jump

    def check(self, key: Key, seq: int) -> SeqCheck:
        """Whether ``seq`` of ``key`` is new, a duplicate, or too far ahead to believe."""
        if seq > MAX_SEQ:
            return SeqCheck.TOO_FAR
        st = self._keys.get(key)
        if st is None:
            return SeqCheck.NEW
        if seq <= st.contiguous:
            return SeqCheck.NEW if _in_holes(st.holes, seq) else SeqCheck.DUPLICATE
        if seq in st.ahead:
            return SeqCheck.DUPLICATE
        if seq - st.contiguous > self._max_seq_jump:
            return SeqCheck.TOO_FAR
        return SeqCheck.NEW

    def is_duplicate(self, key: Key, seq: int) -> bool:
        """Whether ``seq`` of ``key`` was applied already."""
        return self.check(key, seq) is SeqCheck.DUPLICATE

    def restored_mark(self, key: Key) -> int:
        """The mark loaded for ``key`` from the state directory at start (0: none)."""
        st = self._keys.get(key)
        return st.restored if st is not None else 0

    def acked(self, key: Key) -> int:
        """What to ack for ``key``: its contiguous mark (its durable one with ``durable_acks``)."""
        st = self._keys.get(key)
        if st is None:
            return 0
        return min(st.durable, st.contiguous) if self.durable_acks else st.contiguous

    def contiguous(self, key: Key) -> int:
        """The highest contiguous seq applied for ``key`` (0 when none)."""
        st = self._keys.get(key)
        return st.contiguous if st is not None else 0

    def commit(
        self, key: Key, seq: int, *, first_on_stream: bool, acked_seq: int = 0
    ) -> Committed:
        """Record ``seq`` as applied (the caller checked it is ``SeqCheck.NEW``).

        Args:
            key: (agent_id, boot_id).
            seq: the applied (or rejected, hence consumed) seq.
            first_on_stream: the stream resumed here (its first seq of ``key``, or a
                jump past its previous one): the agent sends oldest first, so the
                seqs in between were dropped by its spool, or acked by another
                collector while the agent was away.
            acked_seq: the batch's ``Batch.acked_seq``: the highest seq of ``key`` the
                agent had seen acked by any collector (0: unknown, an older agent).

        Returns:
            The contiguous mark, and the seqs skipped: missing, or acked elsewhere.
        """
        new = key not in self._keys
        st = self._entry(key)
        before = st.contiguous
        skipped = elsewhere = 0
        if seq <= st.contiguous:
            _remove_hole(st.holes, seq)  # a late seq filled a hole
            return Committed(st.contiguous, 0)
        if first_on_stream and seq > st.contiguous + 1 and not st.ahead:
            if not new:
                # What lies between was dropped by the agent's spool, or went to another
                # collector while the agent was away: those the agent saw acked (up to
                # its acked_seq, believed no higher than seq - 1) are counted apart.
                # acked_seq only splits the count: the mark moves to seq - 1 as it
                # always did, and the whole gap stays a fillable hole, so a forged
                # acked_seq can turn "missing" into "acked_elsewhere" and nothing else;
                # it never acks, nor calls a duplicate, a seq not applied here.
                # A pair never seen before has no history here to call missing.
                gap = seq - 1 - st.contiguous
                elsewhere = max(0, min(acked_seq, seq - 1) - st.contiguous)
                skipped = gap - elsewhere
                self._add_hole(st, st.contiguous + 1, seq - 1)
            st.contiguous = seq - 1
        if seq == st.contiguous + 1:
            st.contiguous = seq
        else:
            st.ahead.add(seq)
            if len(st.ahead) > self._max_ahead:
                # The gap will not fill: stop holding every later ack back for it.
                low = min(st.ahead)
                skipped += low - 1 - st.contiguous
                self._add_hole(st, st.contiguous + 1, low - 1)
                st.contiguous = low - 1
        while st.contiguous + 1 in st.ahead:
            st.contiguous += 1
            st.ahead.discard(st.contiguous)
        if st.contiguous != before:
            with self._dirty_lock:
                self._dirty[key] = st
        return Committed(st.contiguous, skipped, elsewhere)

    def _entry(self, key: Key) -> _Seqs:
        """``key``'s bookkeeping, made the most recently used (created if new)."""
        st = self._keys.get(key)
        if st is None:
            if len(self._keys) >= self._max_keys:
                self._keys.popitem(last=False)  # O(1): the least recently used
            st = self._keys[key] = _Seqs()
        else:
            self._keys.move_to_end(key)
        return st

    def _add_hole(self, st: _Seqs, lo: int, hi: int) -> None:
        if lo > hi:
            return
        st.holes.append([lo, hi])  # above every earlier hole: the mark only grows
        if len(st.holes) > self._max_holes:
            del st.holes[0]  # the oldest gap is the least likely to fill

    # --- the state directory's side (rooftop.collector.marks) ---------------------------

    def take_dirty(self) -> list[tuple[Key, int, _Seqs]]:
        """The marks changed since the last call: (key, mark, handle for ``made_durable``)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, {}
        return [(key, st.contiguous, st) for key, st in dirty.items()]

    @staticmethod
    def made_durable(handle: _Seqs, mark: int) -> None:
        """``mark`` of the pair behind ``handle`` is on disk: acks may report it."""
        # One int store, read by the ingest loop: atomic under the GIL, and it only grows.
        handle.durable = max(handle.durable, mark)

    def restore(self, key: Key, mark: int) -> None:
        """Load a mark from the state directory (at start, before any stream)."""
        if mark <= 0 or mark > MAX_SEQ:
            return
        st = self._entry(key)
        st.contiguous = st.durable = st.restored = max(st.contiguous, mark)


# What ``take_dirty`` hands out and ``made_durable`` takes back (opaque to callers).
MarkHandle = _Seqs


def _in_holes(holes: list[list[int]], seq: int) -> bool:
    return any(lo <= seq <= hi for lo, hi in holes)


def _remove_hole(holes: list[list[int]], seq: int) -> None:
    for i, (lo, hi) in enumerate(holes):
        if lo <= seq <= hi:
            parts = [[lo, seq - 1]] if lo < seq else []
            if seq < hi:
                parts.append([seq + 1, hi])
            holes[i : i + 1] = parts
            return
