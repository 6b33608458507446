"""GPU samples as columns (``pb.GpuColumns``): encode, check and decode. Pure.

The agent's batcher encodes a batch's GPU samples as columns straight from the model
(``encode_samples``; ``encode`` takes messages); the collector checks a whole batch a
column at a time (``Columns.read``) and keeps the newest row of each GPU as a sample
whose metrics are decoded when something first reads them (``Columns.lazy_sample``),
or reads one field over every row for outputs that read a few fields of each
(``Columns.field_values``: remote write). ``Columns.samples_at`` decodes rows eagerly,
each column once for all of them.

Each column is ``bytes`` of fixed-width little-endian values. Checking a metric
column is one big-integer operation over it: for non-negative IEEE-754 doubles the
bit pattern orders as an unsigned integer, NaN and infinity sort above every finite
value and negatives have the sign bit, so "every value is finite, ≥ 0 and ≤ its
ceiling" is "every 64-bit lane is ≤ the ceiling's bits", which SWAR arithmetic on
one Python int answers without a Python object per value. Only a column failing
that test is walked value by value, to name the row (and to accept -0.0, which the
records path accepts too).

What counts as bad is what ``rooftop.collector.fleet.decode_batch`` refuses in a
record (NaN, infinite, negative, a percentage over 100.5, beyond ``UPPER_BOUNDS``, a
time before ``earliest_s``, an identity with control characters), plus columns
that do not fit together (``bad_columns``: a length that disagrees with ``rows`` or
``presence``, a string index out of range, a string listed twice).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, repeat
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

from google.protobuf.descriptor import FieldDescriptor

from rooftop.common.model import (
    PCT_SLACK,
    PERCENT_FIELDS,
    UPPER_BOUNDS,
    GpuProcess,
    GpuSample,
    PodRef,
)
from rooftop.common.text import identity_problem
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "Columns",
    "ColumnsProblem",
    "columnable",
    "encode",
    "encode_samples",
    "micros_s",
]

_MAX_FINITE_BITS = 0x7FEFFFFFFFFFFFFF
_SIGN = 1 << 63
_INT64_MICROS = (-(2**63), 2**63 - 1)
_PROC_MEM, _PROC_NAME, _PROC_SLURM = 1, 2, 4
_LOST, _GPM_STALE = 1, 2


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    number: int  # the GpuSample field number: its bit in ``presence``
    fmt: str  # struct format of one value: d, Q, B or I (a string index)
    width: int
    ceiling_bits: int  # doubles: the largest valid bit pattern

    @property
    def unpack_from(self) -> Any:
        """``struct.unpack_from`` for one value of this column."""
        return _STRUCTS[self.fmt].unpack_from


def _ceiling_bits(name: str) -> int:
    if name in PERCENT_FIELDS:
        ceiling = 100 + PCT_SLACK
    elif name in UPPER_BOUNDS:
        ceiling = UPPER_BOUNDS[name]
    else:
        return _MAX_FINITE_BITS
    return int(struct.unpack("<Q", struct.pack("<d", ceiling))[0])


def _metric(fd: FieldDescriptor) -> _Metric:
    if fd.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
        return _Metric(fd.name, fd.number, "d", 8, _ceiling_bits(fd.name))
    if fd.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return _Metric(fd.name, fd.number, "B", 1, 0)
    if fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return _Metric(fd.name, fd.number, "I", 4, 0)
    return _Metric(fd.name, fd.number, "Q", 8, 0)


# Every optional scalar of GpuSample (proto3 ``optional``), by field number.
_METRICS = tuple(
    _metric(fd)
    for fd in pb.GpuSample.DESCRIPTOR.fields
    if fd.has_presence and fd.message_type is None and not fd.is_repeated
)
_DOUBLES = tuple(m for m in _METRICS if m.fmt == "d")
_METRIC_NAMES = tuple(m.name for m in _METRICS)
_STRUCTS = {fmt: struct.Struct("<" + fmt) for fmt in "dQBI"}


@lru_cache(maxsize=1024)
def _present(mask: int) -> tuple[_Metric, ...]:
    # The metrics a presence mask sets: rows of one batch share a handful of masks.
    return tuple(m for m in _METRICS if mask >> m.number & 1)


@lru_cache(maxsize=1024)
def _plan(mask: int) -> tuple[tuple[str, int, Any, int, int], ...]:
    # (column, position in GpuSample's fields, unpack_from, width, field number) per metric.
    return tuple((m.name, _AT[m.name], m.unpack_from, m.width, m.number) for m in _present(mask))


@lru_cache(maxsize=1024)
def _column_plan(mask: int) -> tuple[tuple[str, int, str], ...]:
    # (column, position in GpuSample's fields, struct format) per metric: samples_at.
    return tuple((m.name, _AT[m.name], m.fmt) for m in _present(mask))


# GpuSample's fields in order, and their defaults: ``sample`` fills in a copy.
_AT = {f.name: i for i, f in enumerate(dataclasses.fields(GpuSample))}
_DEFAULTS: list[Any] = [
    None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(GpuSample)
]


# Metrics stored as something else than their value: bools (u8), strings (an index).
_CONVERTED = sum(1 << m.number for m in _METRICS if m.fmt in "BI")


def _nth_row(presence: bytes, number: int, k: int) -> int:
    # The row of the k-th value of the metric with field number ``number``.
    rows = [i for i, m in enumerate(_unpack("Q", presence)) if m >> number & 1]
    return rows[k]


_ROW_COLUMNS = {"time_us": 8, "gpu_index": 4, "gpu_uuid": 4, "gpu_name": 4, "mig_uuid": 4,
                "presence": 8, "flags": 1}  # fmt: skip
# Per-row columns that may hold one value standing for every row (time_us may not).
_REPEATABLE = {n: w for n, w in _ROW_COLUMNS.items() if n != "time_us"}
_REPEATABLE.update(xid_codes_per_row=4, processes_per_row=4, pods_per_row=4)
_LISTS = {  # per-row count column -> (flattened column, bytes per entry)
    "xid_codes_per_row": (("xid_codes", 4),),
    "processes_per_row": (
        ("process_pid", 4),
        ("process_presence", 1),
        ("process_gpu_mem_bytes", 8),
        ("process_name", 4),
        ("process_slurm_job_id", 4),
    ),
    "pods_per_row": (("pod_pod", 4), ("pod_namespace", 4), ("pod_container", 4)),
}
_STRING_INDEX_COLUMNS = (
    "gpu_uuid", "gpu_name", "mig_uuid", "inaccessible", "process_name",
    "process_slurm_job_id", "pod_pod", "pod_namespace", "pod_container",
)  # fmt: skip
_IDENTITIES = ("gpu_uuid", "gpu_name", "mig_uuid")


class ColumnsProblem(NamedTuple):
    """Why a ``GpuColumns`` cannot be applied: a reject reason and one line naming it.

    ``reason`` is one of ``bad_columns``, ``invalid_value``, ``bad_time``,
    ``bad_identity`` (the collector's ``RejectReason`` values).
    """

    reason: str
    message: str


def _unpack(fmt: str, raw: bytes) -> tuple[Any, ...]:
    return _unpacker(fmt, len(raw)).unpack(raw)


def _xids(columns: Columns) -> tuple[int, ...]:
    return _unpack("I", columns._cols["xid_codes"])


def _xid_code_counts(columns: Columns) -> tuple[int, ...]:
    return _unpack("Q", columns._cols["xid_code_counts"])


def _values(fmt: str, raw: bytes) -> Sequence[Any]:
    # A column's values, indexable without unpacking the rows nobody asks for: a
    # memoryview in the machine's order where that is the wire's (little-endian).
    if _LITTLE_ENDIAN:
        view: Sequence[Any] = memoryview(raw).cast(fmt)  # type: ignore[call-overload]
        return view
    return _unpack(fmt, raw)


_LITTLE_ENDIAN = sys.byteorder == "little"


@lru_cache(maxsize=4096)
def _unpacker(fmt: str, size: int) -> struct.Struct:
    # One compiled Struct per (format, column length): the same few per batch shape.
    return struct.Struct(f"<{size // struct.calcsize(fmt)}{fmt}")


@lru_cache(maxsize=256)
def _lanes(value: int, count: int, width: int) -> int:
    # ``value`` in each of ``count`` lanes of ``width`` bytes, as one int.
    return int.from_bytes(value.to_bytes(width, "little") * count, "little")


def _all_within(raw: bytes, ceiling: int, width: int = 8, floor: int = 0) -> bool:
    """Whether every unsigned lane of ``raw`` lies in floor..ceiling (both < 2^(8·width-1)).

    SWAR on one Python int: lanes with the top bit set are out at once; for the rest
    (ceiling + top) - x and (x + top) - floor never borrow across lanes, and keep
    their top bit exactly when x ≤ ceiling, x ≥ floor. For f64 bit patterns: finite,
    ≥ 0 and ≤ a ceiling (NaN and infinity sort above every finite value).
    """
    count = len(raw) // width
    if not count:
        return True
    x = int.from_bytes(raw, "little")
    top = 1 << (8 * width - 1)
    high = _lanes(top, count, width)
    if x & high:
        return False  # a negative value (or -0.0: the slow path decides)
    if (_lanes(ceiling | top, count, width) - x) & high != high:
        return False
    return not floor or ((x | high) - _lanes(floor, count, width)) & high == high


@lru_cache(maxsize=256)
def _ceilings(layout: tuple[tuple[int, int], ...], width: int) -> int:
    # Each (ceiling, count) of ``layout`` in turn, top bit set, as one int of lanes.
    top = 1 << (8 * width - 1)
    joined = b"".join((c | top).to_bytes(width, "little") * n for c, n in layout)
    return int.from_bytes(joined, "little")


def _all_within_each(
    parts: Sequence[tuple[bytes, int]], width: int, ceilings: int | None = None
) -> bool:
    """``_all_within`` for several columns, each with its own ceiling, in one operation.

    ``ceilings``: the lanes' ceilings as ``_ceilings`` makes them, when already known.
    """
    joined = b"".join(raw for raw, _ in parts)
    count = len(joined) // width
    if not count:
        return True
    x = int.from_bytes(joined, "little")
    high = _lanes(1 << (8 * width - 1), count, width)
    if x & high:
        return False
    if ceilings is None:
        ceilings = _ceilings(tuple((c, len(raw) // width) for raw, c in parts), width)
    return (ceilings - x) & high == high


def _doubles_within(parts: Sequence[tuple[bytes, int]]) -> bool:
    """Whether every f64 of each column is finite, ≥ 0 and ≤ that column's ceiling bits.

    First on the top 16 bits of each value only (a quarter of the bytes to turn into
    an int): strictly below the ceiling's top 16 bits is within it. A column where
    that does not settle it (a value at 100 % shares 100.5's top bits) is then
    tested on whole values.
    """
    top = bytearray(sum(len(raw) for raw, _ in parts) // 4)
    at = 0
    for raw, _ in parts:
        end = at + len(raw) // 4
        top[at:end:2] = raw[6::8]  # each value's bytes 6 and 7 (little-endian): its top 16 bits
        top[at + 1 : end : 2] = raw[7::8]
        at = end
    layout = tuple(((c >> 48) - 1, len(raw) // 8) for raw, c in parts)
    if _all_within_each([(bytes(top), 0)], 2, _ceilings(layout, 2)):
        return True
    return all(_all_within(raw, ceiling) for raw, ceiling in parts)


_FIELD_NAMES = frozenset(_AT)
_IDENTITY = ("gpu_index", "gpu_uuid", "gpu_name", "mig_uuid")  # Columns._identity's order
_EAGER = frozenset({"time_s", *_IDENTITY})
_DECODED_LATER = tuple(_FIELD_NAMES - _EAGER)


class _LazyGpuSample(GpuSample):
    """A ``GpuSample`` of one ``Columns`` row whose metrics are decoded at first read.

    Made by ``Columns.lazy_sample`` with only its identity and time set. Reading a field
    not set yet misses its slot and lands in ``__getattr__``, which decodes the whole
    row once into the slots (the dataclass is frozen: ``object.__setattr__``, as its own
    ``__init__`` does) and then lets the batch's columns go; later reads are plain slot
    reads. Two threads decoding at once write the same values, and one that finds the
    columns gone reads what the other wrote (every field is set before they go), so a
    race only costs time. Equal to, and hashing as, the ``GpuSample`` of the same values.
    """

    __slots__ = ("_columns", "_row")

    def __getattr__(self, name: str) -> Any:
        if name not in _FIELD_NAMES or name in _EAGER:
            raise AttributeError(name)
        columns: Columns | None = object.__getattribute__(self, "_columns")
        if columns is None:  # another thread decoded the row meanwhile
            return object.__getattribute__(self, name)
        full = columns.sample(object.__getattribute__(self, "_row"))
        for field_name in _DECODED_LATER:
            object.__setattr__(self, field_name, getattr(full, field_name))
        object.__setattr__(self, "_columns", None)  # the batch's columns: no longer held
        return object.__getattribute__(self, name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GpuSample):
            return NotImplemented
        return _as_tuple(self) == _as_tuple(other)

    __hash__ = GpuSample.__hash__

    def __repr__(self) -> str:
        return "GpuSample" + GpuSample.__repr__(self).removeprefix(type(self).__qualname__)


_as_tuple = attrgetter(*_AT)


def _value_problem(name: str, value: float) -> str | None:
    # Mirror of fleet._invalid_field for one double (the slow path).
    if value != value or value in (float("inf"), float("-inf")):
        return f"{name} is {value}"
    if value < 0:
        return f"{name} is negative ({value})"
    if name in PERCENT_FIELDS and value > 100 + PCT_SLACK:
        return f"{name} is over 100 ({value})"
    if name in UPPER_BOUNDS and value > UPPER_BOUNDS[name]:
        return f"{name} is over its ceiling {UPPER_BOUNDS[name]:g} ({value:g})"
    return None


_TIME = struct.Struct("<q")
_U32 = struct.Struct("<I")


class Columns:
    """A checked ``GpuColumns``: its rows' times and devices, and each row decoded on demand.

    Make one with ``Columns.read``, which checks everything first.
    """

    __slots__ = ("_cols", "_mask", "_masks", "_offsets", "_positions", "rows", "strings")

    def __init__(
        self,
        cols: dict[str, Any],
        strings: tuple[str, ...],
        rows: int,
        masks: tuple[int, ...] | None,
    ) -> None:
        self._cols = cols  # column name -> bytes, set columns only (one copy each)
        self.rows = rows
        self.strings = strings
        # One presence mask for every row (the usual case), or each row's.
        self._masks = masks
        self._mask: int = (
            struct.unpack_from("<Q", cols["presence"])[0] if rows and masks is None else 0
        )
        self._offsets: dict[str, list[int]] = {}
        self._positions: dict[int, Counter[int]] = {}

    @classmethod
    def read(
        cls, cols: pb.GpuColumns, *, earliest_s: float, values: bool = True
    ) -> Columns | ColumnsProblem:
        """Check ``cols`` a column at a time; the reader, or the first problem found.

        Args:
            cols: the batch's columns.
            earliest_s: a sample dated before this (Unix epoch seconds) is ``bad_time``.
            values: also judge the values (metrics, times, identities); False checks
                only that the columns fit together (the agent, turning its own columns
                back into records for a collector to judge).
        """
        rows = cols.rows
        # Each set column once (reading a bytes field copies it): name -> value.
        got: dict[str, Any] = {fd.name: value for fd, value in cols.ListFields()}
        # time_us first: it is never shortened, so ``rows`` is bounded by the message.
        if len(got.get("time_us", b"")) != rows * 8:
            return _bad(f"time_us holds {len(got.get('time_us', b''))} bytes for {rows} rows")
        if rows > 1:
            for name, width in _REPEATABLE.items():
                if len(got.get(name, b"")) == width:
                    got[name] *= rows  # one value for every row
        for name, width in _ROW_COLUMNS.items():
            if len(got.get(name, b"")) != rows * width:
                return _bad(f"{name} holds {len(got.get(name, b''))} bytes for {rows} rows")
        presence: bytes = got.get("presence", b"")
        masks: tuple[int, ...] | None = None
        if presence == presence[:8] * rows:
            counted = Counter({struct.unpack_from("<Q", presence)[0]: rows} if rows else {})
        else:
            masks = _unpack("Q", presence)
            counted = Counter(masks)
        expected = dict.fromkeys(_METRIC_NAMES, 0)
        for mask, count in counted.items():
            for metric in _present(mask):
                expected[metric.name] += count
        for metric in _METRICS:
            present = expected[metric.name]
            size = len(got.get(metric.name, b""))
            if present > 1 and size == metric.width:
                got[metric.name] *= present  # one value for every row that has it
                size *= present
            if size != present * metric.width:
                return _bad(f"{metric.name} holds {size} bytes for {present} present rows")
        strings = tuple(got.get("strings", ()))
        if len(set(strings)) != len(strings):
            return _bad("strings lists a string twice")
        for count_name, flattened in _LISTS.items():
            raw = got.get(count_name, b"")
            if not raw:
                if any(name in got for name, _ in flattened):
                    return _bad(f"{flattened[0][0]} without {count_name}")
                continue
            if len(raw) != rows * 4:
                return _bad(f"{count_name} holds {len(raw)} bytes for {rows} rows")
            entries = sum(_unpack("I", raw))
            for name, width in flattened:
                size = len(got.get(name, b""))
                if size != entries * width:
                    return _bad(f"{name} holds {size} bytes for {entries} entries")
        # Per-code XID counts: none (an older agent), or one u64 per xid code.
        code_counts = len(got.get("xid_code_counts", b""))
        if code_counts and code_counts != len(got.get("xid_codes", b"")) * 2:
            return _bad(f"xid_code_counts holds {code_counts} bytes for "
                        f"{len(got.get('xid_codes', b'')) // 4} xid codes")
        # Whole columns at once: the quick test over all of them, then (only when it
        # fails) column by column to name the culprit.
        indices = [(got[n], len(strings) - 1) for n in _STRING_INDEX_COLUMNS if n in got]
        if indices and (not strings or not _all_within_each(indices, 4)):
            for name in _STRING_INDEX_COLUMNS:
                raw = got.get(name, b"")
                if raw and (not strings or max(_unpack("I", raw)) >= len(strings)):
                    return _bad(f"{name} names a string past the {len(strings)} listed")
        if not values:
            return cls(got, strings, rows, masks)
        doubles = [(got[m.name], m.ceiling_bits) for m in _DOUBLES if m.name in got]
        if not _doubles_within(doubles):
            for metric in _DOUBLES:
                for k, value in enumerate(_unpack("d", got.get(metric.name, b""))):
                    problem = _value_problem(metric.name, value)
                    if problem is not None:
                        row = _nth_row(presence, metric.number, k)
                        return ColumnsProblem("invalid_value", f"gpu row {row}: {problem}")
        earliest_us = math.ceil(earliest_s * 1e6)
        if not _all_within(got.get("time_us", b""), 2**63 - 1, 8, earliest_us):
            times = _unpack("q", got["time_us"])
            row = next(i for i, t in enumerate(times) if t < earliest_us)
            return ColumnsProblem(
                "bad_time", f"gpu row {row}: time {times[row] // 1_000_000} s is too early"
            )
        # Identities: only a string that is not printable needs a look at who names it
        # (a process name may hold any character, as in a record).
        unprintable = [i for i, text in enumerate(strings) if not text.isprintable()]
        if unprintable:
            for name in _IDENTITIES:
                named = set(_unpack("I", got.get(name, b"")))
                for index in unprintable:
                    if index in named:
                        problem = identity_problem(name, strings[index])
                        return ColumnsProblem("bad_identity", f"gpu columns: {problem}")
        return cls(got, strings, rows, masks)

    def time_us(self, row: int) -> int:
        """Row ``row``'s time as sent (Unix epoch microseconds)."""
        return int(_TIME.unpack_from(self._cols["time_us"], row * 8)[0])

    def times_beyond(self, limit_s: float) -> int:
        """How many rows are dated after ``limit_s`` (Unix epoch seconds)."""
        raw = self._cols.get("time_us", b"")
        if _all_within(raw, max(0, math.floor(limit_s * 1e6)), 8):
            return 0
        return sum(1 for t in _unpack("q", raw) if micros_s(t) > limit_s)

    def device_rows(self) -> dict[tuple[int, str], int]:
        """(gpu_index, mig_uuid) -> the last row of that device (its newest sample).

        In order of each device's first row, as the records path finds them.
        """
        cols, rows = self._cols, self.rows
        if not rows:
            return {}
        index, mig = cols["gpu_index"], cols["mig_uuid"]
        if mig == mig[:4] * rows and _all_within(index, 255, 4):
            # One MIG string for all rows (none, usually) and indices < 256: the low bytes
            # are the indices, and bytes' own search finds each one's first and last row.
            low = index[0::4]
            migs = self.strings[_U32.unpack_from(mig)[0]]
            firsts = sorted((low.index(v), v) for v in set(low))
            return {(v, migs): low.rindex(v) for _, v in firsts}
        keys = zip(_unpack("I", index), _unpack("I", mig), strict=True)
        last = dict(zip(keys, range(rows), strict=False))
        return {(i, self.strings[m]): row for (i, m), row in last.items()}

    def sample(self, row: int) -> GpuSample:
        """Row ``row`` as a ``GpuSample`` (its time as sent, unclamped)."""
        cols, strings = self._cols, self.strings
        # Positional arguments in the model's field order: half the cost of keywords.
        args = _DEFAULTS.copy()
        if self._masks is None:
            mask = self._mask
            for name, at, unpack, width, _ in _plan(mask):
                args[at] = unpack(cols[name], row * width)[0]
        else:
            mask = self._masks[row]
            for name, at, unpack, width, number in _plan(mask):
                args[at] = unpack(cols[name], self._position(row, number) * width)[0]
        if mask & _CONVERTED:
            for metric in _present(mask & _CONVERTED):
                value = args[_AT[metric.name]]
                args[_AT[metric.name]] = bool(value) if metric.fmt == "B" else strings[value]
        flags = cols["flags"][row]
        args[_AT["time_s"]] = micros_s(self.time_us(row))
        (
            args[_AT["gpu_index"]], args[_AT["gpu_uuid"]],
            args[_AT["gpu_name"]], args[_AT["mig_uuid"]],
        ) = self._identity(row)  # fmt: skip
        args[_AT["lost"]] = bool(flags & _LOST)
        args[_AT["gpm_stale"]] = bool(flags & _GPM_STALE)
        args[_AT["xid_codes"]] = self._entries("xid_codes_per_row", "xid_codes", "I", row)
        if "xid_code_counts" in cols:
            args[_AT["xid_code_counts"]] = self._entries(
                "xid_codes_per_row", "xid_code_counts", "Q", row
            )
        args[_AT["processes"]] = self._row_list("processes_per_row", Columns._all_processes, row)
        args[_AT["pods"]] = self._row_list("pods_per_row", Columns._all_pods, row)
        return GpuSample(*args)

    def lazy_sample(self, row: int, time_s: float) -> GpuSample:
        """Row ``row`` as a ``GpuSample`` dated ``time_s`` whose metrics are read at first use.

        Its identity (``gpu_index``, ``gpu_uuid``, ``gpu_name``, ``mig_uuid``) and time
        are set now; reading any other field decodes the row once (``sample``). The
        collector keeps the newest sample of each GPU, and most are replaced by the
        next batch before an export reads them: ~2 µs here instead of ~7 for a whole row.
        It equals (and hashes as) the eager ``GpuSample`` of the same values.
        """
        lazy = _LazyGpuSample.__new__(_LazyGpuSample)
        _set = object.__setattr__
        _set(lazy, "_columns", self)
        _set(lazy, "_row", row)
        _set(lazy, "time_s", time_s)
        for name, value in zip(_IDENTITY, self._identity(row), strict=True):
            _set(lazy, name, value)
        return lazy

    def _identity(self, row: int) -> tuple[int, str, str, str]:
        """Row ``row``'s gpu_index, gpu_uuid, gpu_name and mig_uuid."""
        cols, strings, at = self._cols, self.strings, row * 4
        return (
            _U32.unpack_from(cols["gpu_index"], at)[0],
            strings[_U32.unpack_from(cols["gpu_uuid"], at)[0]],
            strings[_U32.unpack_from(cols["gpu_name"], at)[0]],
            strings[_U32.unpack_from(cols["mig_uuid"], at)[0]],
        )

    def samples_at(self, rows: Sequence[int]) -> list[GpuSample]:
        """Rows ``rows`` as ``GpuSample``s, as ``sample`` makes each.

        The collector's per-batch path (the newest row of each GPU) and ``samples``
        (every row): when every row has the same metrics, each column is read once for
        all the rows and the samples are zipped from the columns, instead of ~30
        single-value reads per row; lists (XIDs, processes, pods) are cut from their
        flattened columns by each row's span.
        """
        cols = self._cols
        if len(rows) < 2 or self._masks is not None:
            return [self.sample(row) for row in rows]
        # A tuple of the rows' values, in ``rows`` order (every row: the whole column).
        pick: Callable[[Any], Any] = tuple if rows == range(self.rows) else itemgetter(*rows)
        strings = self.strings
        fields: list[Any] = [repeat(value) for value in _DEFAULTS]
        for name, at, fmt in _column_plan(self._mask):
            fields[at] = self._typed(fmt, pick(_values(fmt, cols[name])))
        fields[_AT["time_s"]] = tuple(map(micros_s, pick(_values("q", cols["time_us"]))))
        fields[_AT["gpu_index"]] = pick(_values("I", cols["gpu_index"]))
        for name in _IDENTITIES:
            fields[_AT[name]] = tuple(map(strings.__getitem__, pick(_values("I", cols[name]))))
        flags = pick(cols["flags"])
        fields[_AT["lost"]] = tuple(bool(f & _LOST) for f in flags)
        fields[_AT["gpm_stale"]] = tuple(bool(f & _GPM_STALE) for f in flags)
        if "xid_codes_per_row" in cols:
            fields[_AT["xid_codes"]] = self._lists(rows, "xid_codes_per_row", _xids)
        if "xid_code_counts" in cols:
            fields[_AT["xid_code_counts"]] = self._lists(
                rows, "xid_codes_per_row", _xid_code_counts
            )
        if "processes_per_row" in cols:
            processes = Columns._all_processes
            fields[_AT["processes"]] = self._lists(rows, "processes_per_row", processes)
        if "pods_per_row" in cols:
            fields[_AT["pods"]] = self._lists(rows, "pods_per_row", Columns._all_pods)
        # The repeat() defaults are endless: the rows' tuples end the zip.
        return [GpuSample(*args) for args in zip(*fields)]  # noqa: B905

    def _typed(self, fmt: str, values: Sequence[Any]) -> Sequence[Any]:
        # A metric column's values as GpuSample holds them: bools, strings (from their
        # index), numbers as they are.
        if fmt == "B":
            return tuple(map(bool, values))
        if fmt == "I":
            return tuple(map(self.strings.__getitem__, values))
        return values

    def _lists(
        self, rows: Sequence[int], count_name: str, entries: Callable[[Columns], Sequence[Any]]
    ) -> tuple[tuple[Any, ...], ...]:
        # Each row's slice of a list column's entries (all decoded once, then cut).
        if not rows or self._span(count_name, 0) is None:
            return ((),) * len(rows)
        offsets = self._offsets[count_name]
        every = entries(self)
        return tuple(tuple(every[offsets[r] : offsets[r + 1]]) for r in rows)

    def _all_processes(self, first: int = 0, end: int | None = None) -> list[GpuProcess]:
        # Process entries [first, end) (every one by default): ``sample``'s one row, too.
        cols, s = self._cols, self.strings
        pids = self._cut("process_pid", "I", first, end)
        mem = self._cut("process_gpu_mem_bytes", "Q", first, end)
        names = self._cut("process_name", "I", first, end)
        jobs = self._cut("process_slurm_job_id", "I", first, end)
        return [
            GpuProcess(
                pid,
                mem[k] if has & _PROC_MEM else None,
                name=s[names[k]] if has & _PROC_NAME else None,
                slurm_job_id=s[jobs[k]] if has & _PROC_SLURM else None,
            )
            for k, (pid, has) in enumerate(
                zip(pids, cols["process_presence"][first:end], strict=True)
            )
        ]

    def _all_pods(self, first: int = 0, end: int | None = None) -> list[PodRef]:
        # Pod entries [first, end) (every one by default): ``sample``'s one row, too.
        s = self.strings
        return [
            PodRef(s[p], s[n], s[c])
            for p, n, c in zip(
                self._cut("pod_pod", "I", first, end),
                self._cut("pod_namespace", "I", first, end),
                self._cut("pod_container", "I", first, end),
                strict=True,
            )
        ]

    def field_values(self, name: str) -> Sequence[Any]:
        """One ``GpuSample`` field over every row, as ``sample`` would give it.

        None where a row lacks a metric. No sample is made per row: for outputs that
        read a few fields of every row (remote write).
        """
        cols, strings, rows = self._cols, self.strings, self.rows
        if not rows:
            return ()
        if name == "time_s":
            return tuple(map(micros_s, _values("q", cols["time_us"])))
        if name == "gpu_index":
            return tuple(_values("I", cols["gpu_index"]))
        if name in _IDENTITIES:
            return tuple(map(strings.__getitem__, _values("I", cols[name])))
        if name in ("lost", "gpm_stale"):
            bit = _LOST if name == "lost" else _GPM_STALE
            return tuple(bool(f & bit) for f in cols["flags"])
        if name in _LIST_FIELDS:
            count_name, column, entries = _LIST_FIELDS[name]
            if column not in cols:
                return ((),) * rows
            return self._lists(range(rows), count_name, entries)
        metric = _METRIC_BY_NAME[name]  # KeyError: not a GpuSample field
        raw = cols.get(name)
        if raw is None:
            return (None,) * rows
        values = self._typed(metric.fmt, _values(metric.fmt, raw))
        if self._masks is None:
            return values if isinstance(values, tuple) else tuple(values)
        # Rows with different metrics: the column holds the rows that have it, in order.
        present = iter(values)
        bit = 1 << metric.number
        return tuple(next(present) if mask & bit else None for mask in self._masks)

    def samples(self) -> Iterator[GpuSample]:
        """Every row as a ``GpuSample``, in row order."""
        masks = self._masks
        if masks is None:
            yield from self.samples_at(range(self.rows))
            return
        # Rows with different metrics present: count the masks seen so far as we go,
        # instead of counting every row's predecessors again (quadratic).
        before: Counter[int] = Counter()
        for row in range(self.rows):
            self._positions[row] = before.copy()
            yield self.sample(row)
            del self._positions[row]
            before[masks[row]] += 1

    def _position(self, row: int, number: int) -> int:
        # Where ``row``'s value sits in a metric column: rows before it with the bit set.
        before = self._positions.get(row)
        if before is None:
            before = self._positions[row] = Counter((self._masks or ())[:row])
        return sum(c for m, c in before.items() if m >> number & 1)

    def _span(self, count_name: str, row: int) -> tuple[int, int] | None:
        raw = self._cols.get(count_name)
        if not raw:
            return None
        offsets = self._offsets.get(count_name)
        if offsets is None:
            offsets = self._offsets[count_name] = list(accumulate(_unpack("I", raw), initial=0))
        return offsets[row], offsets[row + 1]

    def _entries(self, count_name: str, column: str, fmt: str, row: int) -> tuple[Any, ...]:
        span = self._span(count_name, row)
        if span is None or span[0] == span[1]:
            return ()
        return self._cut(column, fmt, *span)

    def _cut(self, column: str, fmt: str, first: int, end: int | None) -> tuple[Any, ...]:
        # Entries [first, end) of a flattened list column (to its end where ``end`` is None).
        width = struct.calcsize(fmt)
        raw = self._cols[column]
        return _unpack(fmt, raw[first * width : None if end is None else end * width])

    def _row_list(
        self, count_name: str, entries: Callable[[Columns, int, int], list[Any]], row: int
    ) -> tuple[Any, ...]:
        # Row ``row``'s processes or pods: the all-rows reader over just its span.
        span = self._span(count_name, row)
        if span is None or span[0] == span[1]:
            return ()
        return tuple(entries(self, *span))


# A list field of GpuSample: (per-row count column, its flattened column, all entries).
_LIST_FIELDS: dict[str, tuple[str, str, Callable[[Columns], Sequence[Any]]]] = {
    "xid_codes": ("xid_codes_per_row", "xid_codes", _xids),
    "xid_code_counts": ("xid_codes_per_row", "xid_code_counts", _xid_code_counts),
    "processes": ("processes_per_row", "process_pid", Columns._all_processes),
    "pods": ("pods_per_row", "pod_pod", Columns._all_pods),
}
_METRIC_BY_NAME = {m.name: m for m in _METRICS}


def micros_s(micros: int) -> float:
    """Unix epoch seconds for microseconds: the float ``codec.timestamp_s`` makes of them."""
    return float(micros // 1_000_000) + (micros % 1_000_000) * 1000 / 1e9


def _bad(message: str) -> ColumnsProblem:
    return ColumnsProblem("bad_columns", f"gpu columns: {message}")


def columnable(msg: pb.GpuSample) -> bool:
    """Whether columns carry ``msg`` exactly: a time in whole microseconds, in range.

    Anything else (no time, nanos out of range) stays a record, so the collector
    judges it as it always has.
    """
    if not msg.HasField("time"):
        return False
    nanos, seconds = msg.time.nanos, msg.time.seconds
    if not 0 <= nanos <= 999_999_999 or nanos % 1000:
        return False
    lo, hi = _INT64_MICROS
    return lo <= seconds * 1_000_000 + nanos // 1000 <= hi


class _Builder:
    """Rows in, one ``pb.GpuColumns`` out: what ``encode`` and ``encode_samples`` share."""

    __slots__ = (
        "code_counts", "counted_per_code", "flags", "masks", "metric_values", "pod_counts",
        "pods", "proc_counts", "procs", "table", "times_us", "xid_counts", "xids",
    )  # fmt: skip

    def __init__(self) -> None:
        self.table: dict[str, int] = {}
        self.metric_values: dict[str, list[Any]] = {m.name: [] for m in _METRICS}
        self.times_us: list[int] = []
        self.masks: list[int] = []
        self.flags: list[int] = []
        self.xid_counts: list[int] = []
        self.xids: list[int] = []
        self.code_counts: list[int] = []
        self.counted_per_code = True  # every row's xid_code_counts matches its xid_codes
        self.proc_counts: list[int] = []
        self.procs: list[tuple[int, int, int, int, int]] = []
        self.pod_counts: list[int] = []
        self.pods: list[tuple[int, int, int]] = []

    def index(self, text: str) -> int:
        return self.table.setdefault(text, len(self.table))

    def lists(
        self,
        lost: bool,
        gpm_stale: bool,
        xid_codes: Sequence[int],
        xid_code_counts: Sequence[int],
        processes: Sequence[Any],
        pods: Sequence[Any],
    ) -> None:
        """A row's flags, XIDs, processes and pods (its metrics went in already)."""
        index = self.index
        self.flags.append((_LOST if lost else 0) | (_GPM_STALE if gpm_stale else 0))
        self.xid_counts.append(len(xid_codes))
        self.xids.extend(xid_codes)
        self.code_counts.extend(xid_code_counts)
        self.counted_per_code &= len(xid_code_counts) == len(xid_codes)
        self.proc_counts.append(len(processes))
        for p in processes:
            # A process's optional fields: None in the model, absent in a message.
            mem, name, job = p.gpu_mem_bytes, p.name, p.slurm_job_id
            has = (
                (_PROC_MEM if mem is not None else 0)
                | (_PROC_NAME if name is not None else 0)
                | (_PROC_SLURM if job is not None else 0)
            )
            self.procs.append((
                p.pid, has, mem or 0, index(name) if name is not None else 0,
                index(job) if job is not None else 0,
            ))  # fmt: skip
        self.pod_counts.append(len(pods))
        self.pods.extend((index(r.pod), index(r.namespace), index(r.container)) for r in pods)

    def build(
        self, gpu_index: list[int], uuids: list[str], names: list[str], migs: list[str]
    ) -> pb.GpuColumns:
        """The columns; identity columns last, so their indices follow the metrics'."""
        index = self.index
        cols = pb.GpuColumns(
            rows=len(self.times_us),
            time_us=_pack("q", self.times_us),
            gpu_index=_packed("I", gpu_index),
            gpu_uuid=_packed("I", [index(u) for u in uuids]),
            gpu_name=_packed("I", [index(n) for n in names]),
            mig_uuid=_packed("I", [index(m) for m in migs]),
            strings=list(self.table),
            presence=_packed("Q", self.masks),
            flags=bytes(self.flags),
        )
        for metric in _METRICS:
            if values := self.metric_values[metric.name]:
                setattr(cols, metric.name, _packed(metric.fmt, values))
        if self.xids:
            cols.xid_codes_per_row = _packed("I", self.xid_counts)
            cols.xid_codes = _pack("I", self.xids)
            if self.counted_per_code:
                cols.xid_code_counts = _pack("Q", self.code_counts)
        if self.procs:
            cols.processes_per_row = _packed("I", self.proc_counts)
            pids, present, mem, proc_name, jobs = zip(*self.procs, strict=True)
            cols.process_pid = _pack("I", pids)
            cols.process_presence = bytes(present)
            cols.process_gpu_mem_bytes = _pack("Q", mem)
            cols.process_name = _pack("I", proc_name)
            cols.process_slurm_job_id = _pack("I", jobs)
        if self.pods:
            cols.pods_per_row = _packed("I", self.pod_counts)
            pod, namespace, container = zip(*self.pods, strict=True)
            cols.pod_pod = _pack("I", pod)
            cols.pod_namespace = _pack("I", namespace)
            cols.pod_container = _pack("I", container)
        return cols


def encode(msgs: Sequence[pb.GpuSample]) -> pb.GpuColumns:
    """``msgs`` (each ``columnable``) as columns, in order.

    Raises:
        ValueError: a message is not ``columnable``.
    """
    if not all(map(columnable, msgs)):
        raise ValueError("a GPU sample without a time in whole microseconds cannot be a column")
    rows = _Builder()
    index, metric_values = rows.index, rows.metric_values
    for msg in msgs:
        mask = 0
        has_field: Any = msg.HasField  # field names come from the descriptor
        for metric in _METRICS:
            if has_field(metric.name):
                mask |= 1 << metric.number
                value = getattr(msg, metric.name)
                metric_values[metric.name].append(index(value) if metric.fmt == "I" else value)
        rows.masks.append(mask)
        rows.times_us.append(msg.time.seconds * 1_000_000 + msg.time.nanos // 1000)
        processes = [
            _ProcessFields(
                p.pid,
                p.gpu_mem_bytes if p.HasField("gpu_mem_bytes") else None,
                p.name if p.HasField("name") else None,
                p.slurm_job_id if p.HasField("slurm_job_id") else None,
            )
            for p in msg.processes
        ]
        rows.lists(msg.lost, msg.gpm_stale, msg.xid_codes, msg.xid_code_counts, processes,
                   msg.pods)  # fmt: skip
    return rows.build(
        [m.gpu_index for m in msgs],
        [m.gpu_uuid for m in msgs],
        [m.gpu_name for m in msgs],
        [m.mig_uuid for m in msgs],
    )


class _ProcessFields(NamedTuple):
    pid: int
    gpu_mem_bytes: int | None
    name: str | None
    slurm_job_id: str | None


# Every metric of a model sample in one C call, in _METRICS order; each metric's bit.
_METRIC_GETTER = attrgetter(*(m.name for m in _METRICS))
_METRIC_BITS = tuple((m.name, 1 << m.number, m.fmt == "I") for m in _METRICS)


def encode_samples(samples: Sequence[GpuSample]) -> pb.GpuColumns:
    """Model samples as columns, straight from their fields.

    The same columns as ``encode`` of their ``record_to_proto`` messages (times rounded
    to whole microseconds, as ``codec.timestamp`` rounds them), without making those
    messages: the agent's batcher encodes its GPU samples here once, in the sampler.

    Raises:
        ValueError: a time outside what 64-bit microseconds hold (or not a number).
    """
    rows = _Builder()
    index, metric_values = rows.index, rows.metric_values
    lo, hi = _INT64_MICROS
    for sample in samples:
        try:
            micros = round(sample.time_s * 1e6)
        except (ValueError, OverflowError):  # NaN, infinite
            micros = hi + 1
        if not lo <= micros <= hi:
            raise ValueError(f"GPU sample time {sample.time_s} is not 64-bit microseconds")
        rows.times_us.append(micros)
        mask = 0
        for (name, bit, is_text), value in zip(_METRIC_BITS, _METRIC_GETTER(sample), strict=True):
            if value is not None:
                mask |= bit
                metric_values[name].append(index(value) if is_text else value)
        rows.masks.append(mask)
        rows.lists(sample.lost, sample.gpm_stale, sample.xid_codes, sample.xid_code_counts,
                   sample.processes, sample.pods)  # fmt: skip
    return rows.build(
        [s.gpu_index for s in samples],
        [s.gpu_uuid for s in samples],
        [s.gpu_name for s in samples],
        [s.mig_uuid for s in samples],
    )


def _packed(fmt: str, values: Sequence[Any]) -> bytes:
    # A column whose values are all the same travels as one (the reader repeats it).
    if len(values) > 1 and values.count(values[0]) == len(values):
        return _pack(fmt, values[:1])
    return _pack(fmt, values)


def _pack(fmt: str, values: Sequence[Any]) -> bytes:
    return struct.pack(f"<{len(values)}{fmt}", *values)
