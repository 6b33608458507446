"""Who uses a GPU: pods from the kubelet (Kubernetes), processes and Slurm jobs (elsewhere).

The sampler against real processes (the real psutil host sensor) and, for the daemon,
a stand-in kubelet serving the vendored pod-resources API on a unix socket.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rooftop.agent.config import load_config
from rooftop.agent.daemon import Agent, backend_from_spec
from rooftop.agent.sampler import Sampler, _with_processes
from rooftop.agent.sensors.base import GpuInfo
from rooftop.agent.sensors.host import PsutilHostSensor
from rooftop.common.codec import record_from_proto, record_to_proto, verdict_from_proto
from rooftop.common.model import GpuProcess, GpuSample, HostProcess, HostSample, PodRef
from tests.kubelet_standin import KubeletStandin
from tests.support import FakeIngest, Server, toml_value

UUID = "GPU-11111111-2222-3333-4444-555555555555"


class OneGpu:
    """A GpuBackend with one GPU whose NVML process list is ``pids``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def devices(self) -> tuple[GpuInfo, ...]:
        return (GpuInfo(0, UUID, "NVIDIA H100 80GB HBM3", has_gpm=False),)

    def read(self, gpu_index: int, time_s: float) -> GpuSample:
        procs = tuple(GpuProcess(pid, gpu_mem_bytes=1 << 30) for pid in self.pids)
        return GpuSample(time_s=time_s, gpu_index=gpu_index, gpu_uuid=UUID, processes=procs)

    def close(self) -> None:
        pass


@pytest.fixture
def sleepers() -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    in_job = subprocess.Popen(["sleep", "60"], env={**env, "SLURM_JOB_ID": "4242"})
    outside = subprocess.Popen(["sleep", "60"], env=env)
    yield in_job, outside
    for proc in (in_job, outside):
        proc.kill()
        proc.wait()


def test_gpu_processes_carry_their_command_name_and_slurm_job(sleepers):
    in_job, outside = sleepers
    sampler = Sampler(OneGpu([in_job.pid, outside.pid]), PsutilHostSensor())
    (sample,) = [r for r in sampler.tick() if isinstance(r, GpuSample)]
    by_pid = {p.pid: p for p in sample.processes}
    assert by_pid[in_job.pid] == GpuProcess(in_job.pid, 1 << 30, name="sleep",
                                            slurm_job_id="4242")  # fmt: skip
    assert by_pid[outside.pid] == GpuProcess(outside.pid, 1 << 30, name="sleep")
    # And across the wire (trace format, stream) unchanged.
    assert record_from_proto(record_to_proto(sample)).processes == sample.processes  # type: ignore[union-attr]


def test_a_gpu_process_gone_before_the_host_read_keeps_its_pid_alone():
    gone = subprocess.Popen(["true"])
    gone.wait()
    sampler = Sampler(OneGpu([gone.pid]), PsutilHostSensor())
    (sample,) = [r for r in sampler.tick() if isinstance(r, GpuSample)]
    assert sample.processes == (GpuProcess(gone.pid, 1 << 30),)


class NamedGpu(OneGpu):
    """OneGpu whose NVML process list already carries a name (one sample, reused)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(pids)
        procs = tuple(GpuProcess(pid, 1 << 30, name="vllm") for pid in pids)
        self.sample = GpuSample(time_s=0.0, gpu_index=0, gpu_uuid=UUID, processes=procs)

    def read(self, gpu_index: int, time_s: float) -> GpuSample:
        return self.sample


class StubHost:
    """A host sensor naming the given pids (no /proc)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names

    def read(self, time_s: float, gpu_pids: dict[int, tuple[int, ...]]) -> HostSample:
        return HostSample(time_s=time_s, cpu_pct=1.0, processes=tuple(
            HostProcess(pid, gpu_pids.get(pid, ()), name=name) for pid, name in self.names.items()
        ))  # fmt: skip


def test_a_gpu_sample_whose_processes_are_already_named_is_not_copied():
    backend = NamedGpu([101, 102])
    (sample, _host) = Sampler(backend, StubHost({101: "vllm"})).tick()
    assert sample is backend.sample  # nothing to change: no per-tick copy


