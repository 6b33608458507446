"""MIG: instances enumerated as devices of their own, GPM per GPU instance, and the
``unknown`` verdict where nothing measures activity (A100 MIG)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rooftop.agent.classifier import Hysteresis, classify
from rooftop.agent.diagnose import diagnose_records, overall
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import GpuBackend
from rooftop.agent.sensors.fake import FakeNvmlLibrary
from rooftop.agent.sensors.nvml import REOPEN_EVERY_S, NvmlBackend
from rooftop.agent.sensors.replay import ReplayBackend
from rooftop.agent.trace import encode_line, read_trace
from rooftop.agent.window import DeviceKey, build_windows
from rooftop.cli import main
from rooftop.common.codec import (
    record_from_proto,
    record_to_proto,
    verdict_from_proto,
    verdict_to_proto,
)
from rooftop.common.errors import SensorError
from rooftop.common.model import Bound, GpuSample, Record


def run_sampler(backend: GpuBackend, clock, ticks: int = 20) -> list[Record]:
    sampler = Sampler(backend, clock=lambda: 1.7e9 + clock())
    records: list[Record] = []
    for _ in range(ticks):
        clock.advance(0.2)
        records += sampler.tick()
    return records


def test_a100_mig_lists_parent_then_its_instances_with_their_identity(clock):
    backend = NvmlBackend(FakeNvmlLibrary("a100-mig", clock=clock), clock=clock)
    parent, *instances = backend.devices()
    assert parent.mig_mode and not parent.mig_uuid
    assert [i.gpu_instance_id for i in instances] == [1, 2]
    assert all(i.compute_instance_id == 0 for i in instances)
    assert all(i.mig_uuid.startswith("MIG-") for i in instances)
    assert len({i.mig_uuid for i in instances}) == 2
    # Instances name their parent by its index and uuid.
    assert {(i.gpu_index, i.gpu_uuid) for i in instances} == {(0, parent.gpu_uuid)}
    assert instances[0].gpu_name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert instances[0].mem_total_bytes == 40_768_634_880
    assert not any(i.has_gpm for i in instances)
    # Empty slots (NotFound) are ordinary, not errors.
    assert not any(fn == "_mig_handle" for fn, _ in backend.errors)


def test_a_mig_gpu_that_failed_to_open_at_start_brings_its_instances_when_it_answers(clock):
    lib = FakeNvmlLibrary("h100-mig", gpus=2, workloads="gemm", clock=clock)
    lib.inject(0, "nvmlDeviceGetHandleByIndex", "timeout", times=1)
    backend = NvmlBackend(lib, clock=clock)
    assert [(d.gpu_index, d.mig_uuid != "") for d in backend.devices()] == [
        (0, False), (1, False), (1, True), (1, True)]  # fmt: skip
    run_sampler(backend, clock, ticks=1)  # the first read of GPU 0 starts its interval
    clock.advance(REOPEN_EVERY_S)
    records = run_sampler(backend, clock, ticks=10)
    # The tick that opened it read the parent; from the next, its instances too.
    instances = {r.mig_uuid for r in records if isinstance(r, GpuSample) and r.gpu_index == 0}
    assert len(instances - {""}) == 2
    assert [(d.gpu_index, d.mig_uuid != "") for d in backend.devices()] == [
        (0, False), (0, True), (0, True), (1, False), (1, True), (1, True)]  # fmt: skip
    assert not any(r.lost for r in records[-6:] if isinstance(r, GpuSample))


def test_gpu_without_mig_lists_no_instances(clock):
    backend = NvmlBackend(FakeNvmlLibrary("h100", gpus=2, clock=clock), clock=clock)
    assert [(d.gpu_index, d.mig_mode, d.mig_uuid) for d in backend.devices()] == [
        (0, False, ""), (1, False, "")]


def test_mig_instance_reads_its_own_memory_and_processes(clock):
    lib = FakeNvmlLibrary("a100-mig", workloads=["gemv", "idle"], clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    _, busy, idle = backend.devices()
    sample = backend.read(0, 1.7e9, mig_uuid=busy.mig_uuid)
    assert sample.mig_uuid == busy.mig_uuid and sample.gpu_instance_id == 1
    assert sample.busy_pct is None  # util rates are NotSupported in MIG mode
    assert sample.mem_total_bytes == 40_768_634_880
    assert sample.mem_used_bytes and sample.mem_used_bytes > 0
    assert [p.pid for p in sample.processes] == [lib.fake_pid(0)]
    # Board-level figures belong to the parent, not to an instance.
    assert sample.power_w is None and sample.temperature_c is None
    assert backend.read(0, 1.7e9, mig_uuid=idle.mig_uuid).processes == ()
    assert backend.read(0, 1.7e9).power_w is not None


def test_reading_an_unknown_mig_instance_is_a_sensor_error(clock):
    backend = NvmlBackend(FakeNvmlLibrary("a100-mig", clock=clock), clock=clock)
    with pytest.raises(SensorError, match="no MIG instance"):
        backend.read(0, 1.7e9, mig_uuid="MIG-not-there")


def test_h100_mig_samples_gpm_per_gpu_instance(clock):
    lib = FakeNvmlLibrary("h100-mig", workloads=["gemv", "gemm"], clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    _, first, second = backend.devices()
    assert first.has_gpm and second.has_gpm
    clock.advance(0.2)
    a = backend.read(0, 1.7e9, mig_uuid=first.mig_uuid)
    b = backend.read(0, 1.7e9, mig_uuid=second.mig_uuid)
    assert a.dram_bw_pct is not None and a.dram_bw_pct > 80  # GEMV streams memory
    assert b.tensor_active_pct is not None and b.tensor_active_pct > 80  # GEMM on tensors
    assert lib.calls["nvmlGpmMigSampleGet"] >= 4
    # The parent in MIG mode samples no GPM of its own: its instances carry activity.
    assert lib.calls["nvmlGpmSampleGet"] == 0


def test_mig_verdicts_per_instance_named_by_mig_uuid(clock):
    lib = FakeNvmlLibrary("h100-mig", workloads=["gemv", "gemm"], clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    _, first, second = backend.devices()
    timeline = diagnose_records(run_sampler(backend, clock))
    assert set(timeline) == {DeviceKey(0), DeviceKey(0, first.mig_uuid),
                             DeviceKey(0, second.mig_uuid)}
    by_mig = {v.mig_uuid: v for v in overall(timeline)}
    assert by_mig[first.mig_uuid].verdict is Bound.MEMORY
    assert by_mig[second.mig_uuid].verdict is Bound.COMPUTE
    assert by_mig[second.mig_uuid].gpu_instance_id == 2


def test_a100_mig_instance_is_unknown_never_idle_with_the_missing_signal_named(clock):
    backend = NvmlBackend(FakeNvmlLibrary("a100-mig", workloads="gemv", clock=clock),
                          clock=clock)
    windows = build_windows(run_sampler(backend, clock))
    instance = next(k for k in windows if k.mig_uuid)
    verdict = classify(windows[instance][0])
    assert verdict.verdict is Bound.UNKNOWN
    assert verdict.rule.startswith(
        "no activity signal: util.gpu not supported and no GPM on this MIG instance")
    assert verdict.mig_uuid == instance.mig_uuid
    # The parent reports no activity either: unknown, pointing at its instances.
    parent = classify(windows[DeviceKey(0)][0])
    assert parent.verdict is Bound.UNKNOWN
    assert "MIG instances" in parent.recommendations[0]


def test_two_instances_of_one_gpu_never_share_a_window(clock):
    lib = FakeNvmlLibrary("h100-mig", workloads=["gemv", "idle"], clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    windows = build_windows(run_sampler(backend, clock, ticks=5))
    sizes = {k: w[0].samples for k, w in windows.items()}
    assert len(sizes) == 3
    # Each device has its own ticks (GPM skips the first, unprimed tick of instances).
    assert sizes[DeviceKey(0)] == 5


def test_mig_identity_round_trips_through_the_codec(clock):
    backend = NvmlBackend(FakeNvmlLibrary("a100-mig", clock=clock), clock=clock)
    _, instance, _ = backend.devices()
    sample = backend.read(0, 1.7e9, mig_uuid=instance.mig_uuid)
    assert record_from_proto(record_to_proto(sample)) == sample
    verdict = next(v for v in overall(diagnose_records(run_sampler(backend, clock)))
                   if v.mig_uuid == instance.mig_uuid)
    decoded = verdict_from_proto(verdict_to_proto(verdict), gpu_name=verdict.gpu_name)
    assert decoded == verdict
    assert decoded.verdict is Bound.UNKNOWN and decoded.gpu_instance_id == 1


def test_whole_gpu_codec_leaves_mig_fields_absent():
    msg = record_to_proto(GpuSample(time_s=1.7e9, gpu_index=0, gpu_uuid="GPU-x")).gpu
    assert msg.mig_uuid == "" and not msg.HasField("gpu_instance_id")


def test_agentctl_diagnose_json_reports_mig_instances_as_their_own_entries():
    # stdout only: a log line on stderr (util rates NotSupported) is no part of the JSON.
    result = CliRunner().invoke(
        main, ["diagnose", "--fake", "a100-mig:gemv", "--seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    gpus = json.loads(result.stdout)["gpus"]
    instances = [g for g in gpus if "mig_uuid" in g]
    assert len(instances) == 2 and len(gpus) == 3
    assert {g["gpu_instance_id"] for g in instances} == {1, 2}
    assert all(g["mig_uuid"].startswith("MIG-") for g in instances)
    for g in instances:
        assert g["verdict"] == "unknown"
        assert "no activity signal: util.gpu not supported and no GPM" in g["rule"]


def test_agentctl_diagnose_h100_mig_judges_instances_from_gpm():
    result = CliRunner().invoke(
        main, ["diagnose", "--fake", "h100-mig:gemv", "--seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    instances = [g for g in json.loads(result.stdout)["gpus"] if "mig_uuid" in g]
    assert [g["verdict"] for g in instances] == ["memory-bound", "memory-bound"]
    assert all(g["evidence"]["dram_pct"]["provenance"] == "gpm" for g in instances)


def test_a_lost_mig_parent_loses_its_instances_with_their_identity(clock):
    lib = FakeNvmlLibrary("a100-mig", clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    lib.inject(0, "*", "gpu_is_lost")
    samples = [r for r in run_sampler(backend, clock, ticks=1) if isinstance(r, GpuSample)]
    assert [(s.lost, s.gpu_instance_id) for s in samples] == [(True, None), (True, 1),
                                                               (True, 2)]
    assert all(s.mig_uuid.startswith("MIG-") for s in samples[1:])


def test_a_recorded_mig_host_replays_each_instance_apart(clock, tmp_path):
    backend = NvmlBackend(FakeNvmlLibrary("h100-mig", workloads=["gemv", "gemm"], clock=clock),
                          clock=clock)
    path = tmp_path / "mig.jsonl"
    path.write_text("".join(encode_line(r) + "\n" for r in run_sampler(backend, clock)))
    replay = ReplayBackend(read_trace(path))
    infos = replay.devices()
    assert [bool(i.mig_uuid) for i in infos] == [False, True, True]
    by_mig = {v.mig_uuid: v.verdict
              for v in overall(diagnose_records(run_sampler(replay, clock)))}
    assert sorted(by_mig.values()) == sorted([Bound.UNKNOWN, Bound.MEMORY, Bound.COMPUTE])


def test_hysteresis_holds_each_mig_instance_apart(clock):
    lib = FakeNvmlLibrary("h100-mig", workloads=["gemv", "gemm"], clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    verdicts = overall(diagnose_records(run_sampler(backend, clock)))
    hysteresis = Hysteresis(hold=2)
    for v in verdicts:
        hysteresis.update(v)
    _, first, second = backend.devices()
    held_first = hysteresis.held(0, first.mig_uuid)
    held_second = hysteresis.held(0, second.mig_uuid)
    assert held_first is not None and held_first.verdict is Bound.MEMORY
    assert held_second is not None and held_second.verdict is Bound.COMPUTE
    held_parent = hysteresis.held(0)
    assert held_parent is not None and held_parent.verdict is Bound.UNKNOWN
