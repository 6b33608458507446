"""Workloads: pod owners from pod names, model > pod owner > process, rows per workload."""

from __future__ import annotations

import pytest

from rooftop.common.model import (
    Bound,
    EngineSample,
    GpuProcess,
    GpuSample,
    PodRef,
    Verdict,
)
from rooftop.common.workload import (
    Workload,
    WorkloadGpu,
    WorkloadKind,
    aggregate,
    pod_owner,
    workload_gpus,
    workload_of,
)

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("pod", "kind", "name"),
    [
        ("vllm-llama-7d9f8b6c5d-x2k4p", WorkloadKind.DEPLOYMENT, "vllm-llama"),
        ("api-5c6b7d8f9-zzzzz", WorkloadKind.DEPLOYMENT, "api"),
        ("triton-0", WorkloadKind.STATEFULSET, "triton"),
        ("sglang-router-12", WorkloadKind.STATEFULSET, "sglang-router"),
        ("dcgm-probe-7xk2q", WorkloadKind.DAEMONSET, "dcgm-probe"),
        ("benchmark", WorkloadKind.POD, "benchmark"),
        # a vowel / a 1 / a 3 are never in a generated suffix: a hand-named pod
        ("train-a1e3o", WorkloadKind.POD, "train-a1e3o"),
        ("job-01", WorkloadKind.POD, "job-01"),  # ordinals have no leading zero
    ],
)
def test_pod_owner_is_read_from_the_name_pattern_of_its_controller(pod, kind, name):
    assert pod_owner(pod) == (kind, name)


def test_a_model_served_on_the_gpu_names_the_workload_before_its_pod():
    pods = (PodRef("vllm-llama-7d9f8b6c5d-x2k4p", "serving", "vllm"),)
    w = workload_of(node="n1", model=LLAMA, pods=pods, processes=((42, 10),))
    assert w == Workload(WorkloadKind.MODEL, LLAMA, "serving")
    assert w.label == f"model/{LLAMA}"


def test_without_a_model_the_pod_owner_names_the_workload():
    pods = (PodRef("vllm-llama-7d9f8b6c5d-x2k4p", "serving", "vllm"),)
    w = workload_of(node="n1", pods=pods, processes=((42, 10),))
    assert w == Workload(WorkloadKind.DEPLOYMENT, "vllm-llama", "serving")


def test_without_pods_the_process_with_most_gpu_memory_names_the_workload_on_its_node():
    w = workload_of(node="n1", processes=((7, 1), (42, 2**30)), process_names={42: "python3"})
    assert w == Workload(WorkloadKind.PROCESS, "python3 (pid 42)", node="n1")
    assert w.label == "n1:python3 (pid 42)"
    assert workload_of(node="n1", processes=((9, None),)).name == "pid 9"


def test_a_gpu_with_nothing_on_it_has_no_workload():
    assert workload_of(node="n1").kind is WorkloadKind.NONE


def _verdict(bound: Bound, advice: str = "", pods: tuple[PodRef, ...] = ()) -> Verdict:
    return Verdict(
        gpu_index=0, gpu_uuid="GPU-0", gpu_name="H100", verdict=bound, cause=None,
        confidence=0.9, rule="r", evidence=(), recommendations=(advice,) if advice else (),
        regimes=((bound, 1.0),), samples=5, active_samples=5, window_start_s=0,
        window_end_s=5, pods=pods,
    )  # fmt: skip


def test_the_newest_sample_s_pods_win_over_the_verdict_s_after_a_pod_moves():
    old = (PodRef("a-7d9f8b6c5d-x2k4p", "ns1", "c"),)
    new = (PodRef("b-0", "ns2", "c"),)
    sample = GpuSample(time_s=1, gpu_index=0, pods=new)
    (g,) = workload_gpus(
        node="n1",
        device="0",
        gpu_name="H100",
        sample=sample,
        verdict=_verdict(Bound.MEMORY, pods=old),
        engine=None,
    )
    assert g.workload == Workload(WorkloadKind.STATEFULSET, "b", "ns2")
    assert g.pods == new
    # no pods in the sample: the verdict's window still says who held the GPU
    (g,) = workload_gpus(
        node="n1",
        device="0",
        gpu_name="H100",
        sample=GpuSample(time_s=1, gpu_index=0, processes=(GpuProcess(pid=5),)),
        verdict=_verdict(Bound.MEMORY, pods=old),
        engine=None,
    )
    assert g.workload.name == "a"


def test_a_lost_gpu_counts_as_lost_and_offers_no_stale_advice():
    (g,) = workload_gpus(
        node="n1",
        device="0",
        gpu_name="H100",
        sample=GpuSample(time_s=1, gpu_index=0, lost=True),
        verdict=_verdict(Bound.MEMORY, "FP8 KV cache"),
        engine=None,
    )
    assert g.verdict is Bound.LOST
    assert g.recommendations == ()


def test_an_inaccessible_gpu_is_unknown_not_lost_and_offers_no_stale_advice():
    # NVML refusing the agent the GPU: nothing measured it, so the last verdict's advice
    # is as stale as a lost GPU's.
    (g,) = workload_gpus(
        node="n1",
        device="0",
        gpu_name="H100",
        sample=GpuSample(time_s=1, gpu_index=0, lost=True, inaccessible="NO_PERMISSION"),
        verdict=_verdict(Bound.MEMORY, "FP8 KV cache"),
        engine=None,
    )
    assert g.verdict is Bound.UNKNOWN
    assert g.recommendations == ()


