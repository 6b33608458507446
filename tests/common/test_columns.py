"""GPU samples as columns: every field round-trips, and bad columns are named, not raised."""

from __future__ import annotations

import dataclasses
import math
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rooftop.common.codec import record_from_proto, record_to_proto
from rooftop.common.columns import Columns, ColumnsProblem, columnable, encode, encode_samples
from rooftop.common.model import PERCENT_FIELDS, UPPER_BOUNDS, GpuProcess, GpuSample, PodRef
from rooftop.v1 import telemetry_pb2 as pb

EARLIEST_S = 946_684_800
T0 = 1_790_000_000.25
_DOUBLES = [f.name for f in pb.GpuSample.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE]


def _as_record(sample: GpuSample) -> GpuSample:
    """What the records path makes of a sample (its time in whole microseconds)."""
    decoded = record_from_proto(record_to_proto(sample))
    assert isinstance(decoded, GpuSample)
    return decoded


def _read(cols: pb.GpuColumns) -> Columns:
    # Through the wire, as the collector gets it.
    reader = Columns.read(pb.GpuColumns.FromString(cols.SerializeToString()), earliest_s=EARLIEST_S)
    assert isinstance(reader, Columns), reader
    return reader


def _problem(cols: pb.GpuColumns) -> ColumnsProblem:
    result = Columns.read(cols, earliest_s=EARLIEST_S)
    assert isinstance(result, ColumnsProblem), "columns accepted"
    return result


FULL = GpuSample(
    time_s=T0, gpu_index=3, gpu_uuid="GPU-3", gpu_name="NVIDIA H100 80GB HBM3",
    busy_pct=95.5, mem_ctrl_pct=97.1, sm_active_pct=81.3, sm_occupancy_pct=11.7,
    tensor_active_pct=2.2, fp16_active_pct=1.0, fp32_active_pct=0.5, fp64_active_pct=0.0,
    dram_bw_pct=84.8, pcie_rx_bytes_per_s=1.5e9, pcie_tx_bytes_per_s=0.5e9, pcie_link_gen=5,
    pcie_link_width=16, power_w=650.0, sm_clock_mhz=1980.0, mem_used_bytes=70 * 2**30,
    mem_total_bytes=80 * 2**30, temperature_c=61.0, clock_event_reasons=2**63,
    processes=(GpuProcess(4242, 60 * 2**30, name="python", slurm_job_id="77"), GpuProcess(7)),
    lost=False, inaccessible=None, gpm_stale=True, mig_uuid="MIG-a", gpu_instance_id=1,
    compute_instance_id=0, xid_codes=(48, 79), xid_count=3, xid_code_counts=(1, 2**64 - 1),
    ecc_corrected_volatile=0,
    ecc_uncorrected_volatile=1, ecc_corrected_aggregate=2**64 - 1, ecc_uncorrected_aggregate=4,
    remapped_rows_corrected=2**32 - 1, remapped_rows_uncorrected=0, remap_pending=False,
    remap_failed=True, pods=(PodRef("llm-0", "serving", "vllm"), PodRef("llm-1", "serving", "")),
    retired_pages_single_bit=2**32 - 1, retired_pages_double_bit=0, retired_pages_pending=True,
)  # fmt: skip


def test_every_gpu_sample_field_round_trips_through_columns_present_or_absent():
    samples = [
        FULL,
        GpuSample(time_s=T0 + 0.1, gpu_index=0),  # everything absent
        GpuSample(time_s=T0 + 0.2, gpu_index=1, lost=True, inaccessible="NO_PERMISSION"),
        GpuSample(time_s=T0 + 0.3, gpu_index=3, busy_pct=100.0, processes=(GpuProcess(9),)),
    ]
    back = list(_read(encode_samples(samples)).samples())
    assert back == [_as_record(s) for s in samples]
    # Every field of the model is covered: each one differs from its default above.
    defaults = GpuSample(time_s=0.0, gpu_index=0)
    assert [n for n in FULL.__slots__ if getattr(FULL, n) == getattr(defaults, n)] == [
        "lost",
        "inaccessible",
    ]  # ... and those two are set in the third sample


