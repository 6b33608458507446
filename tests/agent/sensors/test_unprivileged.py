"""The agent as the unprivileged user its units and manifests run it as.

NoPermission costs the field it denies, is said once naming the missing privilege,
and never yields a wrong verdict or a lost GPU (issue 11, item 4).
"""

from __future__ import annotations

import logging

from rooftop.agent.classifier import classify
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.fake import FakeNvmlLibrary
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.agent.window import build_windows
from rooftop.common.model import Bound, GpuSample, Provenance

NVML_LOGGER = "rooftop.agent.sensors.nvml"


def _verdict(lib, clock, ticks=8):
    backend = NvmlBackend(lib, clock=clock, xid_events=False)
    sampler = Sampler(backend, clock=lambda: 1.7e9 + clock())
    records = []
    for _ in range(ticks):
        clock.advance(0.2)
        records += sampler.tick()
    windows = build_windows(records)
    window = windows[0, ""][0]
    return backend, records, window, classify(window)


def _permission_warnings(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "NO_PERMISSION" in r.getMessage()
    ]


def test_unprivileged_h100_gemv_stays_memory_bound_on_proxies(clock, caplog):
    _, _, root_window, root = _verdict(FakeNvmlLibrary("h100", workloads="gemv", clock=clock),
                                       clock)
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock, unprivileged=True)
    with caplog.at_level(logging.INFO, logger=NVML_LOGGER):
        backend, records, window, denied = _verdict(lib, clock)
    assert root_window.dram_provenance is Provenance.GPM
    assert denied.verdict is root.verdict is Bound.MEMORY
    assert window.dram_provenance is Provenance.PROXY
    assert denied.confidence < root.confidence
    samples = [r for r in records if isinstance(r, GpuSample)]
    assert samples and all(not s.lost and s.dram_bw_pct is None for s in samples)
    assert all(s.mem_ctrl_pct is not None for s in samples)
    # Said once, naming the fix; GPM is off for good, so it is not asked again.
    (warning,) = _permission_warnings(caplog)
    assert "NVreg_RestrictProfilingToAdminUsers=0" in warning and "CAP_SYS_ADMIN" in warning
    assert lib.calls["nvmlGpmSampleGet"] == 1
    assert backend.devices()[0].has_gpm is False
    assert lib.live_gpm_samples == 0
    backend.close()


def test_gpm_support_query_denied_is_not_retried(clock, caplog):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    lib.inject(0, "nvmlGpmQueryDeviceSupport", "no_permission")
    with caplog.at_level(logging.INFO, logger=NVML_LOGGER):
        backend, _, window, verdict = _verdict(lib, clock, ticks=60)  # past RETRY_NEWER_S
    assert verdict.verdict is Bound.MEMORY
    assert window.dram_provenance is Provenance.PROXY
    assert lib.calls["nvmlGpmQueryDeviceSupport"] == 1
    (warning,) = _permission_warnings(caplog)
    assert "NVreg_RestrictProfilingToAdminUsers=0" in warning
    backend.close()


def test_processes_denied_cost_the_field_once_not_the_gpu(clock, caplog):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    lib.inject(0, "nvmlDeviceGetComputeRunningProcesses", "no_permission")
    with caplog.at_level(logging.INFO, logger=NVML_LOGGER):
        backend, records, window, verdict = _verdict(lib, clock)
    samples = [r for r in records if isinstance(r, GpuSample)]
    assert samples and all(not s.lost and s.processes == () for s in samples)
    assert all(s.dram_bw_pct is not None for s in samples[1:])  # the rest is whole
    assert verdict.verdict is Bound.MEMORY
    assert window.dram_provenance is Provenance.GPM
    (warning,) = _permission_warnings(caplog)
    assert "nvmlDeviceGetComputeRunningProcesses" in warning
    assert "host pid namespace" in warning
    # The older _v2 call needs the same privilege: not asked, so no second message.
    assert lib.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 0
    assert backend.errors[("nvmlDeviceGetComputeRunningProcesses", "NVMLError_NoPermission")] >= 1
    backend.close()


def test_unprivileged_mig_parent_memory_is_absent_instances_keep_theirs(clock, caplog):
    lib = FakeNvmlLibrary("a100-mig", workloads="gemv", clock=clock, unprivileged=True)
    with caplog.at_level(logging.INFO, logger=NVML_LOGGER):
        backend = NvmlBackend(lib, clock=clock, xid_events=False)
        parent, *instances = backend.devices()
        clock.advance(0.2)
        parent_sample = backend.read(0, 1.7e9)
        instance_sample = backend.read(0, 1.7e9, mig_uuid=instances[0].mig_uuid)
    assert instances
    assert parent_sample.mem_used_bytes is None and not parent_sample.lost
    assert parent_sample.power_w is not None  # only the denied field is gone
    assert instance_sample.mem_used_bytes is not None
    (warning,) = _permission_warnings(caplog)
    assert "nvmlDeviceGetMemoryInfo" in warning and "MIG parent" in warning
    backend.close()


def test_other_denied_calls_name_device_access(clock, caplog):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    lib.inject(0, "nvmlDeviceGetPowerUsage", "no_permission")
    with caplog.at_level(logging.INFO, logger=NVML_LOGGER):
        backend = NvmlBackend(lib, clock=clock, xid_events=False)
        for _ in range(3):
            clock.advance(0.2)
            sample = backend.read(0, 1.7e9)
    assert sample.power_w is None and not sample.lost
    (warning,) = _permission_warnings(caplog)
    assert "/dev/nvidiactl" in warning
    backend.close()
