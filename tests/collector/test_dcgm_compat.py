"""dcgm-exporter's names on the Prometheus endpoint, held to a copy of its counters file.

A real collector with ``[prometheus] dcgm_names = true`` takes a batch over real gRPC
and is scraped over HTTP. Names, types and units come from dcgm-exporter's
``etc/default-counters.csv`` (tests/collector/data/dcgm-exporter/, commented lines
included: dcgm-exporter ships DCGM_FI_PROF_SM_ACTIVE commented out); the labels
from its renderer and Kubernetes mapping at the same commit (see the README there).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rooftop.collector.config import CollectorConfig, parse_config
from rooftop.collector.dcgm import DCGM_FIELDS
from rooftop.collector.fleet import Fleet
from rooftop.collector.otel import Telemetry
from rooftop.collector.service import Collector
from rooftop.common.model import Bound, PodRef
from tests.collector.helpers import H100, AgentStream, batch, gpu, verdict
from tests.collector.helpers import scrape as scrape_text
from tests.collector.test_otel import feed

COUNTERS = Path(__file__).parent / "data" / "dcgm-exporter" / "default-counters.csv"
MIB = 2**20
# internal/pkg/rendermetrics/render_metrics.go (device labels), gpu_collector.go
# (err_code, err_msg on XID_ERRORS), transformation/const.go (pod, namespace, container).
DCGM_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID",
               "hostname", "pod", "namespace", "container", "err_code", "err_msg"}  # fmt: skip
DEVICE_LABELS = {"gpu", "UUID", "device", "modelName", "hostname"}
VLLM = PodRef("vllm-llama-7d9f8b6c5d-x2k4p", "serving", "vllm")
SIDECAR = PodRef("vllm-llama-7d9f8b6c5d-x2k4p", "serving", "metrics-sidecar")
MOVED = PodRef("vllm-llama-7d9f8b6c5d-q9w8z", "serving", "vllm")
MIG_POD = PodRef("embedder-0", "search", "embed")
MIG_UUID = "MIG-1111-2222"


def counters_file() -> dict[str, tuple[str, str]]:
    """DCGM field → (Prometheus type, help), commented lines too (uncommented first)."""
    fields: dict[str, tuple[str, str]] = {}
    commented: dict[str, tuple[str, str]] = {}
    for line in COUNTERS.read_text().splitlines():
        text = line.strip()
        target = fields
        if text.startswith("#"):
            text, target = text.lstrip("#").strip(), commented
        parts = [p.strip() for p in text.split(",", 2)]
        if len(parts) == 3 and re.fullmatch(r"DCGM_\w+", parts[0]):
            target.setdefault(parts[0], (parts[1], parts[2]))
    return {**commented, **fields}


def unit_of(help_text: str) -> str:
    """The unit dcgm-exporter's help text states."""
    match = re.search(r"\(in (\w+|%)\)", help_text)
    if match:
        return match[1]
    if re.match(r"(the )?ratio ", help_text, re.I):
        return "ratio"
    if "bytes per second" in help_text:
        return "B/s"
    return "count"