def test_engine_percentiles_are_taken_and_the_mean_stands_in_for_a_missing_p50():
    e = EngineSample(time_s=1, engine_id="vllm", tpot_ms=6.0, tpot_p99_ms=9.0, model=LLAMA)
    (g,) = workload_gpus(node="n", device="0", gpu_name="H100", sample=None, verdict=None, engine=e)
    assert (g.tpot_p50_ms, g.tpot_p99_ms, g.model) == (6.0, 9.0, LLAMA)
    e = EngineSample(time_s=1, engine_id="vllm", tpot_ms=6.0, tpot_p50_ms=5.5)
    (g,) = workload_gpus(node="n", device="0", gpu_name="H100", sample=None, verdict=None, engine=e)
    assert g.tpot_p50_ms == 5.5


_devices = iter(range(1_000_000))


def _gpu(
    workload: Workload,
    node: str,
    bound: Bound | None,
    advice: str = "",
    p50: float | None = None,
    p99: float | None = None,
) -> WorkloadGpu:
    return WorkloadGpu(workload=workload, node=node, device=str(next(_devices)), gpu_name="H100",
                       verdict=bound, recommendations=(advice,) if advice else (),
                       tpot_p50_ms=p50, tpot_p99_ms=p99)  # fmt: skip


def test_rows_count_gpus_mix_verdicts_take_the_worst_tpot_and_the_dominant_advice():
    llama = Workload(WorkloadKind.MODEL, LLAMA, "serving")
    batch = Workload(WorkloadKind.DEPLOYMENT, "batch", "jobs")
    gpus = [
        _gpu(llama, "n1", Bound.MEMORY, "FP8 KV cache", 5.0, 8.0),
        _gpu(llama, "n2", Bound.MEMORY, "FP8 KV cache", 6.5, 7.0),
        _gpu(llama, "n2", Bound.HOST, "CUDA graphs", 20.0, 40.0),
        _gpu(batch, "n1", None),
    ]
    rows = {r.key: r for r in aggregate(gpus)}
    row = rows[f"model/{LLAMA}"]
    assert row.gpus == 3
    assert row.nodes == ("n1", "n2")
    assert row.mix == ((Bound.MEMORY, 2), (Bound.HOST, 1))
    assert row.dominant is Bound.MEMORY
    assert row.action == "FP8 KV cache"
    assert (row.tpot_p50_ms, row.tpot_p99_ms) == (20.0, 40.0)
    assert row.share(Bound.MEMORY) == pytest.approx(2 / 3)
    assert rows["deployment/batch"].dominant is None
    assert rows["deployment/batch"].action is None

    by_ns = {r.key: r.gpus for r in aggregate(gpus, "namespace")}
    assert by_ns == {"serving": 3, "jobs": 1}
    by_node = {r.key: r.gpus for r in aggregate(gpus, "node")}
    assert by_node == {"n1": 2, "n2": 2}


def test_a_tie_in_the_mix_goes_to_the_more_urgent_verdict():
    w = Workload(WorkloadKind.POD, "p", "ns")
    (row,) = aggregate([_gpu(w, "n", Bound.IDLE), _gpu(w, "n", Bound.HOST, "CUDA graphs")])
    assert row.dominant is Bound.HOST
    assert row.action == "CUDA graphs"


def test_an_unknown_grouping_is_refused():
    with pytest.raises(ValueError, match="by must be one of workload, namespace, node"):
        aggregate([], "cluster")


def test_a_gpu_shared_by_two_controllers_counts_for_each_and_once_for_its_node():
    shared = (PodRef("embed-0", "batch", "tei"), PodRef("llm-0", "serving", "vllm"))
    gpus = workload_gpus(node="n1", device="0/MIG-1", gpu_name="H100 MIG 3g.40gb",
                         sample=GpuSample(time_s=1, gpu_index=0, mig_uuid="MIG-1", pods=shared),
                         verdict=_verdict(Bound.MEMORY), engine=None)  # fmt: skip
    assert [(g.workload.label, g.pods) for g in gpus] == [
        ("statefulset/embed", shared[:1]),
        ("statefulset/llm", shared[1:]),
    ]
    assert [(r.key, r.gpus) for r in aggregate(gpus)] == [
        ("statefulset/embed", 1),
        ("statefulset/llm", 1),
    ]
    (node,) = aggregate(gpus, "node")
    assert (node.gpus, node.pods) == (1, shared)


def test_on_a_mig_instance_an_engine_counts_only_when_its_process_is_there():
    e = EngineSample(time_s=1, engine_id="vllm", pid=42, gpu_indices=(0,), model=LLAMA)
    pod = (PodRef("embed-0", "batch", "tei"),)
    elsewhere = GpuSample(
        time_s=1, gpu_index=0, mig_uuid="MIG-2", pods=pod, processes=(GpuProcess(pid=7),)
    )
    (g,) = workload_gpus(node="n", device="0/MIG-2", gpu_name="H100", sample=elsewhere,
                         verdict=None, engine=e)  # fmt: skip
    assert g.workload.label == "statefulset/embed"
    here = GpuSample(time_s=1, gpu_index=0, mig_uuid="MIG-1", processes=(GpuProcess(pid=42),))
    (g,) = workload_gpus(node="n", device="0/MIG-1", gpu_name="H100", sample=here,
                         verdict=None, engine=e)  # fmt: skip
    assert g.workload.kind is WorkloadKind.MODEL
