"""Pod attribution from the kubelet's pod-resources API, against a real gRPC stand-in."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rooftop.agent.sensors.pods import PodResources, device_pods
from rooftop.common.model import PodRef
from tests.kubelet_standin import KubeletStandin

GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-0000-0000-000000000002"
MIG_1 = "MIG-11111111-0000-0000-0000-000000000001"
MIG_2 = "MIG-22222222-0000-0000-0000-000000000002"


@pytest.fixture
def pods(kubelet: KubeletStandin):
    client = PodResources(str(kubelet.socket_path), refresh_s=3600, timeout_s=2.0)
    yield client
    client.shutdown(1.0)


def test_gpu_and_mig_uuids_map_to_pod_namespace_and_container(kubelet, pods):
    kubelet.assign(GPU_A, pod="llm-0", namespace="serving", container="vllm")
    kubelet.assign(
        MIG_1,
        pod="small-0",
        namespace="batch",
        container="worker",
        resource="nvidia.com/mig-3g.40gb",
    )
    kubelet.assign("cpu-ish-device", pod="other", resource="example.com/fpga")
    assert pods.refresh()
    assert pods.pods_of(GPU_A) == (PodRef("llm-0", "serving", "vllm"),)
    # A MIG instance is matched by its own UUID, never by its parent's.
    assert pods.pods_of(GPU_B, mig_uuid=MIG_1) == (PodRef("small-0", "batch", "worker"),)
    assert pods.pods_of(GPU_B, mig_uuid=MIG_2) == ()
    assert pods.pods_of(GPU_B) == ()
    assert "cpu-ish-device" not in pods.mapping  # not an nvidia.com resource


def test_shared_gpu_lists_every_pod_holding_a_replica(kubelet, pods):
    # Time-slicing: the device plugin hands out "<uuid>::<n>" replicas of one GPU.
    kubelet.assign(f"{GPU_A}::0", pod="a", namespace="ns1", container="c")
    kubelet.assign(f"{GPU_A}::1", pod="b", namespace="ns1", container="c")
    kubelet.assign(f"{GPU_A}::2", pod="a", namespace="ns0", container="side")
    assert pods.refresh()
    assert pods.pods_of(GPU_A) == (
        PodRef("a", "ns0", "side"),
        PodRef("a", "ns1", "c"),
        PodRef("b", "ns1", "c"),
    )


def test_index_device_ids_match_a_whole_gpu_by_index(kubelet, pods):
    kubelet.assign("1", pod="by-index")  # DEVICE_ID_STRATEGY=index
    assert pods.refresh()
    assert pods.pods_of(GPU_B, gpu_index=1) == (PodRef("by-index", "default", "main"),)
    assert pods.pods_of(GPU_A, gpu_index=0) == ()


def test_pod_moving_to_another_gpu_shows_at_the_next_refresh(kubelet, pods):
    kubelet.assign(GPU_A, pod="llm-0", namespace="serving", container="vllm")
    assert pods.refresh()
    kubelet.move("llm-0", "serving", "vllm", to=[GPU_B])
    assert pods.pods_of(GPU_A) == (PodRef("llm-0", "serving", "vllm"),)  # not refreshed yet
    assert pods.refresh()
    assert pods.pods_of(GPU_A) == ()
    assert pods.pods_of(GPU_B) == (PodRef("llm-0", "serving", "vllm"),)
    kubelet.remove("llm-0", "serving")
    assert pods.refresh()
    assert pods.mapping == {}


def test_kubelet_restart_keeps_the_last_mapping_then_recovers_with_one_warning(
    kubelet, pods, caplog
):
    kubelet.assign(GPU_A, pod="llm-0", namespace="serving", container="vllm")
    assert pods.refresh()
    kubelet.stop()  # the kubelet restarts: its socket is gone for a while
    with caplog.at_level(logging.INFO, logger="rooftop.agent.sensors.pods"):
        assert not pods.refresh()
        assert not pods.refresh()
        assert pods.pods_of(GPU_A) == (PodRef("llm-0", "serving", "vllm"),)
        # Back, with a pod rescheduled meanwhile, on the same socket path.
        kubelet.move("llm-0", "serving", "vllm", to=[GPU_B])
        kubelet.start()
        assert pods.refresh()
    assert pods.pods_of(GPU_B) == (PodRef("llm-0", "serving", "vllm"),)
    assert pods.pods_of(GPU_A) == ()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "keeping the last mapping" in warnings[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert pods.failures == 2


def test_socket_that_refuses_calls_is_a_failure_streak_not_a_crash(kubelet, pods, caplog):
    kubelet.assign(GPU_A, pod="p")
    assert pods.refresh()
    kubelet.stop()
    kubelet.socket_path.write_text("")  # a stale file where the socket was: calls fail
    with caplog.at_level(logging.WARNING, logger="rooftop.agent.sensors.pods"):
        for _ in range(3):
            assert not pods.refresh()
    assert len(caplog.records) == 1
    assert "UNAVAILABLE" in caplog.records[0].getMessage()
    assert pods.pods_of(GPU_A) == (PodRef("p", "default", "main"),)


def test_no_socket_is_one_info_line_and_no_attributes(tmp_path: Path, caplog):
    client = PodResources(str(tmp_path / "absent.sock"), refresh_s=3600)
    with caplog.at_level(logging.DEBUG, logger="rooftop.agent.sensors.pods"):
        client.start()
        client.refresh()
        client.refresh()
        client.shutdown(1.0)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "INFO",
            f"no kubelet pod-resources socket at {tmp_path / 'absent.sock'}: "
            "no Kubernetes pod attribution",
        ),
    ]
    assert client.pods_of(GPU_A, gpu_index=0) == ()
    assert client.failures == 0


def test_empty_socket_path_turns_attribution_off(caplog):
    client = PodResources("")
    with caplog.at_level(logging.DEBUG, logger="rooftop.agent.sensors.pods"):
        client.start()
        assert not client.refresh()
        client.shutdown(1.0)
    assert caplog.records == []


def test_device_pods_is_the_pure_mapping_of_one_list_answer(kubelet):
    kubelet.assign(MIG_1, MIG_2, pod="two-slices", resource="nvidia.com/mig-1g.10gb")
    mapping = device_pods(kubelet.response())
    ref = PodRef("two-slices", "default", "main")
    assert mapping == {MIG_1: (ref,), MIG_2: (ref,)}


def test_a_hung_kubelet_costs_one_deadline_and_keeps_the_last_mapping(kubelet, caplog):
    client = PodResources(str(kubelet.socket_path), refresh_s=3600, timeout_s=0.2)
    kubelet.assign(GPU_A, pod="p")
    assert client.refresh()
    kubelet.hang.set()  # List now blocks, as a wedged kubelet would
    try:
        with caplog.at_level(logging.WARNING, logger="rooftop.agent.sensors.pods"):
            assert not client.refresh()
    finally:
        kubelet.hang.clear()
        client.shutdown(1.0)
    assert "DEADLINE_EXCEEDED" in caplog.records[0].getMessage()
    assert client.pods_of(GPU_A) == (PodRef("p", "default", "main"),)