# What each DCGM field must read for the sample below, in the unit of its help text:
# Rooftop field, and how that unit converts it.
TO_UNIT = {
    "MiB": lambda v: v / MIB,
    "%": lambda v: v,
    "ratio": lambda v: v / 100,
    "W": lambda v: v,
    "C": lambda v: v,
    "MHz": lambda v: v,
    "B/s": lambda v: v,
    "count": lambda v: v,
}
SOURCES = {
    "DCGM_FI_DEV_FB_USED": "mem_used_bytes",
    "DCGM_FI_DEV_GPU_UTIL": "busy_pct",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "mem_ctrl_pct",
    "DCGM_FI_DEV_POWER_USAGE": "power_w",
    "DCGM_FI_DEV_GPU_TEMP": "temperature_c",
    "DCGM_FI_DEV_SM_CLOCK": "sm_clock_mhz",
    "DCGM_FI_PROF_DRAM_ACTIVE": "dram_bw_pct",
    "DCGM_FI_PROF_SM_ACTIVE": "sm_active_pct",
    "DCGM_FI_PROF_SM_OCCUPANCY": "sm_occupancy_pct",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "tensor_active_pct",
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": "fp16_active_pct",
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": "fp32_active_pct",
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": "fp64_active_pct",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "pcie_rx_bytes_per_s",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "pcie_tx_bytes_per_s",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "remapped_rows_corrected",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "remapped_rows_uncorrected",
    "DCGM_FI_DEV_RETIRED_SBE": "retired_pages_single_bit",
    "DCGM_FI_DEV_RETIRED_DBE": "retired_pages_double_bit",
}
# The ones the issue names: dashboards query these first.
REQUIRED = {"DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_SM_ACTIVE",
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP",
            "DCGM_FI_DEV_XID_ERRORS"}  # fmt: skip

# Both health mechanisms at once (a real GPU has one: row remapping from Ampere on, page
# retirement before), so every DCGM field is written and checked.
HEALTH = {"xid_codes": (13, 79), "xid_count": 3, "remapped_rows_corrected": 2,
          "remapped_rows_uncorrected": 0, "remap_failed": False,
          "retired_pages_single_bit": 5, "retired_pages_double_bit": 1,
          "retired_pages_pending": True}  # fmt: skip


def samples_batch(seq: int, gpu0_pods: tuple[PodRef, ...]) -> Any:
    return batch(
        seq,
        records=[
            gpu(0, pods=gpu0_pods, **HEALTH),
            gpu(1),  # no pod: one device-level series, as dcgm-exporter writes it
            gpu(2, mig_uuid=MIG_UUID, gpu_uuid="GPU-0002-uuid", gpu_instance_id=1,
                compute_instance_id=0, gpu_name=f"{H100} MIG 3g.40gb", pods=(MIG_POD,)),
        ],
        verdicts=[verdict(0, Bound.MEMORY)],
    )  # fmt: skip


@pytest.fixture
def collector() -> Iterator[Collector]:
    config = CollectorConfig(
        listen="127.0.0.1:0",
        insecure=True,
        prometheus_listen="127.0.0.1:0",
        prometheus_dcgm_names=True,
    ).validated()
    c = Collector(config)
    c.start()
    yield c
    c.shutdown(timeout_s=2)


def scrape(c: Collector) -> dict[str, Any]:
    text = scrape_text(c)
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("DCGM_")}


