"""Classifier: the per-sample tree, the window verdict from regime shares, causes,
confidence, recommendations, hysteresis."""

from __future__ import annotations

import dataclasses

import pytest

from rooftop.agent.classifier import (
    DEFAULT_THRESHOLDS,
    Hysteresis,
    Thresholds,
    classify,
    classify_tick,
    explain_tick,
    is_active,
)
from rooftop.agent.window import GpuWindow, Tick, build_window, summarize
from rooftop.common.errors import ConfigError
from rooftop.common.model import (
    Bound,
    Cause,
    EngineSample,
    GpuSample,
    HostProcess,
    HostSample,
    Provenance,
    Verdict,
)

T0 = 1_800_000_000.0
GEN5_X16 = 3.938e9 * 16
GPM, PROXY = Provenance.GPM, Provenance.PROXY


def tick(dram: float | None, compute: float | None, busy: float | None = 98.0, t: float = 0.0,
         prov: Provenance = GPM, **kw) -> Tick:
    return Tick(time_s=T0 + t, dram_pct=dram, dram_provenance=prov if dram is not None else None,
                compute_pct=compute,
                compute_provenance=prov if compute is not None else None,
                busy_pct=busy, **kw)


def window(ticks: list[Tick]) -> GpuWindow:
    return summarize(0, ticks, gpu_uuid="GPU-0", gpu_name="NVIDIA H100 80GB HBM3")


def series(n: int, dram: float, compute: float, busy: float = 98.0, start: float = 0.0,
           **kw) -> list[Tick]:
    return [tick(dram, compute, busy, t=start + i / 10, **kw) for i in range(n)]


def sample(t: float, **kw) -> GpuSample:
    return GpuSample(time_s=T0 + t, gpu_index=0, gpu_uuid="GPU-0", gpu_name="H100", **kw)


# ---- thresholds ------------------------------------------------------------------


def test_default_thresholds_are_the_designed_ones():
    th = DEFAULT_THRESHOLDS
    assert (th.idle_busy_pct, th.memory_high_pct, th.compute_high_pct, th.low_pct) == (
        0.5, 80, 80, 60)
    assert (th.dominant_pct, th.dominance_ratio, th.regime_share) == (50, 2, 0.6)
    assert (th.pcie_cause_pct, th.cpu_cause_pct, th.proxy_confidence) == (50, 90, 0.7)


@pytest.mark.parametrize("bad", [
    {"low_pct": -1}, {"regime_share": 1.5}, {"dominance_ratio": 0.5},
    {"memory_high_pct": float("nan")}, {"single_sample_confidence": 1.5},
])
def test_bad_thresholds_are_a_config_error(bad):
    with pytest.raises(ConfigError, match="thresholds"):
        Thresholds(**bad)


# ---- the per-sample tree ---------------------------------------------------------


@pytest.mark.parametrize(("dram", "compute", "busy", "expected"), [
    # idle: busy ≈ 0 (≤ 0.5), no GPM activity and no request in flight
    (0.0, 0.0, 0.0, Bound.IDLE),
    (0.0, 0.0, 0.5, Bound.IDLE),
    (0.0, 0.0, 1.0, Bound.HOST),  # host_stall: busy 1, nothing else
    # memory: dram > 80 and compute < 60
    (85.0, 2.2, 98.0, Bound.MEMORY),  # GEMV b1
    (80.1, 59.9, 98.0, Bound.MEMORY),
    (85.0, 60.0, 98.0, Bound.MIXED),  # compute not < 60, and 85 < 2 × 60
    # memory: dram ≥ 50 and dram ≥ 2 × compute
    (50.0, 25.0, 98.0, Bound.MEMORY),
    (74.0, 31.0, 98.0, Bound.MEMORY),  # graph-captured 8B decode
    (80.0, 10.0, 98.0, Bound.MEMORY),  # not > 80, but dominates
    (50.0, 25.1, 98.0, Bound.HOST),  # ratio just missed; both < 60
    (49.9, 10.0, 98.0, Bound.HOST),
    # compute: compute > 80 and dram < 60
    (25.5, 91.9, 98.0, Bound.COMPUTE),  # GEMM 8192³
    (59.9, 80.1, 98.0, Bound.COMPUTE),
    (60.0, 85.0, 98.0, Bound.MIXED),
    # compute: compute ≥ 50 and compute ≥ 2 × dram
    (27.0, 65.0, 98.0, Bound.COMPUTE),  # 2048-token prefill
    (25.0, 50.0, 98.0, Bound.COMPUTE),
    # host: both < 60 while work is present
    (4.3, 0.1, 10.0, Bound.HOST),  # HF eager 8B decode
    (39.8, 57.8, 50.0, Bound.HOST),
    # mixed: both high, or no rule fires
    (70.0, 70.0, 98.0, Bound.MIXED),
    (80.0, 45.0, 98.0, Bound.MIXED),
])
def test_tick_tree(dram, compute, busy, expected):
    assert classify_tick(tick(dram, compute, busy)) is expected


