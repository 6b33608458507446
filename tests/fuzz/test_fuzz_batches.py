"""Batch decoding and validation, fuzzed: bytes off the wire, any Batch, valid batches.

What the collector does with one message off an Ingest stream, without the socket:
``pb.Batch.FromString`` (gRPC's deserializer), ``decode_batch`` (validation), then
``Fleet.check_labels`` and ``Fleet.apply``. The documented outcomes are a decoded
batch, ``DecodeError`` (not a Batch: gRPC fails the call), ``PoisonBatch`` (rejected
in-band) and ``OverLimit`` (a new agent past the limit); anything else would end the
stream with an internal error, or worse, the collector's thread.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import example, given
from hypothesis import strategies as st

from rooftop.collector.fleet import DecodedBatch, Fleet, OverLimit, PoisonBatch, decode_batch
from rooftop.common.codec import timestamp, timestamp_s
from rooftop.common.model import PERCENT_FIELDS, UPPER_BOUNDS, GpuSample
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, engine, gpu

NOW_S = 1_790_000_000.0  # a fixed "now" (2026-09), so that derandomized runs repeat


def _through_the_collector(msg: pb.Batch) -> DecodedBatch | None:
    """The ingest's path for one batch; None when it is refused as documented."""
    try:
        decoded = decode_batch(msg, received_s=NOW_S)
    except PoisonBatch as exc:
        assert exc.reason and str(exc)  # a reason to count and a message to send back
        return None
    fleet = Fleet(clock=lambda: NOW_S)
    try:
        fleet.check_labels(decoded)
        fleet.apply(decoded, received_s=NOW_S)
    except (PoisonBatch, OverLimit):
        return None
    fleet.snapshot()
    return decoded


# ---- arbitrary bytes -----------------------------------------------------------------

_REAL = batch(1, records=[gpu(0, time_s=NOW_S)])
_REAL.sent_time.CopyFrom(timestamp(NOW_S))
_VALID = _REAL.SerializeToString()


@given(st.one_of(
    st.binary(max_size=2048),
    # Damaged real batches: protobuf parses much of these, unlike random bytes.
    st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)).map(
        lambda p: _VALID[: p[0]] + bytes([p[1]]) + _VALID[p[0] + 1 :]),
    st.integers(0, len(_VALID)).map(lambda n: _VALID[:n]),
))
@example(b"")
@example(b"\x0a\xff\xff\xff\xff\x0f")  # a length far past the end
def test_arbitrary_bytes_decode_or_are_refused_as_documented(data: bytes):
    try:
        msg = pb.Batch.FromString(data)
    except DecodeError:
        return
    _through_the_collector(msg)


# ---- arbitrary, well-shaped messages -------------------------------------------------

_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 100),
    st.sampled_from([0.0, -0.0, 100.5, 100.6, -1e-300, 1e308, 5e-324]),
)
_INTS = {
    FieldDescriptor.CPPTYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: st.integers(0, 2**64 - 1),
}
_TEXT = st.one_of(
    st.sampled_from(["", "a", "GPU-0", "vllm:8000", "x" * 300]),  # 300: past label limits
    st.text(max_size=24),
)
_SECONDS = st.one_of(
    st.integers(int(NOW_S) - 86_400, int(NOW_S) + 2 * 86_400),  # around now, some ahead
    st.integers(-62_135_596_800, 253_402_300_799),  # anything a Timestamp may hold
)


