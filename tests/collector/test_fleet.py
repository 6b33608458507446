"""Fleet state and batch decoding, without sockets."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time

import pytest

from rooftop.collector.fleet import Fleet, PoisonBatch, RejectReason, decode_batch
from rooftop.common.codec import record_from_proto, record_to_proto, timestamp, timestamp_s
from rooftop.common.model import (
    PERCENT_FIELDS,
    Bound,
    EngineSample,
    GpuProcess,
    GpuSample,
    HostProcess,
    HostSample,
    PodRef,
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


def test_an_engine_goes_to_the_mig_instance_that_runs_its_pid():
    """An engine named by GPU index lands on the MIG instance whose process list has its
    pid, not on the sibling instance nor the parent; with no such list, on all of them."""
    parent = gpu(0, NOW - 1, processes=())
    mig_a = gpu(0, NOW - 1, mig_uuid="MIG-a", processes=(GpuProcess(pid=777),))
    mig_b = gpu(0, NOW - 1, mig_uuid="MIG-b", processes=(GpuProcess(pid=4242),))
    fleet = Fleet(clock=lambda: NOW)
    apply(fleet, batch(1, records=[parent, mig_a, mig_b]))
    apply(fleet, batch(2, records=[engine(NOW - 0.5, gpu_indices=(0,))]))  # pid 4242
    held = {g.mig_uuid: g.engine for g in fleet.snapshot().gpus}
    assert held["MIG-b"] is not None and held["MIG-b"].engine_id == "vllm:8000"
    assert held["MIG-a"] is None and held[""] is None
    # The agent may not list processes (unprivileged): every one of them, as before.
    blind = Fleet(clock=lambda: NOW)
    apply(blind, batch(1, records=[dataclasses.replace(s, processes=())
                                   for s in (parent, mig_a, mig_b)]))
    apply(blind, batch(2, records=[engine(NOW - 0.5, gpu_indices=(0,))]))
    assert all(g.engine is not None for g in blind.snapshot().gpus)


def test_an_engine_placed_on_one_mig_instance_leaves_the_siblings_it_was_given_before():
    # First seen before NVML lists its pid: every instance of GPU 0 gets it. Once one
    # instance lists the pid, the engine is that instance's alone: the others drop it
    # (a stale engine would name the wrong workload on them until forgotten).
    no_pid = [gpu(0, NOW - 3, processes=()),
              gpu(0, NOW - 3, mig_uuid="MIG-a", processes=()),
              gpu(0, NOW - 3, mig_uuid="MIG-b", processes=())]  # fmt: skip
    fleet = Fleet(clock=lambda: NOW)
    apply(fleet, batch(1, records=no_pid))
    apply(fleet, batch(2, records=[engine(NOW - 2, gpu_indices=(0,))]))
    assert all(g.engine is not None for g in fleet.snapshot().gpus)
    listed = gpu(0, NOW - 1.5, mig_uuid="MIG-b", processes=(GpuProcess(pid=4242),))
    apply(fleet, batch(3, records=[listed]))
    apply(fleet, batch(4, records=[engine(NOW - 1, gpu_indices=(0,))]))
    held = {g.mig_uuid: g.engine for g in fleet.snapshot().gpus}
    assert held["MIG-b"] is not None and held["MIG-b"].time_s == NOW - 1
    assert held["MIG-a"] is None and held[""] is None


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


# ---- hostile clocks: the agent's own order outranks its clock ------------------------


def clocked(seq: int, agent_s: float, *, boot_id: str = "boot-1") -> pb.Batch:
    """Batch ``seq`` as an agent whose clock reads ``agent_s`` makes it: one GPU sample
    and one 5 s verdict dated by that clock, sent_time too. ``samples`` = ``seq``."""
    b = batch(seq, boot_id=boot_id, records=[gpu(0, agent_s, busy_pct=float(seq))],
              verdicts=[verdict(0, samples=seq, window_start_s=agent_s - 5,
                                window_end_s=agent_s)])  # fmt: skip
    b.sent_time.CopyFrom(timestamp(agent_s))
    return b


def newest(fleet: Fleet) -> tuple[float | None, int | None]:
    (g,) = fleet.snapshot().gpus
    return (g.sample.busy_pct if g.sample else None, g.verdict.samples if g.verdict else None)


def test_a_clock_stepped_back_an_hour_does_not_freeze_the_newest_sample():
    fleet = Fleet()
    for seq in range(1, 21):
        step_s = -3600.0 if seq > 10 else 0.0  # NTP steps the agent's clock back
        apply(fleet, clocked(seq, NOW + seq + step_s), received_s=NOW + seq + 0.05)
        # Before: every sample and verdict after the step was "older" for an hour.
        assert newest(fleet) == (float(seq), seq)


def test_a_clock_stepped_an_hour_ahead_and_back_leaves_no_verdict_stuck():
    fleet = Fleet()
    for seq in range(1, 21):
        step_s = 3600.0 if 5 < seq <= 10 else 0.0
        apply(fleet, clocked(seq, NOW + seq + step_s), received_s=NOW + seq + 0.05)
        # Before: the verdicts dated an hour ahead kept their window_end and outranked
        # every later one until the hour was over.
        assert newest(fleet) == (float(seq), seq)
        (g,) = fleet.snapshot().gpus
        assert g.verdict is not None and g.verdict.window_end_s <= NOW + seq + 0.05 + 300


def test_verdict_window_times_are_clamped_like_sample_times():
    b = clocked(1, NOW + 3600)
    decoded = decode_batch(b, received_s=NOW)
    assert decoded.verdicts[0].window_start_s == NOW
    assert decoded.verdicts[0].window_end_s == NOW
    assert decoded.gpus[0].time_s == NOW
    assert not decoded.clock_believed


def test_a_restarted_agent_with_an_unbelieved_clock_is_ordered_by_arrival():
    fleet = Fleet()
    apply(fleet, clocked(7, NOW), received_s=NOW)
    # A new boot, its clock an hour behind (sent_time says so): arrival order decides.
    apply(fleet, clocked(1, NOW + 1 - 3600, boot_id="boot-2"), received_s=NOW + 1)
    assert newest(fleet) == (1.0, 1)


def test_a_restarted_agent_with_a_sane_clock_still_keeps_the_newest_sample():
    fleet = Fleet()
    apply(fleet, clocked(7, NOW), received_s=NOW)
    late = clocked(1, NOW - 100, boot_id="boot-0")  # an old boot's spool drained late
    late.sent_time.CopyFrom(timestamp(NOW + 1))
    apply(fleet, late, received_s=NOW + 1)
    assert newest(fleet) == (7.0, 7)


# ---- absurd values and unsafe identities: poison, by reason --------------------------

YEAR_1_S = -62_135_596_800  # 0001-01-01T00:00:00Z


def _poisoned(kind: str) -> pb.Batch:
    b = batch(1, records=[gpu(0, NOW - 1), engine(NOW - 1), HostSample(time_s=NOW - 1)],
              verdicts=[verdict(0, window_start_s=NOW - 6, window_end_s=NOW - 1)])  # fmt: skip
    b.sent_time.CopyFrom(timestamp(NOW))
    g, e, h, v = b.records[0].gpu, b.records[1].engine, b.records[2].host, b.verdicts[0]
    match kind:
        case "power_1e308":
            g.power_w = 1e308
        case "temperature_1e4":
            g.temperature_c = 1e4
        case "pcie_over_a_terabyte":
            g.pcie_rx_bytes_per_s = 2e12
        case "tpot_over_a_day":
            e.tpot_ms = 1e9
        case "gpu_year_1":
            g.time.seconds = YEAR_1_S
        case "gpu_nanos_over":
            g.time.nanos = 1_000_000_000
        case "gpu_nanos_negative":
            g.time.nanos = -1
        case "engine_nanos":
            e.time.nanos = 2_000_000_000
        case "host_year_1":
            h.time.seconds = YEAR_1_S
        case "verdict_nanos":
            v.window_end.nanos = -5
        case "sent_year_1":
            b.sent_time.seconds = YEAR_1_S
        case "boot_id_newline":
            b.boot_id = "boot-1\nERROR forged line"
        case "agent_id_cr":
            b.agent_id = "agent-1\roverwritten"
        case "hostname_osc":
            b.hostname = "node\x1b]0;pwned\x07"
        case "gpu_uuid_esc":
            g.gpu_uuid = "GPU-\x1b[2J"
        case "gpu_name_newline":
            g.gpu_name = "H100\nfake row"
        case "engine_id_newline":
            e.engine_id = "vllm\n:8000"
        case "model_bel":
            e.model = "llama\x07"
        case "verdict_gpu_uuid":
            v.gpu_uuid = "GPU-0\n"
        case _:
            raise AssertionError(kind)
    return b


@pytest.mark.parametrize(
    ("kind", "reason", "words"),
    [
        ("power_1e308", "invalid_value", "power_w is over its ceiling 10000"),
        ("temperature_1e4", "invalid_value", "temperature_c is over its ceiling 200"),
        ("pcie_over_a_terabyte", "invalid_value", "pcie_rx_bytes_per_s is over its ceiling"),
        ("tpot_over_a_day", "invalid_value", "tpot_ms is over its ceiling"),
        ("gpu_year_1", "bad_time", "record 0 (gpu): time -62135596800 s is before 2000"),
        ("gpu_nanos_over", "bad_time", "record 0 (gpu): time has nanos 1000000000"),
        ("gpu_nanos_negative", "bad_time", "nanos -1"),
        ("engine_nanos", "bad_time", "record 1 (engine): time has nanos"),
        ("host_year_1", "bad_time", "record 2 (host): time -62135596800 s"),
        ("verdict_nanos", "bad_time", "verdict 0: window_end time has nanos -5"),
        ("sent_year_1", "bad_time", "sent_time: time -62135596800 s is before 2000"),
        ("boot_id_newline", "bad_identity", "boot_id 'boot-1\\nERROR forged line'"),
        ("agent_id_cr", "bad_identity", "agent_id 'agent-1\\roverwritten'"),
        ("hostname_osc", "bad_identity", "hostname 'node\\x1b]0;pwned\\x07'"),
        ("gpu_uuid_esc", "bad_identity", "record 0 (gpu): gpu_uuid 'GPU-\\x1b[2J'"),
        ("gpu_name_newline", "bad_identity", "gpu_name 'H100\\nfake row'"),
        ("engine_id_newline", "bad_identity", "record 1 (engine): engine_id"),
        ("model_bel", "bad_identity", "model 'llama\\x07'"),
        ("verdict_gpu_uuid", "bad_identity", "verdict 0: gpu_uuid"),
    ],
)
def test_absurd_values_and_unsafe_identities_are_poison_by_reason(kind, reason, words):
    with pytest.raises(PoisonBatch) as info:
        decode_batch(_poisoned(kind), received_s=NOW)
    assert info.value.reason == reason
    assert words in str(info.value)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_the_poisoned_batch_builder_is_valid_untouched():
    b = _poisoned("power_1e308")
    b.records[0].gpu.power_w = 700.0
    decoded = decode_batch(b, received_s=NOW)
    assert decoded.samples == 3 and decoded.clock_believed


def test_a_time_far_ahead_is_clamped_not_rejected():
    b = _poisoned("power_1e308")
    b.records[0].gpu.power_w = 700.0
    b.records[0].gpu.time.seconds = 253_402_300_799  # 9999-12-31T23:59:59Z
    b.verdicts[0].window_end.seconds = 253_402_300_799
    decoded = decode_batch(b, received_s=NOW)
    assert decoded.gpus[0].time_s == NOW and decoded.verdicts[0].window_end_s == NOW
    assert decoded.skewed == 1


def test_the_model_holds_the_same_ceilings():
    sample = gpu(0, NOW, power_w=1e308)
    assert invalid_reason(sample) == "power_w is over its ceiling 10000 (1e+308)"


def _every_field_set(index: int, time_s: float, rng: random.Random) -> GpuSample:
    # Every optional GPU field present, some with a zero (a proto3 optional that is set
    # to 0 is a measurement, never None), the rest random.
    values: dict[str, object] = {}
    for f in dataclasses.fields(GpuSample):
        if "None" not in str(f.type):
            continue
        if f.name == "inaccessible":
            values[f.name] = "permission denied"
        elif "bool" in str(f.type):
            values[f.name] = rng.choice([False, True])
        elif "int" in str(f.type):
            values[f.name] = rng.choice([0, rng.randrange(1, 2**31)])
        else:
            values[f.name] = rng.choice([0.0, rng.uniform(0, 100)])
    return GpuSample(
        time_s=time_s, gpu_index=index, gpu_uuid=f"GPU-{index}", gpu_name="H100",
        lost=bool(index % 2), gpm_stale=bool(index % 3), xid_codes=(48, 79)[: index % 3],
        mig_uuid=f"MIG-{index}" if index % 4 == 1 else "", **values,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("with_processes", [False, True])
def test_decoded_gpu_samples_equal_the_codec_decode_of_every_field(with_processes):
    # decode_batch has its own fast GPU decode; it must read exactly what the codec does.
    rng = random.Random(11)
    extra: dict[str, object] = {}
    if with_processes:
        extra = {
            "processes": (GpuProcess(7, 2**30, name="vllm", slurm_job_id="42"),),
            "pods": (PodRef("p", "ns", "c"),),
        }
    samples = [
        dataclasses.replace(_every_field_set(i, NOW - 1 + i / 10, rng), **extra)  # type: ignore[arg-type]
        for i in range(6)
    ]
    samples.append(gpu(6, NOW - 0.5))  # the helper's everyday sample
    samples.append(GpuSample(NOW - 0.4, 7, power_w=0.0))  # one field set
    samples.append(GpuSample(NOW - 0.3, 8, "GPU-8"))  # none
    records = [record_to_proto(s) for s in samples]
    decoded = decode_batch(batch(1, records=records), received_s=NOW)
    expected = tuple(
        dataclasses.replace(record_from_proto(r), time_s=timestamp_s(r.gpu.time)) for r in records
    )
    assert decoded.gpus == expected
    assert {g.gpu_index for g in decoded.gpus} == set(range(9))
