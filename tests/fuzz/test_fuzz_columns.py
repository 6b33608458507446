"""Columnar batches (``Batch.gpu_columns``), fuzzed: damaged columns are refused as documented.

Each example starts from a valid columnar batch and overwrites one column: with bytes
of the same length (the structure holds, so the value, time, identity and index
checks run on garbage) or of any length (the structure checks). What the collector
may do is what ``test_fuzz_batches`` allows: apply it or refuse it as poison; and
whatever it applies decodes in every row (remote write reads them all).
"""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from rooftop.common.model import GpuProcess, PodRef
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import as_columns, batch, gpu
from tests.fuzz.test_fuzz_batches import NOW_S, _through_the_collector

_SAMPLES = [
    gpu(0, NOW_S - 1, pods=(PodRef("p", "ns", "c"),), xid_codes=(79,)),
    gpu(1, NOW_S - 1, busy_pct=None, mig_uuid="MIG-1",
        processes=(GpuProcess(3, None, name="python"), GpuProcess(4, 5))),
    gpu(0, NOW_S - 0.5, inaccessible="NO_PERMISSION", remap_pending=True),
]  # fmt: skip
_VALID = as_columns(batch(1, records=_SAMPLES))
_COLUMNS = [f.name for f in pb.GpuColumns.DESCRIPTOR.fields if f.type == f.TYPE_BYTES]


@st.composite
def _damaged(draw: st.DrawFn) -> pb.Batch:
    msg = pb.Batch()
    msg.CopyFrom(_VALID)
    cols = msg.gpu_columns
    name = draw(st.sampled_from(_COLUMNS))
    size = len(getattr(cols, name))
    same_size = st.binary(min_size=size, max_size=size)
    setattr(cols, name, draw(st.one_of(same_size, st.binary(max_size=64))))
    if draw(st.booleans()):
        cols.rows = draw(st.sampled_from([0, 1, 2, 4, 2**32 - 1]))
    if draw(st.booleans()):
        cols.strings.append(draw(st.text(max_size=4)))
    return msg


@given(_damaged())
def test_damaged_columns_apply_or_are_refused_as_documented(msg: pb.Batch):
    decoded = _through_the_collector(msg)
    if decoded is not None:
        rows = msg.gpu_columns.rows
        assert len(list(decoded.gpu_samples())) == decoded.gpu_sample_count() == rows


@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3),
    st.sampled_from(["busy_pct", "power_w", "pcie_rx_bytes_per_s", "temperature_c"]),
)
def test_any_doubles_in_a_metric_column_apply_only_when_records_of_them_would(
    values: list[float], name: str
):
    samples = [dataclasses.replace(s, **{name: v}) for s, v in zip(_SAMPLES, values, strict=True)]
    records = batch(1, records=samples)
    refused = _through_the_collector(records) is None
    assert (_through_the_collector(as_columns(records)) is None) == refused