def wait_scrape(c: Collector, pred: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(c)
        if pred(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.05)


def series(families: dict[str, Any], name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for s in families[name].samples]


def test_dcgm_names_types_units_and_labels_match_dcgm_exporter(collector: Collector):
    with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
        stream.send(samples_batch(1, (VLLM, SIDECAR)))
        stream.wait_acked(1)
    families = wait_scrape(collector, lambda f: "DCGM_FI_DEV_FB_USED" in f)
    counters = counters_file()
    assert REQUIRED <= set(families)
    sample = gpu(0, **HEALTH)
    for name, family in families.items():
        assert name in counters, f"{name} is not a dcgm-exporter field"
        kind, help_text = counters[name]
        assert family.type == kind, name
        assert family.documentation == help_text, name
        unit = unit_of(help_text)
        for labels, value in series(families, name):
            assert set(labels) <= DCGM_LABELS, (name, labels)
            assert DEVICE_LABELS <= set(labels), (name, labels)
            if unit == "ratio":
                assert 0 <= value <= 1, (name, value)
        if name in SOURCES:
            values = [v for labels, v in series(families, name) if labels["gpu"] == "0"]
            expected = TO_UNIT[unit](getattr(sample, SOURCES[name]))
            assert values == [pytest.approx(expected)] * 2, (name, unit)  # one per container
    assert unit_of(counters["DCGM_FI_DEV_FB_FREE"][1]) == "MiB"
    (free,) = [v for labels, v in series(families, "DCGM_FI_DEV_FB_FREE") if labels["gpu"] == "1"]
    assert free == (80 - 70) * 1024  # MiB
    xid = {labels["gpu"]: (labels["err_code"], v)
           for labels, v in series(families, "DCGM_FI_DEV_XID_ERRORS")}  # fmt: skip
    assert xid == {"0": ("79", 79.0)}  # the last XID; absent where XIDs are not watched
    pending = {labels["gpu"]: v for labels, v in series(families, "DCGM_FI_DEV_RETIRED_PENDING")}
    assert pending == {"0": 1.0}  # NVML's pending flag; absent where not read


def test_dcgm_series_name_the_pods_on_gpus_and_mig_instances_and_follow_a_pod_move(
    collector: Collector,
):
    with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
        stream.send(samples_batch(1, (VLLM, SIDECAR)))
        stream.wait_acked(1)
        families = wait_scrape(collector, lambda f: "DCGM_FI_DEV_FB_USED" in f)
        by_gpu: dict[str, list[dict[str, str]]] = {}
        for labels, _ in series(families, "DCGM_FI_DEV_FB_USED"):
            by_gpu.setdefault(labels["gpu"], []).append(labels)
        # A shared GPU: one series per container, as dcgm-exporter's pod mapping writes.
        assert sorted(la["container"] for la in by_gpu["0"]) == ["metrics-sidecar", "vllm"]
        assert {(la["pod"], la["namespace"]) for la in by_gpu["0"]} == {(VLLM.pod, "serving")}
        assert {la["UUID"] for la in by_gpu["0"]} == {"GPU-0000-uuid"}
        assert by_gpu["0"][0]["device"] == "nvidia0"
        assert by_gpu["0"][0]["hostname"] == "gpu-node-1"
        assert by_gpu["0"][0]["modelName"] == H100
        (bare,) = by_gpu["1"]
        assert "pod" not in bare
        (mig,) = by_gpu["2"]
        assert (mig["pod"], mig["namespace"], mig["container"]) == ("embedder-0", "search",
                                                                     "embed")  # fmt: skip
        assert (mig["GPU_I_PROFILE"], mig["GPU_I_ID"]) == ("3g.40gb", "1")
        assert (mig["modelName"], mig["UUID"]) == (H100, "GPU-0002-uuid")

        stream.send(samples_batch(2, (MOVED,)))
        stream.wait_acked(2)

    def moved(f: dict[str, Any]) -> bool:
        pods = {la.get("pod") for la, _ in series(f, "DCGM_FI_DEV_FB_USED") if la["gpu"] == "0"}
        return pods == {MOVED.pod}

    assert moved(wait_scrape(collector, moved))


def test_dcgm_names_are_off_by_default():
    assert CollectorConfig().prometheus_dcgm_names is False
    fleet = Fleet()
    telemetry = Telemetry(fleet, prometheus_listen="127.0.0.1:0")
    try:
        feed(fleet, telemetry, samples_batch(1, (VLLM,)))
        text = telemetry.prometheus_text()
        assert "hw_gpu_memory_usage_bytes" in text
        assert "DCGM_" not in text
    finally:
        telemetry.shutdown(timeout_s=1)


def test_the_dcgm_names_key_is_read_from_the_prometheus_table():
    config = parse_config({"prometheus": {"dcgm_names": True}})
    assert config.prometheus_dcgm_names is True


def test_every_dcgm_name_written_is_in_the_metrics_doc_table_with_its_type():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "METRICS.md").read_text()
    section = doc.split("## DCGM-compatible names", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for names, kind in re.findall(r"^\| (`DCGM_[^|]+) \| (\w+) \|", section, re.M):
        for name in re.findall(r"`(DCGM_\w+)`", names):
            documented[name] = kind
    assert documented == {f.name: f.kind for f in DCGM_FIELDS}