def test_requests_in_flight_are_work_even_at_busy_zero():
    # HF decode between kernels: util.gpu reads 0 but a request is running.
    t = tick(0.0, 0.0, 0.0, requests_running=1, requests_waiting=0)
    assert is_active(t)
    assert classify_tick(t) is Bound.HOST
    assert classify_tick(tick(0.0, 0.0, 0.0, requests_running=0, requests_waiting=0)) is Bound.IDLE


def test_without_busy_gpm_activity_is_work():
    assert is_active(tick(85.0, 2.0, busy=None))
    assert not is_active(tick(0.0, 0.0, busy=None))


@pytest.mark.parametrize(("dram", "compute", "sm_active", "expected"), [
    # gemv_b1.jsonl's first sample: util.gpu (refreshed every 200 ms) still 0.
    (67.1, 1.77, 63.4, Bound.MEMORY),
    (0.0, 91.9, 94.7, Bound.COMPUTE),  # tensor pipes busy
    (1.2, 0.04, 1.4, Bound.HOST),  # hf_1b_b1.jsonl's gaps: a little DRAM and SM
    (0.0, 0.0, 0.75, Bound.HOST),  # SM activity alone (a one-block kernel)
    (0.0006, 0.0, 0.0, Bound.IDLE),  # a CUDA context and nothing else: idle
    (0.4, 0.3, 0.5, Bound.IDLE),  # at or under the idle bar
])
def test_gpm_activity_is_work_while_util_gpu_reads_zero(dram, compute, sm_active, expected):
    t = tick(dram, compute, busy=0.0, sm_active_pct=sm_active)
    assert classify_tick(t) is expected
    assert is_active(t) is (expected is not Bound.IDLE)


def test_nvml_proxies_do_not_overrule_util_gpu():
    # Without GPM, util.memory is the dram proxy; it refreshes with util.gpu, so a
    # busy 0 beside it is not a lagging counter.
    assert not is_active(tick(30.0, 0.0, busy=0.0, prov=PROXY))


def test_a_window_counts_the_lagging_first_sample_as_work():
    ticks = [tick(67.1, 1.77, busy=0.0, sm_active_pct=63.4),
             *series(9, 85.0, 2.2, start=0.1)]
    v = classify(window(ticks))
    assert v.verdict is Bound.MEMORY
    assert (v.samples, v.active_samples) == (10, 10)
    assert dict(v.regimes) == {Bound.MEMORY: 1.0}


def test_unmeasured_dram_or_compute_is_mixed():
    assert explain_tick(tick(None, 50.0)) == (Bound.MIXED, "dram or compute not measured")


def test_thresholds_are_configurable():
    t = tick(75.0, 40.0)
    assert classify_tick(t) is Bound.MIXED
    assert classify_tick(t, Thresholds(memory_high_pct=70.0)) is Bound.MEMORY
    assert classify_tick(tick(1.0, 0.0, busy=1.0), Thresholds(idle_busy_pct=2.0)) is Bound.IDLE
    # 1.5:1 alerting instead of 2:1
    assert classify_tick(tick(55.0, 30.0), Thresholds(dominance_ratio=1.5)) is Bound.MEMORY


def test_explain_names_the_branch():
    assert explain_tick(tick(85.0, 2.2))[1] == "dram > 80 and compute < 60"
    assert explain_tick(tick(74.0, 31.0))[1] == "dram ≥ 50 and dram ≥ 2 × compute"
    assert explain_tick(tick(25.0, 92.0))[1] == "compute > 80 and dram < 60"
    assert explain_tick(tick(27.0, 65.0))[1] == "compute ≥ 50 and compute ≥ 2 × dram"