@st.composite
def _timestamp(draw: st.DrawFn) -> Message:
    nanos = draw(st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1)))
    return pb.google_dot_protobuf_dot_timestamp__pb2.Timestamp(  # type: ignore[attr-defined]
        seconds=draw(_SECONDS), nanos=nanos)


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[object]:
    cpp = fd.cpp_type
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return _FLOATS.filter(lambda v: cpp == FieldDescriptor.CPPTYPE_DOUBLE or
                              math.isnan(v) or abs(v) < 3e38)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return _TEXT if fd.type == FieldDescriptor.TYPE_STRING else st.binary(max_size=64)
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 50))  # open enums
    return _INTS[cpp]


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    cls = pb_class(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return draw(_timestamp())
    msg = cls()
    for fd in descriptor.fields:
        if not draw(st.booleans()):
            continue  # most fields of a real message are absent
        repeated = fd.is_repeated
        if fd.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            leaf = fd.message_type.full_name == "google.protobuf.Timestamp"
            if fd.message_type.GetOptions().map_entry or (depth >= 3 and not leaf):
                continue
            sub = st.deferred(lambda fd=fd: _message(fd.message_type, depth + 1))
            if repeated:
                getattr(msg, fd.name).extend(draw(st.lists(sub, max_size=(4, 2, 1)[depth])))
            else:
                getattr(msg, fd.name).CopyFrom(draw(sub))
        elif repeated:
            getattr(msg, fd.name).extend(draw(st.lists(_scalar(fd), max_size=3)))
        else:
            setattr(msg, fd.name, draw(_scalar(fd)))
    return msg


def pb_class(descriptor: Descriptor) -> type[Message]:
    """The generated class of ``descriptor`` (rooftop.v1 or a well-known type)."""
    from google.protobuf import message_factory  # noqa: PLC0415

    return message_factory.GetMessageClass(descriptor)


@st.composite
def _batches(draw: st.DrawFn) -> pb.Batch:
    msg = draw(_message(pb.Batch.DESCRIPTOR))
    # An identity that passes check_identity most of the time, so validation goes deeper.
    if draw(st.integers(0, 9)) != 1:
        msg.agent_id = draw(st.sampled_from(["node-1", "node-2"]))
        msg.boot_id = "boot-1"
        msg.seq = draw(st.integers(1, 2**64 - 1))
    return msg


@pytest.mark.slow
@given(_batches())
def test_any_well_shaped_batch_decodes_or_is_poison(msg: pb.Batch):
    decoded = _through_the_collector(msg)
    if decoded is not None:
        # What was kept is what a valid batch holds: finite, in range.
        for sample in decoded.gpus:
            for name in PERCENT_FIELDS:
                value = getattr(sample, name, None)
                assert value is None or 0 <= value <= 100.5
        for when in (decoded.newest_sample_s, decoded.oldest_sample_s):
            assert when is None or math.isfinite(when)


# ---- valid batches round-trip ----------------------------------------------------------

_PCT_GPU = [n for n in PERCENT_FIELDS if n in {f.name for f in dataclasses.fields(GpuSample)}]


@st.composite
def _valid_gpu(draw: st.DrawFn, index: int, time_s: float) -> GpuSample:
    metrics: dict[str, object] = {name: draw(st.floats(0, 100)) for name in _PCT_GPU}
    for name in ("power_w", "temperature_c", "sm_clock_mhz"):
        metrics[name] = draw(st.floats(0, UPPER_BOUNDS[name]))
    metrics["gpu_uuid"] = f"GPU-{index}-{draw(st.text('abcdef0123456789', max_size=8))}"
    return gpu(index, time_s=time_s, **metrics)


@st.composite
def _valid_batch(draw: st.DrawFn) -> tuple[pb.Batch, list[GpuSample], int]:
    n_gpus = draw(st.integers(1, 4))
    ticks = draw(st.integers(1, 5))
    start_s = NOW_S - draw(st.floats(1, 3600))
    samples = [draw(_valid_gpu(i, start_s + t)) for t in range(ticks) for i in range(n_gpus)]
    engines = [engine(time_s=start_s, tpot_ms=draw(st.floats(0.1, 1000)))] if draw(
        st.booleans()) else []
    msg = batch(draw(st.integers(1, 2**63)), records=[*samples, *engines])
    msg.sent_time.CopyFrom(timestamp(NOW_S))
    return msg, samples, len(engines)


def _on_the_wire(time_s: float) -> float:
    return timestamp_s(timestamp(time_s))  # microseconds, as the codec sends them


@pytest.mark.slow
@given(_valid_batch())
def test_valid_batches_round_trip_through_the_wire(case: tuple[pb.Batch, list[GpuSample], int]):
    msg, samples, n_engines = case
    decoded = _through_the_collector(pb.Batch.FromString(msg.SerializeToString()))
    assert decoded is not None
    newest = {s.gpu_index: s for s in samples}  # the last sample of each GPU wins
    assert {g.gpu_index: g for g in decoded.gpus} == {
        i: dataclasses.replace(s, time_s=_on_the_wire(s.time_s)) for i, s in newest.items()
    }
    assert decoded.samples == len(samples) + n_engines and len(decoded.engines) == n_engines
    assert (decoded.agent_id, decoded.boot_id, decoded.seq) == (msg.agent_id, msg.boot_id,
                                                                msg.seq)
    assert decoded.skewed == 0
