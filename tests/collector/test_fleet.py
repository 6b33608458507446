"""Fleet state and batch decoding, without sockets."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest

from rooftop.collector.fleet import Fleet, PoisonBatch, RejectReason, decode_batch
from rooftop.common.codec import record_to_proto
from rooftop.common.model import (
    PERCENT_FIELDS,
    Bound,
    EngineSample,
    GpuSample,
    HostProcess,
    HostSample,
    invalid_reason,
)
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, engine, gpu, verdict

NOW = 1_800_000_000.0


def apply(fleet: Fleet, b: pb.Batch, received_s: float = NOW) -> None:
    fleet.apply(decode_batch(b, received_s=received_s), received_s=received_s)


def _random_value(rng: random.Random, name: str) -> float | None:
    roll = rng.random()
    if roll < 0.3:
        return None
    if roll < 0.33:
        return math.nan
    if roll < 0.35:
        return math.inf
    if roll < 0.38:
        return -rng.uniform(0.001, 50)
    if roll < 0.42:
        return rng.uniform(100.6, 400)
    return rng.uniform(0, 100.5) if name in PERCENT_FIELDS else rng.uniform(0, 1e9)


def test_validation_agrees_with_the_model_on_random_samples():
    rng = random.Random(7)
    gpu_fields = [
        *PERCENT_FIELDS,
        "power_w",
        "sm_clock_mhz",
        "temperature_c",
        "pcie_rx_bytes_per_s",
    ]
    engine_fields = ["tpot_ms", "ttft_ms", "tpot_p99_ms", "ttft_p50_ms"]
    for _ in range(3000):
        kind = rng.choice(["gpu", "engine", "host"])
        if kind == "gpu":
            record: object = GpuSample(
                time_s=NOW, gpu_index=0, **{f: _random_value(rng, f) for f in gpu_fields}
            )
        elif kind == "engine":
            record = EngineSample(
                time_s=NOW, engine_id="e", **{f: _random_value(rng, f) for f in engine_fields}
            )
        else:
            record = HostSample(
                time_s=NOW,
                cpu_pct=_random_value(rng, "busy_pct"),
                processes=(HostProcess(pid=1, cpu_pct=_random_value(rng, "cpu_pct")),),
            )
        expected = invalid_reason(record)  # type: ignore[arg-type]
        msg = pb.Batch(agent_id="a", boot_id="b", seq=1)
        msg.records.append(record_to_proto(record))  # type: ignore[arg-type]
        try:
            decode_batch(msg, received_s=NOW)
        except PoisonBatch as exc:
            assert expected is not None, (record, str(exc))
            assert exc.reason is RejectReason.INVALID_VALUE
        else:
            assert expected is None, (record, expected)


def test_decode_keeps_the_newest_sample_per_gpu():
    b = batch(
        1, records=[gpu(0, NOW - 2, busy_pct=10.0), gpu(1, NOW - 2), gpu(0, NOW - 1, busy_pct=20.0)]
    )
    decoded = decode_batch(b, received_s=NOW)
    by_index = {g.gpu_index: g for g in decoded.gpus}
    assert by_index[0].busy_pct == 20.0
    assert decoded.samples == 3
    assert decoded.newest_sample_s == pytest.approx(NOW - 1)
    assert decoded.oldest_sample_s == pytest.approx(NOW - 2)
    assert decoded.skewed == 0


def test_sub_second_ordering_within_a_batch():
    b = batch(1, records=[gpu(0, NOW - 0.9, busy_pct=1.0), gpu(0, NOW - 0.1, busy_pct=2.0)])
    decoded = decode_batch(b, received_s=NOW)
    assert decoded.gpus[0].busy_pct == 2.0
    assert decoded.newest_sample_s == pytest.approx(NOW - 0.1)
    assert decoded.oldest_sample_s == pytest.approx(NOW - 0.9)


def test_future_samples_are_clamped_not_rejected():
    b = batch(1, records=[gpu(0, NOW + 3600), engine(NOW + 3600), gpu(1, NOW + 10)])
    decoded = decode_batch(b, received_s=NOW, max_future_skew_s=300)
    assert decoded.skewed == 2
    assert {g.gpu_index: g.time_s for g in decoded.gpus} == {0: NOW, 1: pytest.approx(NOW + 10)}
    assert decoded.engines[0].time_s == NOW


def test_missing_identity_names_what_is_missing():
    with pytest.raises(PoisonBatch, match="agent_id, boot_id, seq") as err:
        decode_batch(pb.Batch(), received_s=NOW)
    assert err.value.reason is RejectReason.MISSING_IDENTITY


def test_verdict_out_of_range_is_invalid():
    with pytest.raises(PoisonBatch, match="confidence is over 1"):
        decode_batch(batch(1, verdicts=[verdict(confidence=1.5)]), received_s=NOW)
    with pytest.raises(PoisonBatch, match="confidence is nan"):
        decode_batch(batch(1, verdicts=[verdict(confidence=math.nan)]), received_s=NOW)


def test_fleet_joins_samples_verdicts_and_engines():
    fleet = Fleet(clock=lambda: NOW)
    apply(fleet, batch(1, records=[gpu(0, NOW - 1), gpu(1, NOW - 1)], verdicts=[verdict(0)]))
    # A verdict naming only the index still lands on the GPU's uuid entry.
    apply(fleet, batch(2, verdicts=[verdict(1, Bound.COMPUTE, gpu_uuid="")]))
    # Explicit GPU attribution wins over the pid.
    apply(
        fleet,
        batch(3, records=[engine(NOW - 0.5, engine_id="sglang:1", pid=None, gpu_indices=(1,))]),
    )
    apply(fleet, batch(4, records=[engine(NOW - 0.5)]))  # pid 4242 runs on both GPUs
    snap = fleet.snapshot()
    assert len(snap.gpus) == 2
    g0, g1 = sorted(snap.gpus, key=lambda g: g.gpu_index)
    assert g0.verdict is not None and g0.verdict.verdict is Bound.MEMORY
    assert g1.verdict is not None and g1.verdict.verdict is Bound.COMPUTE
    assert g1.verdict.gpu_name == "NVIDIA H100 80GB HBM3"
    assert g0.engine is not None and g0.engine.engine_id == "vllm:8000"
    engines = {e.engine.engine_id: e.gpu_indices for e in snap.engines}
    assert engines == {"sglang:1": (1,), "vllm:8000": (0, 1)}
    assert snap.agents[0].batches == 4


def test_older_samples_never_replace_newer_ones():
    fleet = Fleet()
    apply(fleet, batch(2, records=[gpu(0, NOW - 1, busy_pct=50.0)]))
    apply(fleet, batch(1, records=[gpu(0, NOW - 100, busy_pct=10.0)]))  # an outage drain
    sample = fleet.snapshot().gpus[0].sample
    assert sample is not None and sample.busy_pct == 50.0


def test_agent_lag_and_clock_offset():
    fleet = Fleet()
    b = batch(1, records=[gpu(0, NOW - 1.5)])
    b.sent_time.seconds, b.sent_time.nanos = int(NOW - 30), 0  # the agent's clock is 30 s slow
    apply(fleet, b)
    agent = fleet.snapshot().agents[0]
    assert agent.lag_s == pytest.approx(1.5)
    assert agent.clock_offset_s == pytest.approx(30)


def test_silent_entries_are_forgotten():
    fleet = Fleet(forget_after_s=60)
    apply(fleet, batch(1, agent_id="old", records=[gpu(0, NOW - 1)]), received_s=NOW)
    apply(fleet, batch(1, agent_id="new", records=[gpu(0, NOW + 99)]), received_s=NOW + 100)
    snap = fleet.snapshot()
    assert {a.agent_id for a in snap.agents} == {"new"}
    assert {g.agent_id for g in snap.gpus} == {"new"}


def test_snapshots_are_consistent_under_concurrent_applies():
    fleet = Fleet()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                snap = fleet.snapshot()
                assert snap.counts.batches >= len(snap.agents)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    now = time.time()
    for seq in range(1, 300):
        apply(fleet, batch(seq, agent_id=f"a{seq % 20}", records=[gpu(seq % 8, now)]), now)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert fleet.counts().batches == 299