def test_rows_with_different_fields_present_find_their_own_values():
    samples = [
        GpuSample(time_s=T0 + i, gpu_index=i % 2, busy_pct=float(i) if i % 2 else None,
                  power_w=100.0 + i if i % 3 else None, mem_used_bytes=i if i % 4 else None)
        for i in range(12)
    ]  # fmt: skip
    reader = _read(encode_samples(samples))
    assert [reader.sample(i) for i in reversed(range(12))] == [
        _as_record(s) for s in reversed(samples)
    ]


def test_device_rows_are_each_devices_last_row_in_first_seen_order():
    samples = [GpuSample(time_s=T0 + i, gpu_index=i % 3) for i in range(8)]
    samples += [GpuSample(time_s=T0 + 9, gpu_index=1, mig_uuid="MIG-x")]
    reader = _read(encode_samples(samples))
    assert reader.device_rows() == {(0, ""): 6, (1, ""): 7, (2, ""): 5, (1, "MIG-x"): 8}
    big = _read(encode_samples([GpuSample(time_s=T0, gpu_index=i * 300) for i in (2, 1, 2)]))
    assert big.device_rows() == {(600, ""): 2, (300, ""): 1}


def test_a_time_that_is_not_whole_microseconds_is_not_columnable():
    msg = record_to_proto(FULL).gpu
    assert columnable(msg)
    msg.time.nanos += 1
    assert not columnable(msg)
    assert not columnable(pb.GpuSample(gpu_index=0))  # no time at all
    with pytest.raises(ValueError, match="whole microseconds"):
        encode([msg])


# ---- values a record would be refused for are refused in columns, naming the row -------


def _with(name: str, value: float, row: int = 2) -> pb.GpuColumns:
    samples = [FULL] * 4
    samples[row] = GpuSample(time_s=T0, gpu_index=0, **{name: value})  # type: ignore[arg-type]
    return encode_samples(samples)


def _ceiling(name: str) -> float:
    return 100.5 if name in PERCENT_FIELDS else UPPER_BOUNDS.get(name, math.inf)


@pytest.mark.parametrize("name", _DOUBLES)
def test_nan_infinite_negative_and_over_the_ceiling_are_invalid_values_in_any_column(name: str):
    bad = [math.nan, math.inf, -math.inf, -1.0, -5e-324]
    if _ceiling(name) < math.inf:
        bad.append(math.nextafter(_ceiling(name), math.inf))
    for value in bad:
        problem = _problem(_with(name, value))
        assert problem.reason == "invalid_value", (name, value)
        assert problem.message.startswith(f"gpu row 2: {name} is"), problem.message
    # The edges themselves are fine, as in a record: 0, -0.0 and the ceiling.
    for value in (0.0, -0.0, min(_ceiling(name), 1e300)):
        assert isinstance(Columns.read(_with(name, value), earliest_s=EARLIEST_S), Columns)


def test_a_time_before_2000_is_bad_time_and_an_identity_with_controls_is_bad_identity():
    early = encode_samples([FULL, GpuSample(time_s=EARLIEST_S - 1e-6, gpu_index=0)])
    assert _problem(early) == ("bad_time", f"gpu row 1: time {EARLIEST_S - 1} s is too early")
    for field in ("gpu_uuid", "gpu_name", "mig_uuid"):
        hostile = GpuSample(time_s=T0, gpu_index=0, **{field: "x\x1b]0;pwned\x07"})  # type: ignore[arg-type]
        problem = _problem(encode_samples([FULL, hostile]))
        assert problem.reason == "bad_identity" and field in problem.message
    # A process name is no identity: records take it as it is, and so do columns.
    named = GpuSample(time_s=T0, gpu_index=0, processes=(GpuProcess(1, name="a\tb"),))
    assert _read(encode_samples([named])).sample(0).processes[0].name == "a\tb"


