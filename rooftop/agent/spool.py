"""Spool: batches wait here until the collector acks them (DESIGN §7).

::

    append(batch) ──► memory ring ──(writer, every fsync_interval_s)──► disk segments
                         │                                                  │
                         └──────────────► pending(limit, after) ◄───────────┘
                                                 ack(boot_id, seq): cumulative

``append`` never blocks on the disk and never raises: the sampler hands a batch over
and goes on. A writer thread moves the ring to append-only segment files
(``seg-NNNNNNNNNN.rts``) at most ``fsync_interval_s`` after an append and fsyncs at
most once per interval, so a kill loses at most the ring (one interval); a batch acked
before it reached the writer is never written at all, which with a healthy collector is
nearly every batch: the writer then only wakes, finds nothing to do and sleeps (no disk
I/O). It wakes once per batch in a steady cadence (its look at the next batch planned
ahead, so the append itself wakes nothing) and never while no batch comes. Fully acked
segments are deleted.

Record framing, little-endian::

    magic "RTS1" | crc32 (u32, over body) | body length (u32) | body
    body = seq (u64) | boot_id length (u16) | boot_id (UTF-8) | serialized pb.Batch

Full (``max_bytes`` on disk, or the ring over ``ring_max_bytes`` while the disk
lags): the oldest segment or ring records are dropped and counted
(``dropped_full``); sampling never stops. A torn tail, a bad CRC or an unreadable
segment is skipped and counted (``dropped_corrupt``): recovery resynchronizes on the
next magic and never raises, so a bad file cannot crash-loop the agent. The highest
acked seq per boot is kept in ``acked.json`` (best effort, not fsynced), so a
restart resends little that the collector already has; it de-duplicates the rest.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from rooftop.common.counters import Counters
from rooftop.common.errors import ConfigError
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "DEFAULT_FSYNC_INTERVAL_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_RING_MAX_BYTES",
    "Key",
    "Spool",
    "SpoolStats",
    "frame_record",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # ≈ 20 h of 8 GPUs at 1 Hz, ≈ 3 h at 10 Hz (DESIGN §7.2)
DEFAULT_FSYNC_INTERVAL_S = 0.5
DEFAULT_RING_MAX_BYTES = 8 * 1024 * 1024
_SEGMENT_MAX_DEFAULT_BYTES = 16 * 1024 * 1024
_SEGMENT_MIN_BYTES = 4096
# A batch is ≤ 1 MiB by contract; anything claiming far more is a corrupt length.
_RECORD_MAX_BYTES = 64 * 1024 * 1024

MAGIC = b"RTS1"
_HEADER = struct.Struct("<4sII")  # magic, crc32 of body, body length
_KEY = struct.Struct("<QH")  # seq, boot_id length
_SEGMENT_PREFIX = "seg-"
_SEGMENT_SUFFIX = ".rts"
_ACKS_FILE = "acked.json"
# A writer in step with the appends looks this share of the interval early, so an
# append a little ahead of its cadence (tick jitter) still needs no wakeup.
_LOOK_EARLY = 0.1
_ERROR_LOG_INTERVAL_S = 60.0  # a failing disk is logged once a minute, not per write

Key = tuple[str, int]
Clock = Callable[[], float]


class CorruptRecord(ValueError):
    """A framed record failed its checks."""


def frame_record(boot_id: str, seq: int, payload: bytes) -> bytes:
    """One framed, checksummed spool record (the on-disk format above)."""
    boot = boot_id.encode()
    body = _KEY.pack(seq, len(boot)) + boot + payload
    return _HEADER.pack(MAGIC, zlib.crc32(body), len(body)) + body


def _unframe(record: bytes) -> tuple[str, int, bytes]:
    """Boot id, seq and payload of one framed record; raises ``CorruptRecord``."""
    if len(record) < _HEADER.size + _KEY.size:
        raise CorruptRecord("record shorter than its header")
    magic, crc, body_len = _HEADER.unpack_from(record)
    body = record[_HEADER.size :]
    if magic != MAGIC or body_len != len(body):
        raise CorruptRecord("bad magic or length")
    if zlib.crc32(body) != crc:
        raise CorruptRecord("CRC mismatch")
    seq, boot_len = _KEY.unpack_from(body)
    start = _KEY.size + boot_len
    if start > len(body):
        raise CorruptRecord("boot_id longer than the record")
    try:
        boot_id = body[_KEY.size : start].decode()
    except UnicodeDecodeError as exc:
        raise CorruptRecord("boot_id is not UTF-8") from exc
    return boot_id, seq, body[start:]


def _scan(data: bytes) -> tuple[list[tuple[int, int, str, int]], int]:
    """Valid records in a segment as (offset, size, boot_id, seq), and corrupt regions.

    After a bad record the scan resumes at the next magic, so one flipped bit costs
    one record, and a torn tail (a crash mid-write) costs only the tail.
    """
    found: list[tuple[int, int, str, int]] = []
    corrupt = 0
    pos = 0
    while pos < len(data):
        end = -1
        if len(data) - pos >= _HEADER.size:
            magic, _, body_len = _HEADER.unpack_from(data, pos)
            if magic == MAGIC and _KEY.size <= body_len <= _RECORD_MAX_BYTES:
                end = pos + _HEADER.size + body_len
        if 0 < end <= len(data):
            try:
                boot_id, seq, _ = _unframe(data[pos:end])
            except CorruptRecord:
                pass
            else:
                found.append((pos, end - pos, boot_id, seq))
                pos = end
                continue
        corrupt += 1
        # A good length means the next record starts right after this one.
        if 0 < end < len(data) and data[end : end + len(MAGIC)] == MAGIC:
            pos = end
            continue
        nxt = data.find(MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return found, corrupt


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Counters of a spool at one moment (the first two and the sizes are gauges)."""

    queued: int = 0  # batches not yet acked (ring and disk)
    queued_bytes: int = 0
    appended: int = 0
    acked: int = 0
    recovered: int = 0  # batches found on disk at start
    dropped_full: int = 0
    dropped_corrupt: int = 0
    dropped_invalid: int = 0  # could not be framed at all
    segments: int = 0
    disk_bytes: int = 0
    ring_bytes: int = 0
    fsyncs: int = 0
    write_errors: int = 0


