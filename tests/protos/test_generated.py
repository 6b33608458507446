"""The committed code in rooftop/v1/ matches protos/ as the pinned generator emits it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Everywhere in the package: rooftop/v1/, the vendored kubelet pod-resources code in
# rooftop/v1/k8s/podresources/v1/, and any other generated package.
GENERATED = sorted((REPO / "rooftop").rglob("*_pb2*.py*"))


def test_generated_code_is_committed_for_every_proto():
    names = {p.name for p in GENERATED}
    for proto in (REPO / "protos").rglob("*.proto"):
        stem = proto.stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert stem + suffix in names, f"{stem}{suffix} missing: run python protos/generate.py"


def test_generated_code_is_not_stale(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0 and "pinned" in result.stderr:
        pytest.fail(result.stderr)
    assert result.returncode == 0, result.stderr
    for committed in GENERATED:
        fresh = tmp_path / committed.relative_to(REPO)
        assert fresh.exists(), f"generator no longer emits {committed.relative_to(REPO)}"
        assert fresh.read_text() == committed.read_text(), (
            f"{committed.relative_to(REPO)} is stale: run python protos/generate.py"
        )


def test_generated_modules_import_and_carry_trace_format_fields():
    from rooftop.v1 import telemetry_pb2 as pb

    gpu_fields = set(pb.GpuSample.DESCRIPTOR.fields_by_name)
    assert {"time", "gpu_index", "gpu_uuid", "busy_pct", "dram_bw_pct", "mem_ctrl_pct",
            "tensor_active_pct", "pcie_rx_bytes_per_s", "clock_event_reasons"} <= gpu_fields
    assert pb.GpuSample.DESCRIPTOR.fields_by_name["dram_bw_pct"].has_presence
    oneof = pb.TraceRecord.DESCRIPTOR.oneofs_by_name["record"]
    assert [f.name for f in oneof.fields] == ["gpu", "engine", "host"]


def test_vendored_kubelet_proto_is_upstream_text_and_serves_the_kubelets_service_name():
    from rooftop.v1.k8s.podresources.v1 import api_pb2

    vendored = REPO / "protos" / "k8s" / "podresources" / "v1"
    assert "Apache License" in (vendored / "LICENSE").read_text()
    # The kubelet serves "v1.PodResourcesLister": the package must stay upstream's "v1".
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert {"List", "Get", "GetAllocatableResources"} <= set(service.methods_by_name)
    assert (vendored / "api.proto").read_text().splitlines()[3] == "package v1;"