def _broken(change: str) -> pb.GpuColumns:
    cols = encode_samples([FULL, FULL])
    if change == "rows":
        cols.rows = 3
    elif change == "short metric":
        cols.power_w = cols.power_w[:-8]
    elif change == "metric without presence":
        cols.pcie_link_gen = b""
    elif change == "index past strings":
        cols.gpu_name = struct.pack("<2I", 0, len(cols.strings))
    elif change == "string twice":
        cols.strings.append(cols.strings[0])
    elif change == "list count":
        cols.pods_per_row = struct.pack("<2I", 2, 3)
    elif change == "list without count":
        cols.xid_codes_per_row = b""
    elif change == "xid code counts not one per code":
        cols.xid_code_counts = cols.xid_code_counts[:-8]
    elif change == "huge rows":
        cols.rows = 2**32 - 1
    return cols


@pytest.mark.parametrize(
    "change",
    ["rows", "short metric", "metric without presence", "index past strings", "string twice",
     "list count", "list without count", "huge rows", "xid code counts not one per code"],
)  # fmt: skip
def test_columns_that_do_not_fit_together_are_bad_columns(change: str):
    problem = _problem(_broken(change))
    assert problem.reason == "bad_columns" and problem.message.startswith("gpu columns: ")


def test_xid_codes_without_per_code_counts_decode_as_uncounted():
    """An older agent counts XIDs only in total: its codes arrive with no per-code counts,
    and a batch mixing rows with and without them drops the per-code counts, never
    misaligns them."""
    old = dataclasses.replace(FULL, xid_code_counts=())
    cols = encode_samples([old, old])
    assert not cols.xid_code_counts
    assert [s.xid_code_counts for s in _read(cols).samples()] == [(), ()]
    assert _read(cols).sample(1) == _as_record(old)
    mixed = encode_samples([FULL, old])
    assert not mixed.xid_code_counts
    assert [s.xid_codes for s in _read(mixed).samples()] == [(48, 79), (48, 79)]


def test_a_column_of_one_repeated_value_travels_once_and_stands_for_every_row():
    samples = [dataclasses.replace(FULL, busy_pct=float(i)) for i in range(4)]
    cols = encode_samples(samples)
    assert len(cols.gpu_name) == 4 and len(cols.presence) == 8 and len(cols.power_w) == 8
    assert len(cols.busy_pct) == 4 * 8 and len(cols.time_us) == 4 * 8  # these vary / never
    assert list(_read(cols).samples()) == [_as_record(s) for s in samples]
    # One value of a metric only some rows have stands for those rows.
    some = [GpuSample(time_s=T0, gpu_index=0, power_w=None if i % 2 else 300.0) for i in range(5)]
    cols = encode_samples(some)
    assert len(cols.power_w) == 8
    assert [s.power_w for s in _read(cols).samples()] == [300.0, None, 300.0, None, 300.0]


def test_empty_columns_are_no_samples():
    reader = _read(pb.GpuColumns())
    assert reader.rows == 0 and list(reader.samples()) == [] and reader.device_rows() == {}


# ---- property: any valid samples round-trip ---------------------------------------------

_U32, _U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
_TEXT = st.text(st.characters(categories=["L", "N", "P", "S"]), max_size=12)
_ANY_TEXT = st.text(max_size=8)
_INT_FIELDS = {f.name: (_U32 if f.type == f.TYPE_UINT32 else _U64)
               for f in pb.GpuSample.DESCRIPTOR.fields
               if f.type in (f.TYPE_UINT32, f.TYPE_UINT64) and f.has_presence}  # fmt: skip