def test_proxy_tree_leans_on_util_memory():
    # No GPM: util.gpu reads 95-98 for GEMV and GEMM alike; util.memory separates them.
    assert classify_tick(tick(97.1, 95.5, busy=95.5, prov=PROXY)) is Bound.MEMORY  # GEMV
    assert classify_tick(tick(33.2, 98.1, busy=98.1, prov=PROXY)) is Bound.COMPUTE  # GEMM
    assert classify_tick(tick(5.0, 10.0, busy=10.0, prov=PROXY)) is Bound.HOST  # HF eager
    # The same figures from GPM pipes would be "both high": the leniency is proxy-only.
    assert classify_tick(tick(97.1, 95.5)) is Bound.MIXED


# ---- window verdicts -------------------------------------------------------------


def test_idle_window():
    v = classify(window(series(30, 0.0, 0.0, busy=0.0)))
    assert v.verdict is Bound.IDLE and v.cause is None
    assert v.active_samples == 0 and v.samples == 30
    assert v.confidence == round(1 - 0.5 / 30, 3)
    assert v.regimes == ()


def test_memory_bound_window():
    v = classify(window(series(35, 85.0, 2.2)))
    assert v.verdict is Bound.MEMORY and v.cause is None
    assert v.confidence == round(1 - 0.5 / 35, 3)
    assert v.rule == "dram > 80 and compute < 60 in 100% of active samples"
    assert v.regimes == ((Bound.MEMORY, 1.0),)
    assert v.recommendations[0].startswith("FP8 KV cache")
    assert "--kv-cache-dtype fp8" in v.recommendations[0]
    advice = " ".join(v.recommendations)
    assert "ridge point" in advice and "FLOPS does not move TPOT" in advice
    for needle in ("INT4", "batch", "Speculative", "H200 +43 %", "B200"):
        assert needle in advice


def test_rule_names_each_branch_when_several_fired():
    v = classify(window(series(8, 85.0, 2.0) + series(2, 74.0, 31.0, start=1.0)))
    assert v.verdict is Bound.MEMORY
    assert v.rule.startswith("memory-bound in 100% of active samples (")
    assert "dram > 80 and compute < 60 80%" in v.rule
    assert "dram ≥ 50 and dram ≥ 2 × compute 20%" in v.rule


def test_compute_bound_window():
    v = classify(window(series(36, 25.5, 91.9)))
    assert v.verdict is Bound.COMPUTE
    assert v.recommendations[0] == "Tensor parallelism / more GPUs"
    advice = " ".join(v.recommendations)
    assert "FP8 compute" in advice and "prefill" in advice


def test_idle_samples_do_not_dilute_the_regime():
    # Active 70 % of the time, memory-bound whenever active: no engine to say "starved".
    v = classify(window(series(7, 85.0, 2.0) + series(3, 0.0, 0.0, busy=0.0, start=1.0)))
    assert v.verdict is Bound.MEMORY
    assert v.active_samples == 7
    assert v.evidence_value("active_share").value == pytest.approx(0.7)


def test_never_classifies_window_means_alternating_gemv_gemm_is_mixed():
    # 2 s GEMV, 2 s GEMM, twice, at 10 Hz, with a transition sample between phases.
    ticks: list[Tick] = []
    t = 0.0
    for _ in range(2):
        for dram, compute in ((85.0, 2.0), (25.0, 92.0)):
            ticks += series(20, dram, compute, start=t)
            t += 2.0
            ticks.append(tick(40.0, 40.0, t=t))  # kernels switching: a host-bound blip
            t += 0.1
    w = window(ticks)
    v = classify(w)
    assert v.verdict is Bound.MIXED
    shares = dict(v.regimes)
    assert shares[Bound.MEMORY] == pytest.approx(40 / 84)
    assert shares[Bound.COMPUTE] == pytest.approx(40 / 84)
    assert "memory-bound 48%" in v.rule and "compute-bound 48%" in v.rule
    assert "closer to" in v.rule
    assert v.recommendations[0].startswith("Phases alternate")
    # The window means would mislead: dram ≈ 55, compute ≈ 47 reads as host-bound.
    assert w.dram_pct is not None and 50 < w.dram_pct < 60
    assert w.compute_pct is not None and 40 < w.compute_pct < 60
    means = tick(w.dram_pct, w.compute_pct)
    assert classify_tick(means) is Bound.HOST


