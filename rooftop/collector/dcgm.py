"""dcgm-exporter's metric names on the Prometheus endpoint (``[prometheus] dcgm_names``).

Dashboards and alerts written for NVIDIA's dcgm-exporter query ``DCGM_FI_*`` series.
With ``dcgm_names = true`` the collector also writes those series, from the same
fleet state, under dcgm-exporter's names, types, units and labels (its
``etc/default-counters.csv`` and ``internal/pkg/rendermetrics``, NVIDIA/dcgm-exporter
@ d5e5f510; a test reads a copy of that counters file):

- labels ``gpu`` (NVML index), ``UUID`` (the GPU's uuid, the parent's for a MIG
  instance), ``device`` (``nvidia<index>``), ``modelName`` (the parent's product
  name), ``hostname`` (dcgm-exporter's ``Hostname`` until that commit), for a MIG
  instance ``GPU_I_PROFILE`` and ``GPU_I_ID``, and ``pod``/``namespace``/``container``
  as its Kubernetes mapping writes them: one series per container holding the GPU;
- units as the counters file says: ``DCGM_FI_PROF_*`` ratios 0-1, utilizations in
  %, framebuffer in MiB, power in W, temperature in °C, clocks in MHz;
- ``pci_bus_id`` and ``XID_ERRORS``' ``err_msg`` are left out: the agent does not
  report them (Prometheus reads an absent label as an empty one).

Written only on the Prometheus endpoint: these are Prometheus names, not OpenTelemetry
instruments. Absent means not measured, as everywhere in Rooftop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rooftop.collector.fleet import Fleet, FleetSnapshot, GpuState
from rooftop.collector.prometheus import Family
from rooftop.common.model import GpuSample

__all__ = ["DCGM_FIELDS", "DcgmField", "dcgm_families"]

_MIB = float(2**20)
_MIG_NAME = re.compile(r"^(?P<model>.*?)\s+MIG\s+(?P<profile>\S+)$")


@dataclass(frozen=True, slots=True)
class DcgmField:
    """One dcgm-exporter series and the Rooftop figure it is written from.

    Attributes:
        name: the DCGM field name (the Prometheus metric name).
        kind: ``gauge`` or ``counter``, as in dcgm-exporter's counters file.
        help: the HELP text (the counters file's).
        source: the ``GpuSample`` field(s) it is computed from (documentation).
        value: the value in the field's unit, or None when not measured.
    """

    name: str
    kind: str
    help: str
    source: str
    value: Callable[[GpuSample], float | None]


def _scaled(field: str, divisor: float) -> Callable[[GpuSample], float | None]:
    def value(s: GpuSample) -> float | None:
        v = getattr(s, field)
        return None if v is None else v / divisor

    return value


def _fb_free_mib(s: GpuSample) -> float | None:
    if s.mem_total_bytes is None or s.mem_used_bytes is None:
        return None
    return max(0, s.mem_total_bytes - s.mem_used_bytes) / _MIB


def _last_xid(s: GpuSample) -> float | None:
    # dcgm-exporter: "Value of the last XID error encountered", 0 for none.
    if s.xid_count is None:
        return None
    return float(s.xid_codes[-1]) if s.xid_codes else 0.0


def _flag(field: str) -> Callable[[GpuSample], float | None]:
    def value(s: GpuSample) -> float | None:
        v = getattr(s, field)
        return None if v is None else float(bool(v))

    return value


DCGM_FIELDS: tuple[DcgmField, ...] = (
    DcgmField("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", "sm_clock_mhz",
              _scaled("sm_clock_mhz", 1)),
    DcgmField("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "temperature_c",
              _scaled("temperature_c", 1)),
    DcgmField("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "power_w",
              _scaled("power_w", 1)),
    DcgmField("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "busy_pct",
              _scaled("busy_pct", 1)),
    DcgmField("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).",
              "mem_ctrl_pct", _scaled("mem_ctrl_pct", 1)),
    DcgmField("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.",
              "xid_codes[-1]", _last_xid),
    DcgmField("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).",
              "mem_total_bytes - mem_used_bytes", _fb_free_mib),
    DcgmField("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).",
              "mem_used_bytes", _scaled("mem_used_bytes", _MIB)),
    DcgmField("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter",
              "Number of remapped rows for uncorrectable errors", "remapped_rows_uncorrected",
              _scaled("remapped_rows_uncorrected", 1)),
    DcgmField("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter",
              "Number of remapped rows for correctable errors", "remapped_rows_corrected",
              _scaled("remapped_rows_corrected", 1)),
    DcgmField("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed",
              "remap_failed", _flag("remap_failed")),
    # Page retirement, on GPUs before Ampere (row remapping replaced it): commented out
    # in dcgm-exporter's default counters, written here where the agent reads it.
    DcgmField("DCGM_FI_DEV_RETIRED_SBE", "counter",
              "Total number of retired pages due to single-bit errors.",
              "retired_pages_single_bit", _scaled("retired_pages_single_bit", 1)),
    DcgmField("DCGM_FI_DEV_RETIRED_DBE", "counter",
              "Total number of retired pages due to double-bit errors.",
              "retired_pages_double_bit", _scaled("retired_pages_double_bit", 1)),
    DcgmField("DCGM_FI_DEV_RETIRED_PENDING", "counter",
              "Total number of pages pending retirement.", "retired_pages_pending",
              _flag("retired_pages_pending")),
    DcgmField("DCGM_FI_PROF_SM_ACTIVE", "gauge",
              "The ratio of cycles an SM has at least 1 warp assigned.", "sm_active_pct",
              _scaled("sm_active_pct", 100)),
    DcgmField("DCGM_FI_PROF_SM_OCCUPANCY", "gauge",
              "The ratio of number of warps resident on an SM.", "sm_occupancy_pct",
              _scaled("sm_occupancy_pct", 100)),
    DcgmField("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge",
              "Ratio of cycles the tensor (HMMA) pipe is active.", "tensor_active_pct",
              _scaled("tensor_active_pct", 100)),
    DcgmField("DCGM_FI_PROF_DRAM_ACTIVE", "gauge",
              "Ratio of cycles the device memory interface is active sending or receiving "
              "data.", "dram_bw_pct", _scaled("dram_bw_pct", 100)),
    DcgmField("DCGM_FI_PROF_PIPE_FP64_ACTIVE", "gauge", "Ratio of cycles the fp64 pipes are "
              "active.", "fp64_active_pct", _scaled("fp64_active_pct", 100)),
    DcgmField("DCGM_FI_PROF_PIPE_FP32_ACTIVE", "gauge", "Ratio of cycles the fp32 pipes are "
              "active.", "fp32_active_pct", _scaled("fp32_active_pct", 100)),
    DcgmField("DCGM_FI_PROF_PIPE_FP16_ACTIVE", "gauge", "Ratio of cycles the fp16 pipes are "
              "active.", "fp16_active_pct", _scaled("fp16_active_pct", 100)),
    DcgmField("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge",
              "The rate of data transmitted over the PCIe bus - including both protocol "
              "headers and data payloads - in bytes per second.", "pcie_tx_bytes_per_s",
              _scaled("pcie_tx_bytes_per_s", 1)),
    DcgmField("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge",
              "The rate of data received over the PCIe bus - including both protocol "
              "headers and data payloads - in bytes per second.", "pcie_rx_bytes_per_s",
              _scaled("pcie_rx_bytes_per_s", 1)),
)  # fmt: skip


def _labels(g: GpuState) -> dict[str, Any]:
    """dcgm-exporter's device labels for one GPU or MIG instance."""
    model = g.gpu_name
    labels: dict[str, Any] = {
        "gpu": str(g.gpu_index),
        "UUID": g.gpu_uuid,
        "device": f"nvidia{g.gpu_index}",
        "hostname": g.hostname,
    }
    if g.mig_uuid:
        # NVML names a MIG device "<product> MIG <profile>"; dcgm-exporter's modelName is
        # the parent's product and GPU_I_PROFILE the profile.
        match = _MIG_NAME.match(model)
        if match:
            model = match["model"]
            labels["GPU_I_PROFILE"] = match["profile"]
        gi = g.sample.gpu_instance_id if g.sample is not None else None
        if gi is None and g.verdict is not None:
            gi = g.verdict.gpu_instance_id
        if gi is not None:
            labels["GPU_I_ID"] = str(gi)
    labels["modelName"] = model
    return labels


@dataclass(frozen=True, slots=True)
class _Point:
    value: float
    attributes: dict[str, Any]


def _points(field: DcgmField, snap: FleetSnapshot) -> Iterable[_Point]:
    for g in snap.gpus:
        s = g.sample
        if s is None or s.lost:
            continue  # absent means "not measured", never 0
        value = field.value(s)
        if value is None:
            continue
        base = _labels(g)
        if field.name == "DCGM_FI_DEV_XID_ERRORS":
            base["err_code"] = str(int(value))
        if not s.pods:
            yield _Point(value, base)
        # As dcgm-exporter's Kubernetes mapping: one series per container on the device.
        for pod in s.pods:
            yield _Point(
                value,
                {**base, "pod": pod.pod, "namespace": pod.namespace, "container": pod.container},
            )


def dcgm_families(fleet: Fleet) -> list[Family]:
    """One Prometheus family per ``DCGM_FIELDS`` entry, read from ``fleet`` at each scrape."""

    def family(field: DcgmField) -> Family:
        return Family(
            field.name,
            field.kind,
            "",
            field.help,
            lambda: _points(field, fleet.export_snapshot()),
            exposed_name=field.name,
        )

    return [family(f) for f in DCGM_FIELDS]