@dataclass(slots=True, eq=False)
class _Entry:
    ordinal: int  # append order: pending() and ``after`` cursors rely on it
    boot_id: str
    seq: int
    size_bytes: int  # framed
    data: bytes | None = None  # the framed record while it is only in memory
    segment: int | None = None  # once on disk
    offset: int = 0
    gone: bool = False  # dropped or discarded: skipped, popped when at the front
    popped: bool = False


@dataclass(slots=True, eq=False)
class _Segment:
    index: int
    path: Path
    size_bytes: int = 0
    live: int = 0  # entries on it not yet popped; 0 and closed → delete the file
    fd: int | None = None  # open for writing while it is the active segment


class Spool:
    """Bounded, crash-safe queue of serialized ``pb.Batch`` keyed by (boot_id, seq).

    Thread-safe: ``append`` from the sampler, ``pending``/``ack``/``discard`` from the
    stream, the writer thread in between. Lifecycle: ``start()``, ``flush(timeout_s)``,
    ``shutdown(timeout_s)``; without ``start()`` nothing reaches the disk until
    ``sync()`` or ``flush()`` is called (tests drive it that way).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
        ring_max_bytes: int = DEFAULT_RING_MAX_BYTES,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock: Clock = time.monotonic,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        """Open (or create) the spool in ``directory`` and recover what is on disk.

        Raises:
            ConfigError: a limit is out of range, or the directory cannot be created.
        """
        if segment_bytes is None:
            segment_bytes = min(_SEGMENT_MAX_DEFAULT_BYTES, max(_SEGMENT_MIN_BYTES, max_bytes // 8))
        if max_bytes < 2 * _SEGMENT_MIN_BYTES:
            raise ConfigError(
                f"spool_max_bytes must be ≥ {2 * _SEGMENT_MIN_BYTES}, not {max_bytes}"
            )
        if not _SEGMENT_MIN_BYTES <= segment_bytes <= max_bytes // 2:
            raise ConfigError(
                f"spool_segment_bytes must be within [{_SEGMENT_MIN_BYTES}, spool_max_bytes / 2],"
                f" not {segment_bytes}"
            )
        if ring_max_bytes <= 0:
            raise ConfigError(f"spool ring must be > 0 bytes, not {ring_max_bytes}")
        if not (math.isfinite(fsync_interval_s) and fsync_interval_s >= 0):
            raise ConfigError(f"fsync_interval_s must be ≥ 0, not {fsync_interval_s}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"spool_dir: cannot create {directory}: {exc.strerror}") from exc
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.ring_max_bytes = ring_max_bytes
        self.fsync_interval_s = fsync_interval_s
        self._clock = clock
        self._fsync = fsync

        self._lock = threading.Lock()  # in-memory state
        self._io_lock = threading.Lock()  # one writer at a time (thread, flush, shutdown)
        self._entries: list[_Entry] = []
        self._head = 0  # entries before it are popped
        self._by_key: dict[Key, _Entry] = {}
        self._ring: deque[_Entry] = deque()
        self._ring_bytes = 0
        self._segments: dict[int, _Segment] = {}  # by index, oldest first
        self._active: _Segment | None = None
        self._next_segment = 1
        self._next_ordinal = 0
        self._acked: dict[str, int] = {}
        # Per boot, the highest seq found on disk at start (acked or not): sent, maybe,
        # by an earlier run, so a collector may ack up to it (``sent_before``).
        self._recovered_high: dict[str, int] = {}
        self._appended_boots: set[str] = set()  # boots this run appended (its own)
        self._acks_dirty = False
        self._queued = 0
        self._queued_bytes = 0
        self._disk_bytes = 0
        self._unsynced = False
        self._last_fsync_s = -math.inf
        self._last_error_log_s = -math.inf
        self._counts = Counters(SpoolStats)

        # The writer's schedule (under _lock), on the monotonic clock: when it looks next
        # unwoken (None: at the next append), whether it must write now (the ring is
        # filling, or shutdown), and the appends' cadence it plans its looks by.
        self._look_at_s: float | None = None
        self._write_now = False
        self._last_append_s: float | None = None
        self._append_gap_s: float | None = None
        self._alarm = threading.Event()  # the schedule changed: the writer reads it again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._recover()

    # --- recovery -------------------------------------------------------------------

    def _segment_path(self, index: int) -> Path:
        return self.directory / f"{_SEGMENT_PREFIX}{index:010d}{_SEGMENT_SUFFIX}"

    def _segment_files(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(_SEGMENT_PREFIX) and name.endswith(_SEGMENT_SUFFIX):
                digits = name[len(_SEGMENT_PREFIX) : -len(_SEGMENT_SUFFIX)]
                if digits.isdigit():
                    found.append((int(digits), path))
        return sorted(found)

    def _load_acks(self) -> dict[str, int]:
        try:
            raw = json.loads((self.directory / _ACKS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            # Absent, torn or absurd (nesting past the decoder's limit): worst case we
            # resend what the collector has.
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): v for k, v in raw.items() if isinstance(v, int) and v >= 0}

    def _recover(self) -> None:
        acked = self._load_acks()
        try:
            files = self._segment_files()
        except OSError as exc:
            log.warning("spool %s: cannot list segments: %s", self.directory, exc)
            files = []
        for index, path in files:
            # Never reuse the name of a segment we could not read, nor of any other.
            self._next_segment = max(self._next_segment, index + 1)
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("spool: skipping unreadable segment %s: %s", path, exc)
                self._counts.add(dropped_corrupt=1)
                continue
            found, corrupt = _scan(data)
            if corrupt:
                log.warning("spool: %s: skipped %d corrupt or torn record(s)", path, corrupt)
                self._counts.add(dropped_corrupt=corrupt)
            segment = _Segment(index, path, size_bytes=len(data))
            high = self._recovered_high
            for offset, size, boot_id, seq in found:
                key = (boot_id, seq)
                high[boot_id] = max(high.get(boot_id, 0), seq)
                if seq <= acked.get(boot_id, 0) or key in self._by_key:
                    continue
                self._add_entry(_Entry(self._ordinal(), boot_id, seq, size, None, index, offset))
                segment.live += 1
            if segment.live == 0:
                self._unlink(path)
                continue
            self._segments[index] = segment
            self._disk_bytes += segment.size_bytes
        self._counts.set(recovered=self._queued)
        for boot_id, seq in acked.items():
            self._recovered_high[boot_id] = max(self._recovered_high.get(boot_id, 0), seq)
        boots = {e.boot_id for e in self._entries}
        self._acked = {b: s for b, s in acked.items() if b in boots}
        self._acks_dirty = self._acked != acked
        if self._queued:
            log.info("spool %s: %d unacked batch(es) from before", self.directory, self._queued)

    def _ordinal(self) -> int:
        self._next_ordinal += 1
        return self._next_ordinal

    def _add_entry(self, entry: _Entry) -> None:
        old = self._by_key.get((entry.boot_id, entry.seq))
        if old is not None:
            self._mark_gone(old)  # the same key again: the newer copy wins
        self._entries.append(entry)
        self._by_key[(entry.boot_id, entry.seq)] = entry
        self._queued += 1
        self._queued_bytes += entry.size_bytes

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("spool: cannot delete %s: %s", path, exc)

    # --- the sampler's side ---------------------------------------------------------

    def append(self, batch: pb.Batch) -> None:
        """Queue ``batch`` for delivery; never blocks on the disk, never raises.

        When the ring is over its cap (the disk lags), the oldest ring records are
        dropped and counted in ``dropped_full``.
        """
        try:
            record = frame_record(batch.boot_id, batch.seq, batch.SerializeToString())
        except (ValueError, struct.error) as exc:
            log.warning("spool: cannot frame batch %s/%d: %s", batch.boot_id, batch.seq, exc)
            with self._lock:
                self._counts.add(dropped_invalid=1)
            return
        with self._lock:
            if len(record) > min(self.ring_max_bytes, _RECORD_MAX_BYTES):
                log.warning("spool: batch %d is %d bytes, over the ring", batch.seq, len(record))
                self._counts.add(dropped_invalid=1)
                return
            entry = _Entry(self._ordinal(), batch.boot_id, batch.seq, len(record), record)
            self._appended_boots.add(batch.boot_id)
            self._add_entry(entry)
            self._ring.append(entry)
            self._ring_bytes += entry.size_bytes
            self._counts.add(appended=1)
            self._schedule_after_append()
            while self._ring_bytes > self.ring_max_bytes and len(self._ring) > 1:
                old = self._ring.popleft()
                self._ring_bytes -= old.size_bytes
                if self._mark_gone(old):
                    self._counts.add(dropped_full=1)
            self._pop_front()
            if self._ring_bytes > self.ring_max_bytes // 2:
                self._write_now = True  # write early rather than drop
                self._alarm.set()

    def _schedule_after_append(self) -> None:
        """Have the writer look at most ``fsync_interval_s`` from now; caller holds _lock.

        The writer is woken only when its planned look would come later than that: in a
        steady cadence it planned this append's look already, and sleeps through it.
        """
        now_s = time.monotonic()
        if self._last_append_s is not None:
            self._append_gap_s = now_s - self._last_append_s
        self._last_append_s = now_s
        need_s = now_s + self._writer_interval_s()
        if self._look_at_s is None or self._look_at_s > need_s:
            self._look_at_s = need_s
            self._alarm.set()

    def _writer_interval_s(self) -> float:
        # fsync_interval_s = 0 means "every write", not a busy loop.
        return max(self.fsync_interval_s, 0.05)

    def _plan_next_look(self, now_s: float) -> float | None:
        """When the writer looks next unwoken, after a pass at ``now_s``; caller holds _lock.

        With records left (a write failed) or bytes unsynced: one interval on. With
        nothing left: just before the interval after the append the cadence predicts,
        so that append needs no wakeup (the ack has had most of the interval to land);
        once the cadence stops, not at all until the next append.
        """
        interval_s = self._writer_interval_s()
        if self._ring or self._unsynced:
            return now_s + interval_s
        if self._last_append_s is None or self._append_gap_s is None:
            return None
        next_append_s = self._last_append_s + self._append_gap_s
        if next_append_s <= now_s:
            return None
        return next_append_s + interval_s * (1 - _LOOK_EARLY)

    # --- the stream's side ----------------------------------------------------------

    def _is_acked(self, entry: _Entry) -> bool:
        return entry.seq <= self._acked.get(entry.boot_id, 0)

    def pending(self, limit: int, after: Key | None = None) -> list[pb.Batch]:
        """Up to ``limit`` batches not yet acked, oldest first.

        Args:
            limit: most batches to return.
            after: (boot_id, seq) of the last batch the caller already has in flight;
                only later batches are returned. A key no longer spooled (acked or
                dropped) means "from the oldest".
        """
        picks: list[tuple[_Entry, bytes | None, int | None, int]] = []
        with self._lock:
            start = self._head
            if after is not None:
                cursor = self._by_key.get(after)
                if cursor is not None and not cursor.popped:
                    start = bisect.bisect_right(
                        self._entries, cursor.ordinal, lo=self._head, key=lambda e: e.ordinal
                    )
            entries = self._entries
            for i in range(start, len(entries)):  # no slice: the backlog may be 100k long
                if len(picks) >= limit:
                    break
                entry = entries[i]
                if entry.gone or self._is_acked(entry):
                    continue
                picks.append((entry, entry.data, entry.segment, entry.offset))
        batches: list[pb.Batch] = []
        corrupt: list[_Entry] = []
        fds: dict[int, int] = {}
        try:
            for entry, data, segment, offset in picks:
                if data is None and segment is not None:
                    data = self._read(fds, segment, offset, entry.size_bytes)
                if data is None:
                    continue  # its segment was dropped meanwhile: already counted
                try:
                    _, _, payload = _unframe(data)
                    batches.append(pb.Batch.FromString(payload))
                except (CorruptRecord, DecodeError) as exc:
                    log.warning("spool: dropping corrupt batch %d: %s", entry.seq, exc)
                    corrupt.append(entry)
        finally:
            for fd in fds.values():
                os.close(fd)
        if corrupt:
            with self._lock:
                for entry in corrupt:
                    if self._mark_gone(entry):
                        self._counts.add(dropped_corrupt=1)
                self._pop_front()
        return batches

    def _read(self, fds: dict[int, int], segment: int, offset: int, size: int) -> bytes | None:
        try:
            fd = fds.get(segment)
            if fd is None:
                fd = fds[segment] = os.open(self._segment_path(segment), os.O_RDONLY)
            return os.pread(fd, size, offset)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("spool: cannot read segment %d: %s", segment, exc)
            return b""  # unframes as corrupt: skipped and counted, never retried forever

    def sent_before(self, boot_id: str) -> int:
        """The highest seq of ``boot_id`` an earlier run may have sent (found on disk at start)."""
        with self._lock:
            return self._recovered_high.get(boot_id, 0)

    def is_earlier_run(self, boot_id: str) -> bool:
        """Whether ``boot_id`` is only an earlier run's (recovered, never appended by this one)."""
        with self._lock:
            return boot_id in self._recovered_high and boot_id not in self._appended_boots

    def acked(self, boot_id: str) -> int:
        """The highest seq of ``boot_id`` acked so far, by any collector (0: none)."""
        with self._lock:
            return self._acked.get(boot_id, 0)

    def ack(self, boot_id: str, seq: int) -> int:
        """Cumulative ack: every batch of ``boot_id`` up to ``seq`` is delivered.

        Returns:
            How many spooled batches this ack newly settled.
        """
        with self._lock:
            prev = self._acked.get(boot_id, 0)
            if seq <= prev:
                return 0
            self._acked[boot_id] = seq
            settled = [
                e for e in self._newly_acked(boot_id, prev, seq) if not e.gone and not e.popped
            ]
            # acked.json only spares resending records that are on disk: an ack of
            # batches still in the ring (the usual case) needs no write.
            if any(e.segment is not None for e in settled):
                self._acks_dirty = True
            for entry in settled:
                self._queued -= 1
                self._queued_bytes -= entry.size_bytes
            self._counts.add(acked=len(settled))
            self._pop_front()
            return len(settled)

    def _newly_acked(self, boot_id: str, prev: int, seq: int) -> Iterable[_Entry]:
        if seq - prev <= len(self._by_key):
            keys = ((boot_id, s) for s in range(prev + 1, seq + 1))
            return [e for k in keys if (e := self._by_key.get(k)) is not None]
        # A huge jump (a new collector's first ack): walk the entries instead.
        return [e for e in self._by_key.values() if e.boot_id == boot_id and prev < e.seq <= seq]

    def discard(self, boot_id: str, seq: int) -> bool:
        """Drop one batch without an ack (the collector rejected it); True if it was here."""
        with self._lock:
            entry = self._by_key.get((boot_id, seq))
            if entry is None or entry.popped or self._is_acked(entry):
                return False
            gone = self._mark_gone(entry)
            self._pop_front()
            return gone

    def _mark_gone(self, entry: _Entry) -> bool:
        """Mark ``entry`` dropped; True if it still counted as queued."""
        if entry.gone or entry.popped:
            return False
        entry.gone = True
        if self._by_key.get((entry.boot_id, entry.seq)) is entry:
            del self._by_key[(entry.boot_id, entry.seq)]
        if self._is_acked(entry):
            return False
        self._queued -= 1
        self._queued_bytes -= entry.size_bytes
        return True

    def _pop_front(self) -> None:
        entries = self._entries
        while self._head < len(entries):
            entry = entries[self._head]
            if not (entry.gone or self._is_acked(entry)):
                break
            entry.popped = True
            entry.data = None  # the ring drops it lazily; the bytes can go now
            key = (entry.boot_id, entry.seq)
            if self._by_key.get(key) is entry:
                del self._by_key[key]
            if entry.segment is not None:
                segment = self._segments.get(entry.segment)
                if segment is not None:
                    segment.live -= 1
                    if segment.live <= 0 and segment is not self._active:
                        self._remove_segment(segment)
            self._head += 1
        # Compact now and then so the list does not grow with every batch ever sent.
        if self._head > 1024 and self._head * 2 > len(entries):
            del entries[: self._head]
            self._head = 0

    def _remove_segment(self, segment: _Segment) -> None:
        self._segments.pop(segment.index, None)
        self._disk_bytes -= segment.size_bytes
        self._unlink(segment.path)

    # --- the writer -----------------------------------------------------------------

    def sync(self, *, force: bool = False) -> None:
        """One writer step: move the ring to disk; fsync when the interval has passed.

        ``force`` fsyncs regardless of the interval (flush, shutdown). Disk errors are
        counted and logged; the records stay in the ring and are retried.
        """
        with self._io_lock:
            self._sync_locked(force)

    def _sync_locked(self, force: bool) -> None:
        with self._lock:
            todo: list[_Entry] = []
            while self._ring:
                entry = self._ring.popleft()
                self._ring_bytes -= entry.size_bytes
                if entry.gone or entry.popped or self._is_acked(entry):
                    entry.data = None  # delivered before it reached the disk
                    continue
                todo.append(entry)
        written = 0
        try:
            for entry in todo:
                self._write(entry)
                written += 1
            self._maybe_fsync(force)
        except OSError as exc:
            self._on_write_error(exc, todo[written:])
        if self._acks_dirty:
            self._save_acks()

    def _write(self, entry: _Entry) -> None:
        data = entry.data
        if data is None:
            return
        segment = self._writable_segment(entry.size_bytes)
        assert segment.fd is not None  # _writable_segment opened it
        offset = segment.size_bytes
        view = memoryview(data)
        while view:
            view = view[os.write(segment.fd, view) :]
        segment.size_bytes += len(data)
        self._unsynced = True
        with self._lock:
            self._disk_bytes += len(data)
            if self._is_acked(entry):
                self._acks_dirty = True  # acked while being written: say so on disk too
            if entry.popped:
                return  # acked while being written: dead bytes in the file
            entry.segment = segment.index
            entry.offset = offset
            entry.data = None
            segment.live += 1

    def _writable_segment(self, size_bytes: int) -> _Segment:
        active = self._active
        if active is not None and active.size_bytes + size_bytes > self.segment_bytes:
            if active.size_bytes > 0:
                self._close_active()
                active = None
        self._make_room(size_bytes)
        if self._active is None:
            self._open_segment()
        assert self._active is not None
        return self._active

    def _make_room(self, size_bytes: int) -> None:
        """Drop oldest closed segments until ``size_bytes`` more fits under the cap."""
        while self._disk_bytes + size_bytes > self.max_bytes:
            with self._lock:
                oldest = next((s for s in self._segments.values() if s is not self._active), None)
                if oldest is None:
                    if self._active is None or self._active.size_bytes == 0:
                        return  # nothing left to drop: the record alone is over the cap
                else:
                    dropped = 0
                    for entry in self._entries[self._head :]:
                        if entry.segment == oldest.index and self._mark_gone(entry):
                            dropped += 1
                    self._counts.add(dropped_full=dropped)
                    self._pop_front()
                    if oldest.index in self._segments:
                        self._remove_segment(oldest)
                    log.warning("spool full: dropped %d oldest batch(es)", dropped)
                    continue
            self._close_active()  # only the active one is left: rotate, then drop it

    def _open_segment(self) -> None:
        index = self._next_segment
        self._next_segment += 1
        path = self._segment_path(index)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        segment = _Segment(index, path, fd=fd)
        with self._lock:
            self._segments[index] = segment
            self._active = segment
        self._fsync_dir()  # the new name must survive a power cut, not just its bytes

    def _close_active(self) -> None:
        segment = self._active
        if segment is None:
            return
        try:
            if segment.fd is not None and self._unsynced:
                self._do_fsync(segment.fd)
        finally:
            if segment.fd is not None:
                os.close(segment.fd)
                segment.fd = None
            with self._lock:
                self._active = None
                if segment.live <= 0 and segment.index in self._segments:
                    self._remove_segment(segment)

    def _maybe_fsync(self, force: bool) -> None:
        if not self._unsynced or self._active is None or self._active.fd is None:
            return
        if force or self._clock() - self._last_fsync_s >= self.fsync_interval_s:
            self._do_fsync(self._active.fd)

    def _do_fsync(self, fd: int) -> None:
        self._fsync(fd)
        self._counts.add(fsyncs=1)
        self._unsynced = False
        self._last_fsync_s = self._clock()

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            self._fsync(fd)
        except OSError as exc:
            log.debug("spool: fsync of %s: %s", self.directory, exc)
        finally:
            os.close(fd)

    def _on_write_error(self, exc: OSError, unwritten: list[_Entry]) -> None:
        with self._lock:
            self._counts.add(write_errors=1)
            # Back to the ring, oldest first: the stream can still send them from memory.
            for entry in reversed(unwritten):
                if entry.data is not None and not entry.popped:
                    self._ring.appendleft(entry)
                    self._ring_bytes += entry.size_bytes
        now = self._clock()
        if now - self._last_error_log_s >= _ERROR_LOG_INTERVAL_S:
            self._last_error_log_s = now
            log.warning(
                "spool %s: write failed (%s); keeping batches in memory", self.directory, exc
            )
        # A half-written record must not stay in front of later ones: cut it off and
        # start a fresh segment next time.
        segment = self._active
        if segment is not None and segment.fd is not None:
            try:
                os.ftruncate(segment.fd, segment.size_bytes)
            except OSError:
                pass
            try:
                self._close_active()
            except OSError:
                pass

    def _save_acks(self) -> None:
        with self._lock:
            acked = dict(self._acked)
            self._acks_dirty = False
        tmp = self.directory / (_ACKS_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(acked), encoding="utf-8")
            os.replace(tmp, self.directory / _ACKS_FILE)
        except OSError as exc:
            with self._lock:
                self._acks_dirty = True
                self._counts.add(write_errors=1)
            log.debug("spool: cannot save acks: %s", exc)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name="rooftop-spool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Each append's records wait up to the interval for the collector's ack (an acked
        # batch is never written), then the writer looks; a filling ring or shutdown cuts
        # that short. Idle, the writer sleeps until an append: no periodic wakeups. In a
        # steady cadence (a batch a second) it wakes once per batch, not at the append
        # and again at the interval (each wakeup costs ~0.1 ms of CPU on a VM).
        while not self._stop.is_set():
            self._alarm.clear()  # before reading the schedule: a change from here on wakes
            with self._lock:
                look_at_s, write_now = self._look_at_s, self._write_now
            wait_s = None if look_at_s is None else look_at_s - time.monotonic()
            if not write_now and (wait_s is None or wait_s > 0):
                self._alarm.wait(wait_s)
                continue
            with self._lock:
                self._write_now = False
                self._look_at_s = None  # taken: an append during the pass plans anew
            try:
                self.sync()
            except Exception:  # thread boundary: log, keep the writer alive
                log.exception("spool writer failed; retrying")
            with self._lock:
                planned_s = self._plan_next_look(time.monotonic())
                # An append during the pass may have asked for an earlier look already.
                if planned_s is not None and (
                    self._look_at_s is None or planned_s < self._look_at_s
                ):
                    self._look_at_s = planned_s

    def flush(self, timeout_s: float) -> bool:
        """Write and fsync everything appended so far; False if the disk did not take it."""
        if not self._io_lock.acquire(timeout=max(0.0, timeout_s)):
            return False
        try:
            self._sync_locked(True)
        finally:
            self._io_lock.release()
        with self._lock:
            return not self._ring and not self._unsynced

    def shutdown(self, timeout_s: float) -> None:
        """Stop the writer, flush, close the files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._alarm.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self.flush(max(0.0, deadline - time.monotonic()))
        with self._io_lock:
            try:
                self._close_active()
            except OSError as exc:
                log.warning("spool: closing the active segment: %s", exc)

    # --- introspection --------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Batches not yet acked."""
        with self._lock:
            return self._queued

    def stats(self) -> SpoolStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(
                self._counts.get(),
                queued=self._queued,
                queued_bytes=self._queued_bytes,
                segments=len(self._segments),
                disk_bytes=self._disk_bytes,
                ring_bytes=self._ring_bytes,
            )