def test_mixed_names_the_closer_regime():
    v = classify(window(series(55, 85.0, 2.0) + series(45, 25.0, 92.0, start=6.0)))
    assert v.verdict is Bound.MIXED
    assert v.rule.endswith("closer to memory-bound")
    assert v.regimes[0] == (Bound.MEMORY, 0.55)


def test_mostly_both_high_samples_are_mixed():
    v = classify(window(series(20, 75.0, 85.0)))
    assert v.verdict is Bound.MIXED
    assert v.rule.endswith("closer to compute-bound")


def test_starved_low_activity_with_empty_queue():
    # One short request every 2 s: active 30 %, memory-bound while active, queue empty otherwise.
    ticks = []
    for i in range(100):
        busy_now = i % 20 < 6
        ticks.append(tick(85.0 if busy_now else 0.0, 2.0 if busy_now else 0.0,
                          busy=98.0 if busy_now else 0.0, t=i / 10,
                          requests_running=1 if busy_now else 0, requests_waiting=0))
    v = classify(window(ticks))
    assert (v.verdict, v.cause) == (Bound.HOST, Cause.STARVED)
    assert "active in 30% of samples" in v.rule
    assert "empty 70% of the window" in v.rule
    assert v.recommendations[0] == "More load per GPU, or fewer replicas"
    assert dict(v.regimes)[Bound.MEMORY] == 1.0  # what it was while it had work


def test_not_starved_without_engine_evidence():
    ticks = [tick(85.0, 2.0, t=i / 10) if i % 20 < 6 else tick(0.0, 0.0, 0.0, t=i / 10)
             for i in range(100)]
    assert classify(window(ticks)).verdict is Bound.MEMORY


def test_lost_gpu():
    w = build_window([sample(0, busy_pct=98.0), sample(0.1, lost=True)])
    v = classify(w)
    assert v.verdict is Bound.LOST
    assert v.confidence == 1.0
    assert "lost" in v.rule
    assert v.recommendations[0] == "Drain the node and reset the GPU"


def test_inaccessible_gpu_says_so_and_never_advises_a_reset():
    w = build_window([dataclasses.replace(sample(t), gpu_index=3, lost=True,
                                          inaccessible="NO_PERMISSION") for t in (0, 1)])
    v = classify(w)
    assert v.rule.startswith(
        "GPU 3 is not accessible to this user (NVML NO_PERMISSION): run the agent with "
        "access to /dev/nvidia3")
    # Nothing measures it: "unknown" (never "lost", which alerts and drains the node).
    assert v.confidence == 1.0 and v.verdict is Bound.UNKNOWN
    text = " ".join(v.recommendations).lower()
    assert "/dev/nvidia3" in text
    assert "reset" not in text and "drain" not in text


def test_a_truly_lost_sample_outweighs_a_permission_problem():
    w = build_window([sample(0, lost=True, inaccessible="NO_PERMISSION"), sample(1, lost=True)])
    assert classify(w).recommendations[0] == "Drain the node and reset the GPU"


def test_empty_window_is_idle_with_no_confidence():
    v = classify(summarize(0, (), start_s=T0, end_s=T0 + 1))
    assert v.verdict is Bound.IDLE and v.confidence == 0.0


# ---- host-bound causes -----------------------------------------------------------


def test_pinned_h2d_copy_is_host_bound_pcie():
    # Measured: a pinned H2D copy reads busy 99, SM 0, PCIe rx 82 % of gen5 x16.
    samples = [sample(i / 10, busy_pct=99.0, mem_ctrl_pct=1.0, sm_active_pct=0.0,
                      tensor_active_pct=0.0, dram_bw_pct=2.0,
                      pcie_rx_bytes_per_s=0.82 * GEN5_X16, pcie_tx_bytes_per_s=0.1e9,
                      pcie_link_gen=5, pcie_link_width=16)
               for i in range(20)]
    v = classify(build_window(samples, sole_gpu=True))
    assert (v.verdict, v.cause) == (Bound.HOST, Cause.PCIE)
    assert v.evidence_value("pcie_pct").value == pytest.approx(82.0)
    assert "PCIe at 82 % of link capacity" in v.rule
    assert v.recommendations[0] == "Pinned host memory for transfers"
    assert any("offload" in r for r in v.recommendations)