def test_only_the_process_the_host_names_differently_is_renamed():
    backend = NamedGpu([101, 102])
    (sample, _host) = Sampler(backend, StubHost({102: "python3"})).tick()
    assert isinstance(sample, GpuSample) and sample is not backend.sample
    assert sample.processes == (GpuProcess(101, 1 << 30, name="vllm"),
                                GpuProcess(102, 1 << 30, name="python3"))  # fmt: skip
    assert sample.processes[0] is backend.sample.processes[0]


def test_renaming_keeps_every_other_field_of_the_sample_in_its_place():
    # The sampler copies a sample positionally (half the cost of dataclasses.replace):
    # a field added out of order or keyword-only would land in another's place.
    every = {f.name: f"value-{i}" for i, f in enumerate(dataclasses.fields(GpuSample))}
    sample = GpuSample(**every)  # type: ignore[arg-type]
    named = (GpuProcess(7, name="vllm"),)
    assert _with_processes(sample, named) == dataclasses.replace(sample, processes=named)


class Pods:
    def __init__(self, mapping: dict[str, tuple[PodRef, ...]]) -> None:
        self.mapping = mapping

    def pods_of(self, gpu_uuid: str, mig_uuid: str = "", gpu_index: int | None = None):
        return self.mapping.get(mig_uuid or gpu_uuid, ())


def test_sampler_attaches_the_pods_holding_each_gpu():
    ref = PodRef("llm-0", "serving", "vllm")
    sampler = Sampler(OneGpu([]), pods=Pods({UUID: (ref,)}))
    (sample,) = sampler.tick()
    assert sample.pods == (ref,)  # type: ignore[union-attr]
    assert Sampler(OneGpu([]), pods=Pods({})).tick()[0].pods == ()  # type: ignore[union-attr]


# --- the daemon: samples and verdicts carry the pods -------------------------------------


@pytest.fixture
def collector() -> Iterator[tuple[FakeIngest, str]]:
    server = Server(FakeIngest())
    yield server.servicer, server.address
    server.stop()


def agent_config(tmp_path: Path, address: str, socket_path: Path):
    values = {
        "agent_id": "node-pods", "collectors": [address], "insecure": True,
        "backend": "fake:h100", "fake_gpus": 2, "rate_hz": 20, "window_s": 0.25,
        "batch_interval_s": 0.1, "spool_dir": tmp_path / "spool", "hook_socket": "",
        "host_sensor": False, "pod_resources_socket": socket_path,
        "pod_resources_refresh_s": 0.1, "hysteresis_windows": 1,
    }  # fmt: skip
    path = tmp_path / "agent.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return load_config(path, env={})


def test_daemon_samples_and_verdicts_carry_the_pods_and_follow_a_move(
    tmp_path, collector, kubelet: KubeletStandin
):
    servicer, address = collector
    gpu0, gpu1 = (d.gpu_uuid for d in backend_from_spec("fake:h100", 2).devices())
    llm, side = PodRef("llm-0", "serving", "vllm"), PodRef("side-0", "ops", "probe")
    kubelet.assign(f"{gpu0}::0", pod="llm-0", namespace="serving", container="vllm")
    kubelet.assign(f"{gpu0}::1", pod="side-0", namespace="ops", container="probe")
    agent = Agent(agent_config(tmp_path, address, kubelet.socket_path), env={})
    agent.start()
    try:

        def latest(kind: str) -> dict[str, tuple[PodRef, ...]]:
            out = {}
            for b in list(servicer.received):
                if kind == "gpu":
                    for r in b.records:
                        if r.HasField("gpu"):
                            out[r.gpu.gpu_uuid] = record_from_proto(r).pods  # type: ignore[union-attr]
                else:
                    for v in b.verdicts:
                        out[v.gpu_uuid] = verdict_from_proto(v).pods
            return out

        wait(lambda: latest("verdict").get(gpu0) == (side, llm) and latest("gpu").get(gpu0))
        assert latest("gpu") == {gpu0: (side, llm), gpu1: ()}
        assert latest("verdict") == {gpu0: (side, llm), gpu1: ()}
        kubelet.move("llm-0", "serving", "vllm", to=[gpu1])  # rescheduled onto GPU 1
        wait(lambda: latest("verdict") == {gpu0: (side,), gpu1: (llm,)})
        wait(lambda: latest("gpu") == {gpu0: (side,), gpu1: (llm,)})
    finally:
        agent.shutdown(5)


def wait(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
