"""Replay backend: recorded GPU samples and engine samples on the caller's clock."""

from __future__ import annotations

import dataclasses
import re

from rooftop.agent.sensors.replay import ReplayBackend, replay_gpu_uuid
from rooftop.agent.trace import BUNDLED_RECORDINGS, read_trace
from rooftop.common.model import EngineSample, GpuSample


def backend(name: str = "hf_8b_b1") -> ReplayBackend:
    return ReplayBackend(read_trace(BUNDLED_RECORDINGS / f"{name}.jsonl"))


def test_read_returns_the_recorded_sample_restamped_with_the_callers_time():
    replay = backend("gemm_8192")
    (info,) = replay.devices()
    assert info.has_gpm and info.gpu_name == "NVIDIA H100 80GB HBM3"
    first = replay.read(0, 1000.0)
    later = replay.read(0, 1002.0)
    assert isinstance(first, GpuSample) and first.time_s == 1000.0 and later.time_s == 1002.0
    assert later.tensor_active_pct is not None and later.tensor_active_pct > 80


def test_drain_hands_over_engine_samples_tied_to_the_sole_gpu():
    replay = backend()
    replay.read(0, 0.0)
    drained: list[EngineSample] = []
    for t in range(1, 12):
        replay.read(0, float(t))
        drained += replay.drain()
    assert len(drained) >= 8  # the recording holds one engine sample per second
    assert all(e.gpu_indices == (0,) and e.tpot_ms is not None for e in drained)
    assert all(e.time_s <= 11.0 for e in drained)


def test_drain_keeps_going_when_the_replay_loops():
    replay = backend()
    replay.read(0, 0.0)
    counts = []
    for t in range(1, 40):  # the recording is ~10 s long: this loops it three times
        replay.read(0, float(t))
        counts.append(len(replay.drain()))
    assert sum(counts[30:]) >= 5


def test_drain_is_empty_for_a_recording_without_engines():
    replay = backend("gemv_b1")
    replay.read(0, 0.0)
    replay.read(0, 5.0)
    assert replay.drain() == []


def test_an_all_zero_recorded_uuid_becomes_a_stable_one_per_node():
    trace = read_trace(BUNDLED_RECORDINGS / "gemv_b1.jsonl")
    zero = next(r for r in trace.records if isinstance(r, GpuSample)).gpu_uuid
    assert zero == "GPU-00000000-0000-0000-0000-000000000000"  # anonymised on recording

    def uuid_of(node: str) -> str:
        replay = ReplayBackend(trace, node=node)
        (info,) = replay.devices()
        assert replay.read(0, 0.0).gpu_uuid == replay.read(0, 3.0).gpu_uuid == info.gpu_uuid
        return info.gpu_uuid

    a, b = uuid_of("node-a"), uuid_of("node-b")
    assert a != b and zero not in (a, b)
    assert a == uuid_of("node-a") == replay_gpu_uuid("node-a", 0)  # the same at each start
    assert re.fullmatch(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", a)


def test_a_missing_recorded_uuid_is_derived_from_the_recording_without_a_node():
    trace = read_trace(BUNDLED_RECORDINGS / "gemv_b1.jsonl")
    blank = dataclasses.replace(trace, records=tuple(
        dataclasses.replace(r, gpu_uuid="") if isinstance(r, GpuSample) else r
        for r in trace.records))
    (info,) = ReplayBackend(blank).devices()
    assert info.gpu_uuid == replay_gpu_uuid("gemv_b1.jsonl", 0)


def test_a_real_recorded_uuid_is_kept():
    trace = read_trace(BUNDLED_RECORDINGS / "gemv_b1.jsonl")
    real = "GPU-5e1f8a3c-93b2-4c1e-8f7d-2a6b9c0d1e2f"
    renamed = dataclasses.replace(trace, records=tuple(
        dataclasses.replace(r, gpu_uuid=real) if isinstance(r, GpuSample) else r
        for r in trace.records))
    replay = ReplayBackend(renamed, node="node-a")
    assert replay.devices()[0].gpu_uuid == replay.read(0, 1.0).gpu_uuid == real