def test_busy_python_loop_is_host_bound_cpu():
    samples = [sample(i / 10, busy_pct=10.0, mem_ctrl_pct=5.0, sm_active_pct=4.3,
                      tensor_active_pct=0.1, dram_bw_pct=4.3) for i in range(20)]
    hosts = [HostSample(T0 + i / 2, cpu_pct=8.0,
                        processes=(HostProcess(4242, cpu_pct=100.0, gpu_indices=(0,)),))
             for i in range(4)]
    engines = [EngineSample(T0 + i, "hf", requests_running=1, requests_waiting=0, tpot_ms=96.0)
               for i in range(2)]
    v = classify(build_window(samples, engines, hosts, sole_gpu=True))
    assert (v.verdict, v.cause) == (Bound.HOST, Cause.CPU)
    assert v.evidence_value("process_cpu_pct").value == 100.0
    assert v.evidence_value("tpot_ms").value == 96.0
    assert "at 100 % of one core" in v.rule
    assert v.recommendations[0] == "CUDA graphs / fewer kernel launches"
    assert any("tokenizer" in r for r in v.recommendations)


def test_cpu_cause_threshold_boundary():
    def at(cpu: float) -> Cause | None:
        return classify(window(series(20, 4.0, 0.1, busy=10.0, process_cpu_pct=cpu))).cause

    assert at(90.0) is Cause.CPU
    assert at(89.0) is None


def test_pcie_wins_over_cpu():
    v = classify(window(series(20, 2.0, 0.0, busy=99.0, pcie_pct=60.0, process_cpu_pct=100.0)))
    assert v.cause is Cause.PCIE
    v = classify(window(series(20, 2.0, 0.0, busy=99.0, pcie_pct=50.0, process_cpu_pct=100.0)))
    assert v.cause is Cause.CPU  # 50 is not above the bar


def test_starved_cause_when_active_but_queue_empty():
    # Active (a background kernel trickles) yet the engine has nothing to do.
    v = classify(window(series(20, 1.0, 0.0, busy=5.0, requests_running=0, requests_waiting=0)))
    assert (v.verdict, v.cause) == (Bound.HOST, Cause.STARVED)


def test_host_bound_without_evidence_says_what_would_name_it():
    v = classify(window(series(20, 0.0, 0.0, busy=1.0)))
    assert (v.verdict, v.cause) == (Bound.HOST, None)
    assert "cause not named" in v.rule
    assert v.recommendations[0] == "Name the cause: run with the host sensor"
    assert "engine hooks" in v.recommendations[1]


def test_host_bound_with_all_evidence_below_bars():
    v = classify(window(series(20, 5.0, 1.0, busy=12.0, pcie_pct=5.0, process_cpu_pct=40.0,
                               requests_running=2, requests_waiting=0)))
    assert (v.verdict, v.cause) == (Bound.HOST, None)
    assert v.recommendations[0] == "Profile the host loop (py-spy, nsys)"


# ---- evidence and confidence -----------------------------------------------------


def test_evidence_names_and_provenance():
    w = window(series(20, 85.0, 2.0, sm_active_pct=81.0, pcie_pct=1.0, process_cpu_pct=30.0,
                      requests_running=4, requests_waiting=1, tpot_ms=5.8, ttft_ms=40.0,
                      engine_ids=("vllm",)))
    v = classify(w)
    names = [e.name for e in v.evidence]
    assert names == ["dram_pct", "compute_pct", "busy_pct", "sm_active_pct", "pcie_pct",
                     "process_cpu_pct", "tpot_ms", "ttft_ms", "requests", "requests_running",
                     "active_share"]
    assert v.evidence_value("dram_pct").provenance is GPM
    assert v.evidence_value("busy_pct").provenance is Provenance.NVML
    assert v.evidence_value("requests").value == 5.0  # 4 running + 1 waiting
    assert v.evidence_value("requests_running").value == 4.0
    assert (v.window_start_s, v.window_end_s) == (w.start_s, w.end_s)
    assert (v.gpu_uuid, v.gpu_name) == ("GPU-0", "NVIDIA H100 80GB HBM3")