@st.composite
def _samples(draw: st.DrawFn) -> GpuSample:
    micros = draw(st.integers(EARLIEST_S * 10**6, 2**62))
    values: dict[str, object] = {}
    for name in _DOUBLES:
        values[name] = draw(st.none() | st.floats(0, min(_ceiling(name), 1e300)))
    for name, ints in _INT_FIELDS.items():
        values[name] = draw(st.none() | ints)
    for name in ("remap_pending", "remap_failed", "retired_pages_pending"):
        values[name] = draw(st.none() | st.booleans())
    processes = draw(st.lists(st.builds(
        GpuProcess, _U32, st.none() | _U64, name=st.none() | _ANY_TEXT,
        slurm_job_id=st.none() | _ANY_TEXT), max_size=3))  # fmt: skip
    pods = draw(st.lists(st.builds(PodRef, _ANY_TEXT, _ANY_TEXT, _ANY_TEXT), max_size=2))
    return GpuSample(
        time_s=micros // 10**6 + (micros % 10**6) * 1000 / 1e9,
        gpu_index=draw(_U32),
        gpu_uuid=draw(_TEXT),
        gpu_name=draw(_TEXT),
        mig_uuid=draw(_TEXT),
        lost=draw(st.booleans()),
        gpm_stale=draw(st.booleans()),
        inaccessible=draw(st.none() | _ANY_TEXT),
        xid_codes=tuple(codes := draw(st.lists(_U32, max_size=3))),
        # One count per code (a batch mixing rows without: see the test above).
        xid_code_counts=tuple(draw(st.lists(_U64, min_size=len(codes), max_size=len(codes)))),
        processes=tuple(processes),
        pods=tuple(pods),
        **values,  # type: ignore[arg-type]
    )


@pytest.mark.slow
@settings(max_examples=100)
@given(st.lists(_samples(), max_size=6))
def test_any_valid_samples_encode_straight_to_what_their_messages_make(
    samples: list[GpuSample],
):
    assert encode_samples(samples).SerializeToString() == _via_messages(samples)


@pytest.mark.slow
@settings(max_examples=100)
@given(st.lists(_samples(), max_size=6))
def test_any_valid_samples_round_trip_through_columns_exactly(samples: list[GpuSample]):
    reader = _read(encode_samples(samples))
    assert list(reader.samples()) == [_as_record(s) for s in samples]
    newest = {(s.gpu_index, s.mig_uuid): i for i, s in enumerate(samples)}
    assert reader.device_rows() == newest
    rows = list(newest.values())
    assert reader.samples_at(rows) == [reader.sample(r) for r in rows]


def _same_fields_as(first: GpuSample, sample: GpuSample) -> GpuSample:
    """``sample`` with exactly ``first``'s optional fields present, and no lists."""
    present = {
        name: (getattr(sample, name) if getattr(sample, name) is not None else value)
        if value is not None
        else None
        for name in _OPTIONAL
        for value in [getattr(first, name)]
    }
    return dataclasses.replace(
        sample, processes=(), pods=(), xid_codes=(), xid_code_counts=(), **present
    )


_OPTIONAL = [
    f.name for f in pb.GpuSample.DESCRIPTOR.fields if f.has_presence and f.message_type is None
]


@pytest.mark.slow
@settings(max_examples=100)
@given(st.lists(_samples(), min_size=2, max_size=10), st.data())
def test_rows_decoded_together_equal_rows_decoded_one_by_one(
    samples: list[GpuSample], data: st.DataObject
):
    # The collector's path: every row with the same fields and no lists, so each column
    # is unpacked once for all the rows asked for (in any order, some twice).
    samples = [_same_fields_as(samples[0], s) for s in samples]
    reader = _read(encode_samples(samples))
    rows = data.draw(st.lists(st.integers(0, len(samples) - 1), min_size=2))
    assert reader.samples_at(rows) == [reader.sample(r) for r in rows]
    assert reader.samples_at(rows) == [_as_record(samples[r]) for r in rows]


@pytest.mark.slow
@settings(max_examples=100)
@given(st.lists(_samples(), max_size=6))
def test_a_field_over_every_row_is_what_each_rows_sample_holds(samples: list[GpuSample]):
    # Remote write reads columnar batches a field at a time (Columns.field_values).
    reader = _read(encode_samples(samples))
    rows = [reader.sample(r) for r in range(reader.rows)]
    for name in GpuSample.__slots__:
        assert list(reader.field_values(name)) == [getattr(s, name) for s in rows], name


def _via_messages(samples: list[GpuSample]) -> bytes:
    return encode([record_to_proto(s).gpu for s in samples]).SerializeToString()