def test_proxy_signals_lower_confidence_and_are_tagged():
    gpm = classify(window(series(30, 85.0, 2.0)))
    proxy = classify(window(series(30, 97.0, 95.5, busy=95.5, prov=PROXY)))
    assert proxy.verdict is Bound.MEMORY
    assert proxy.confidence == pytest.approx(gpm.confidence * 0.7, abs=1e-3)  # rounded
    assert proxy.evidence_value("dram_pct").provenance is PROXY
    assert proxy.evidence_value("compute_pct").provenance is PROXY


def test_confidence_of_a_clean_window_grows_with_its_samples():
    # DESIGN §3.4: 1 - 0.5 / n. The agent's default window (1 Hz x 5 s) holds five.
    by_n = {n: classify(window(series(n, 85.0, 2.0))).confidence for n in (1, 2, 5, 10, 50)}
    assert by_n == {1: 0.5, 2: 0.75, 5: 0.9, 10: 0.95, 50: 0.99}


def test_marginal_share_lowers_confidence():
    decisive = classify(window(series(100, 85.0, 2.0)))
    marginal = classify(window(series(61, 85.0, 2.0) + series(39, 25.0, 92.0, start=7.0)))
    assert marginal.verdict is Bound.MEMORY
    assert marginal.confidence < decisive.confidence
    assert marginal.confidence == pytest.approx(0.6 + 0.4 * (0.01 / 0.3), abs=0.01)


# ---- hysteresis ------------------------------------------------------------------


def verdict(bound: Bound, confidence: float = 0.8, gpu: int = 0,
            cause: Cause | None = None) -> Verdict:
    return Verdict(gpu, "", "", bound, cause, confidence, "", (), (), (), 10, 10, T0, T0 + 1)


def test_hysteresis_holds_until_a_change_wins_twice():
    h = Hysteresis()
    mem, comp = verdict(Bound.MEMORY), verdict(Bound.COMPUTE)
    assert h.update(mem) is mem  # the first verdict is taken at once
    assert h.update(comp) is mem  # one window is a flicker
    assert h.update(comp) is comp  # two in a row is a change
    assert h.held(0) is comp


def test_hysteresis_interrupted_candidate_starts_over():
    h = Hysteresis()
    mem, comp = verdict(Bound.MEMORY), verdict(Bound.COMPUTE)
    h.update(mem)
    assert h.update(comp) is mem
    assert h.update(mem) is mem
    assert h.update(comp) is mem
    host = verdict(Bound.HOST)
    assert h.update(host) is mem  # a different candidate resets the count
    assert h.update(host) is host


def test_hysteresis_confident_change_is_immediate():
    h = Hysteresis()
    h.update(verdict(Bound.MEMORY))
    lost = verdict(Bound.LOST, confidence=1.0)
    assert h.update(lost) is lost


def test_hysteresis_cause_change_is_a_change():
    h = Hysteresis()
    h.update(verdict(Bound.HOST, cause=Cause.CPU))
    starved = verdict(Bound.HOST, cause=Cause.STARVED)
    assert h.update(starved).cause is Cause.CPU
    assert h.update(starved) is starved


def test_hysteresis_same_verdict_refreshes_and_gpus_are_independent():
    h = Hysteresis(hold=3)
    a0, a1 = verdict(Bound.MEMORY), verdict(Bound.MEMORY)
    h.update(a0)
    assert h.update(a1) is a1
    other = verdict(Bound.COMPUTE, gpu=1)
    assert h.update(other) is other
    assert h.held(0) is a1 and h.held(1) is other and h.held(2) is None


def test_hysteresis_hold_one_follows_every_change():
    h = Hysteresis(hold=1)
    h.update(verdict(Bound.MEMORY))
    comp = verdict(Bound.COMPUTE, confidence=0.1)
    assert h.update(comp) is comp


def test_hysteresis_rejects_zero_hold():
    with pytest.raises(ConfigError):
        Hysteresis(hold=0)


def test_ticks_and_windows_are_frozen():
    t = tick(1.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.dram_pct = 2.0  # type: ignore[misc]