def test_samples_encode_straight_to_the_columns_their_messages_make():
    # The agent's batcher encodes model samples without making a message of each first.
    old = dataclasses.replace(FULL, xid_code_counts=())  # codes without per-code counts
    samples = [
        FULL,
        GpuSample(time_s=T0 + 0.1, gpu_index=0),
        GpuSample(time_s=T0 + 0.2, gpu_index=1, lost=True, inaccessible="NO_PERMISSION"),
        dataclasses.replace(FULL, time_s=T0 + 1 / 3, power_w=650, gpu_uuid="GPU-4"),  # an int
        old,
    ]
    for rows in (samples, samples[:1], samples[1:3], [old, old], []):
        assert encode_samples(rows).SerializeToString() == _via_messages(rows)


@pytest.mark.parametrize("time_s", [math.nan, math.inf, 2.0**63 / 1e6])
def test_a_time_beyond_64_bit_microseconds_is_refused_by_name(time_s: float):
    with pytest.raises(ValueError, match="64-bit microseconds"):
        encode_samples([FULL, dataclasses.replace(FULL, time_s=time_s)])


def test_a_lazy_row_holds_identity_and_time_now_and_decodes_its_metrics_at_first_read():
    reader = _read(encode_samples([FULL, dataclasses.replace(FULL, gpu_index=4, busy_pct=1.0)]))
    lazy = reader.lazy_sample(1, time_s=T0 + 5)  # a clamped time: kept through the decode
    unset = [n for n in GpuSample.__slots__ if not _slot_set(lazy, n)]
    assert set(GpuSample.__slots__) - set(unset) == {
        "time_s", "gpu_index", "gpu_uuid", "gpu_name", "mig_uuid"
    }  # fmt: skip
    identity = (lazy.gpu_index, lazy.gpu_uuid, lazy.mig_uuid, lazy.time_s)
    assert identity == (4, "GPU-3", "MIG-a", T0 + 5)
    assert lazy.busy_pct == 1.0  # the first metric read decodes the row...
    assert all(_slot_set(lazy, n) for n in GpuSample.__slots__)  # ...every field at once
    assert object.__getattribute__(lazy, "_columns") is None  # and lets the batch go
    eager = dataclasses.replace(_as_record(dataclasses.replace(FULL, gpu_index=4, busy_pct=1.0)),
                                time_s=T0 + 5)  # fmt: skip
    assert lazy == eager and eager == lazy and hash(lazy) == hash(eager)
    assert repr(lazy) == repr(eager)
    assert reader.lazy_sample(0, T0) != eager  # another row
    with pytest.raises(AttributeError):
        _ = lazy.no_such_field  # type: ignore[attr-defined]


def _slot_set(sample: GpuSample, name: str) -> bool:
    try:
        object.__getattribute__(sample, name)
    except AttributeError:
        return False
    return True


def test_a_lazy_row_encodes_as_the_sample_it_stands_for():
    # Every encoder takes it as a GpuSample (the collector's query API encodes them).
    reader = _read(encode_samples([FULL]))
    lazy = reader.lazy_sample(0, FULL.time_s)
    assert record_to_proto(lazy) == record_to_proto(_as_record(FULL))
    assert encode_samples([reader.lazy_sample(0, FULL.time_s)]) == encode_samples([FULL])


def test_lazy_rows_read_from_several_threads_at_once_all_hold_their_values():
    # The collector's scrape and query threads may read one row as it is decoded.
    samples = [dataclasses.replace(FULL, gpu_index=i, busy_pct=float(i)) for i in range(8)]
    reader = _read(encode_samples(samples))
    lazies = [reader.lazy_sample(row, T0) for _ in range(300) for row in range(8)]
    seen: list[list[float]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def read(out: list[float]) -> None:
        start.wait()
        out.extend(lazy.busy_pct for lazy in lazies)

    threads = [threading.Thread(target=read, args=(out,)) for out in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [float(i) for _ in range(300) for i in range(8)]
    assert seen == [expected] * 4
