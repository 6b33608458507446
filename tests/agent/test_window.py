"""Window: derived per-sample signals, attribution, hold, trapezoid means, splitting."""

from __future__ import annotations

import pytest

from rooftop.agent.window import (
    ENGINE_HOLD_DEFAULT_S,
    GpuWindow,
    Tick,
    build_window,
    build_windows,
    derive_ticks,
    on_monotonic_time,
    pcie_link_bytes_per_s,
    summarize,
    time_weighted_mean,
)
from rooftop.common.errors import ConfigError
from rooftop.common.model import (
    EngineSample,
    GpuProcess,
    GpuSample,
    HostProcess,
    HostSample,
    Provenance,
)

T0 = 1_800_000_000.0
GEN5_X16 = 3.938e9 * 16


def gpu(t: float, index: int = 0, **kw) -> GpuSample:
    return GpuSample(time_s=T0 + t, gpu_index=index, gpu_uuid=f"GPU-{index}",
                     gpu_name="NVIDIA H100 80GB HBM3", **kw)


def gemv(t: float, index: int = 0, **kw) -> GpuSample:
    base = dict(busy_pct=98.0, mem_ctrl_pct=100.0, sm_active_pct=81.0,
                tensor_active_pct=2.2, dram_bw_pct=85.0)
    return gpu(t, index, **{**base, **kw})


def engine(t: float, running: int | None = 1, waiting: int | None = 0, **kw) -> EngineSample:
    return EngineSample(time_s=T0 + t, engine_id=kw.pop("engine_id", "e"),
                        requests_running=running, requests_waiting=waiting, **kw)


def one_tick(sample: GpuSample, *engines: EngineSample, host: HostSample | None = None,
             sole_gpu: bool = True) -> Tick:
    (tick,) = derive_ticks([sample], engines, () if host is None else (host,), sole_gpu=sole_gpu)
    return tick


# ---- per-sample signals ----------------------------------------------------------


def test_dram_is_gpm_dram_bw_and_falls_back_to_mem_ctrl_as_proxy():
    t = one_tick(gpu(0, dram_bw_pct=84.8, mem_ctrl_pct=97.0))
    assert (t.dram_pct, t.dram_provenance) == (84.8, Provenance.GPM)
    t = one_tick(gpu(0, mem_ctrl_pct=97.0))
    assert (t.dram_pct, t.dram_provenance) == (97.0, Provenance.PROXY)


def test_compute_is_the_busiest_pipe_not_sm_util():
    # A GEMV: SMs "active" 81 %, pipes nearly idle. SM_UTIL must not be the compute signal.
    t = one_tick(gpu(0, busy_pct=98.0, sm_active_pct=81.3, tensor_active_pct=2.2,
                     fp16_active_pct=0.5, fp32_active_pct=6.0, fp64_active_pct=0.0))
    assert (t.compute_pct, t.compute_provenance) == (6.0, Provenance.GPM)
    assert t.sm_active_pct == 81.3
    assert t.busy_pct == 98.0


def test_compute_falls_back_to_util_gpu_as_proxy():
    t = one_tick(gpu(0, busy_pct=98.0, mem_ctrl_pct=33.0))
    assert (t.compute_pct, t.compute_provenance) == (98.0, Provenance.PROXY)


def test_unmeasured_signals_stay_none_not_zero():
    t = one_tick(gpu(0))
    assert t.dram_pct is None and t.dram_provenance is None
    assert t.compute_pct is None and t.compute_provenance is None
    assert t.busy_pct is None and t.pcie_pct is None
    assert t.requests_in_flight is None and t.queue_empty is None
    assert t.process_cpu_pct is None


@pytest.mark.parametrize(("gen", "width", "gb_per_s"), [
    (1, 16, 4.0), (2, 16, 8.0), (3, 16, 15.76), (4, 16, 31.5), (5, 16, 63.0), (6, 16, 121.0),
    (5, 8, 31.5),
])
def test_pcie_link_capacity_per_direction(gen, width, gb_per_s):
    assert pcie_link_bytes_per_s(gen, width) == pytest.approx(gb_per_s * 1e9, rel=0.002)


@pytest.mark.parametrize(("gen", "width"), [(None, 16), (5, None), (9, 16), (5, 0)])
def test_pcie_link_capacity_unknown(gen, width):
    assert pcie_link_bytes_per_s(gen, width) is None


def test_pcie_pct_is_the_busier_direction_over_link_capacity():
    t = one_tick(gpu(0, pcie_rx_bytes_per_s=0.82 * GEN5_X16, pcie_tx_bytes_per_s=1e9,
                     pcie_link_gen=5, pcie_link_width=16))
    assert t.pcie_pct == pytest.approx(82.0)
    t = one_tick(gpu(0, pcie_tx_bytes_per_s=0.5 * GEN5_X16, pcie_link_gen=5, pcie_link_width=16))
    assert t.pcie_pct == pytest.approx(50.0)


def test_pcie_pct_none_without_rates_or_link():
    assert one_tick(gpu(0, pcie_link_gen=5, pcie_link_width=16)).pcie_pct is None
    assert one_tick(gpu(0, pcie_rx_bytes_per_s=1e9)).pcie_pct is None


def test_lost_sample_is_flagged():
    assert one_tick(gpu(0, lost=True)).lost


# ---- engine attribution and hold -------------------------------------------------


def test_engine_state_properties():
    t = one_tick(gemv(1), engine(0, running=3, waiting=2, tpot_ms=5.8, ttft_ms=40.0))
    assert t.requests_in_flight == 5
    assert t.queue_empty is False
    assert (t.tpot_ms, t.ttft_ms, t.engine_ids) == (5.8, 40.0, ("e",))
    t = one_tick(gemv(1), engine(0, running=0, waiting=0))
    assert t.requests_in_flight == 0 and t.queue_empty is True
    t = one_tick(gemv(1), engine(0, running=2, waiting=None))
    assert t.requests_in_flight == 2


def test_engine_attributed_by_gpu_indices():
    e = engine(0, running=4, gpu_indices=(1,))
    assert one_tick(gemv(1, index=1), e, sole_gpu=False).requests_running == 4
    assert one_tick(gemv(1, index=0), e, sole_gpu=False).requests_running is None
    # Named for another GPU: not ours even on a one-GPU recording.
    assert one_tick(gemv(1, index=0), e, sole_gpu=True).requests_running is None


def test_engine_attributed_by_pid_in_gpu_process_list():
    e = engine(0, running=4, pid=4242)
    mine = gemv(1, index=0, processes=(GpuProcess(4242, 10**9),))
    other = gemv(1, index=1, processes=(GpuProcess(7, 10**9),))
    assert one_tick(mine, e, sole_gpu=False).requests_running == 4
    assert one_tick(other, e, sole_gpu=False).requests_running is None


def test_unattributed_engine_applies_only_to_a_sole_gpu():
    e = engine(0, running=4)
    assert one_tick(gemv(1), e, sole_gpu=True).requests_running == 4
    assert one_tick(gemv(1), e, sole_gpu=False).requests_running is None


def test_engine_pid_on_sole_gpu_without_process_list_applies():
    # NVML shows no processes (e.g. a container's pid namespace): nothing to match on.
    assert one_tick(gemv(1), engine(0, running=4, pid=99), sole_gpu=True).requests_running == 4
    with_list = gemv(1, processes=(GpuProcess(7),))
    assert one_tick(with_list, engine(0, running=4, pid=99), sole_gpu=True).requests_running is None


def test_engine_state_is_the_latest_at_or_before_the_tick():
    ticks = derive_ticks(
        [gemv(0.5), gemv(1.0), gemv(1.5), gemv(2.5)],
        [engine(1.0, running=1), engine(2.0, running=7)],
        sole_gpu=True,
    )
    assert [t.requests_running for t in ticks] == [None, 1, 1, 7]


def test_engine_sample_held_for_three_intervals():
    engines = [engine(0, running=2), engine(1, running=2)]  # 1 s apart: held 3 s
    ticks = derive_ticks([gemv(t) for t in (1.0, 3.9, 4.1)], engines, sole_gpu=True)
    assert [t.requests_running for t in ticks] == [2, 2, None]


def test_lone_engine_sample_held_default_seconds():
    times = (0.0, ENGINE_HOLD_DEFAULT_S - 0.1, ENGINE_HOLD_DEFAULT_S + 0.1)
    ticks = derive_ticks([gemv(t) for t in times], [engine(0, running=2)], sole_gpu=True)
    assert [t.requests_running for t in ticks] == [2, 2, None]


def test_engines_on_one_gpu_add_up():
    t = one_tick(gemv(1), engine(0, running=2, waiting=1, engine_id="a", tpot_ms=4.0),
                 engine(0.5, running=3, waiting=0, engine_id="b", tpot_ms=6.0))
    assert (t.requests_running, t.requests_waiting, t.tpot_ms) == (5, 1, 5.0)
    assert t.engine_ids == ("a", "b")


# ---- host ------------------------------------------------------------------------


def test_process_cpu_is_the_busiest_process_of_this_gpu():
    host = HostSample(T0, cpu_pct=12.0, processes=(
        HostProcess(10, cpu_pct=100.0, gpu_indices=(0,)),
        HostProcess(11, cpu_pct=40.0, gpu_indices=(0,)),
        HostProcess(12, cpu_pct=300.0, gpu_indices=(1,)),
    ))
    t = one_tick(gemv(0.1), host=host, sole_gpu=False)
    assert (t.process_cpu_pct, t.host_cpu_pct) == (100.0, 12.0)


def test_process_cpu_by_pid_in_gpu_process_list():
    host = HostSample(T0, processes=(HostProcess(10, cpu_pct=95.0),))
    mine = gemv(0.1, processes=(GpuProcess(10),))
    assert one_tick(mine, host=host, sole_gpu=False).process_cpu_pct == 95.0
    assert one_tick(gemv(0.1), host=host, sole_gpu=False).process_cpu_pct is None


def test_stale_host_sample_is_not_held():
    host = HostSample(T0, processes=(HostProcess(10, cpu_pct=95.0, gpu_indices=(0,)),))
    assert one_tick(gemv(ENGINE_HOLD_DEFAULT_S + 1), host=host).process_cpu_pct is None


# ---- means and windows -----------------------------------------------------------


def test_time_weighted_mean_is_trapezoid():
    # 0→10 over 1 s, then 10 for 2 s: (5 + 20) / 3, not the arithmetic 6.67.
    assert time_weighted_mean([(0.0, 0.0), (1.0, 10.0), (3.0, 10.0)]) == pytest.approx(25 / 3)
    assert time_weighted_mean([(5.0, 42.0)]) == 42.0
    assert time_weighted_mean([(5.0, 1.0), (5.0, 3.0)]) == 2.0
    assert time_weighted_mean([]) is None


def test_window_means_are_time_weighted_with_provenance():
    samples = [gemv(0.0, dram_bw_pct=0.0), gemv(1.0, dram_bw_pct=90.0),
               gemv(3.0, dram_bw_pct=90.0)]
    w = build_window(samples, sole_gpu=True)
    assert w.dram_pct == pytest.approx((45 + 180) / 3)
    assert w.dram_provenance is Provenance.GPM
    assert w.compute_pct == pytest.approx(2.2)
    assert (w.start_s, w.end_s, w.samples) == (T0, T0 + 3.0, 3)
    assert (w.gpu_uuid, w.gpu_name) == ("GPU-0", "NVIDIA H100 80GB HBM3")


def test_window_provenance_is_proxy_without_gpm():
    w = build_window([gpu(0.0, busy_pct=98.0, mem_ctrl_pct=100.0),
                      gpu(0.1, busy_pct=98.0, mem_ctrl_pct=100.0)])
    assert w.dram_provenance is Provenance.PROXY
    assert w.compute_provenance is Provenance.PROXY


def test_window_engine_summary():
    w = build_window([gemv(t / 10) for t in range(11)],
                     [engine(0, running=1, tpot_ms=78.0), engine(0.5, running=3, tpot_ms=80.0)],
                     sole_gpu=True)
    assert w.engine is not None
    assert w.engine.engine_ids == ("e",)
    assert w.engine.tpot_ms == pytest.approx(79.0, abs=0.2)
    assert w.engine.requests_in_flight == pytest.approx(2.0, abs=0.2)


def test_window_without_engine_has_no_summary():
    assert build_window([gemv(0)]).engine is None


def test_build_window_rejects_empty_and_mixed_gpus():
    with pytest.raises(ValueError, match="at least one"):
        build_window([])
    with pytest.raises(ValueError, match="one GPU"):
        build_window([gemv(0, index=0), gemv(0, index=1)])


def test_summarize_empty_needs_bounds():
    w = summarize(0, (), start_s=T0, end_s=T0 + 1)
    assert isinstance(w, GpuWindow) and w.samples == 0 and w.dram_pct is None
    with pytest.raises(ValueError):
        summarize(0, ())


def test_build_windows_whole_recording_is_one_window_per_gpu():
    records = [gemv(t / 10, index=i) for t in range(30) for i in (0, 1)]
    windows = build_windows(reversed(records))  # order does not matter
    assert sorted(windows) == [(0, ""), (1, "")]
    assert [len(ws) for ws in windows.values()] == [1, 1]
    assert windows[1, ""][0].samples == 30
    ticks = windows[1, ""][0].ticks
    assert [t.time_s for t in ticks] == sorted(t.time_s for t in ticks)


def test_build_windows_fixed_windows_from_the_first_sample():
    records = [gemv(t / 10) for t in range(35)] + [gemv(1.0 + t / 10, index=1) for t in range(5)]
    windows = build_windows(records, window_s=1.0)
    assert [w.samples for w in windows[0, ""]] == [10, 10, 10, 5]
    assert [(w.start_s - T0, w.end_s - T0) for w in windows[0, ""]] == [
        (0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]
    # GPU 1 starts later: its window is the shared 1-2 s one, not its own.
    assert [(w.start_s - T0, w.samples) for w in windows[1, ""]] == [(1.0, 5)]


def test_build_windows_skips_windows_without_samples():
    windows = build_windows([gemv(0.0), gemv(0.5), gemv(3.2)], window_s=1.0)
    assert [round(w.start_s - T0) for w in windows[0, ""]] == [0, 3]


def test_engine_hold_crosses_window_edges():
    records = [gemv(0.0), engine(0.95, running=5), *[gemv(1.0 + t / 10) for t in range(5)]]
    windows = build_windows(records, window_s=1.0)
    assert windows[0, ""][0].ticks[0].requests_running is None
    assert all(t.requests_running == 5 for t in windows[0, ""][1].ticks)


def test_build_windows_unattributed_engine_with_two_gpus_is_ignored():
    records = [gemv(0, index=0), gemv(0, index=1), engine(0, running=3)]
    windows = build_windows(records)
    assert windows[0, ""][0].engine is None and windows[1, ""][0].engine is None


def test_build_windows_lost_gpu():
    windows = build_windows([gemv(0), gpu(0.1, lost=True)])
    assert windows[0, ""][0].lost


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_build_windows_rejects_bad_window(bad):
    with pytest.raises(ConfigError, match="window_s"):
        build_windows([gemv(0)], window_s=bad)


def test_build_windows_no_gpu_samples():
    assert build_windows([engine(0)]) == {}


def test_gpm_gap_in_a_gpm_gpu_is_left_out_not_taken_as_proxy():
    from rooftop.agent.window import derive_ticks as _derive
    from rooftop.common.model import GpuSample as _S

    gap = _S(time_s=0.0, gpu_index=0, busy_pct=90.0, mem_ctrl_pct=95.0)
    full = [_S(time_s=0.1 * i, gpu_index=0, busy_pct=95.0, mem_ctrl_pct=97.0,
               dram_bw_pct=85.0, tensor_active_pct=2.0) for i in range(1, 5)]
    ticks = _derive([gap, *full])
    assert len(ticks) == 4
    assert {t.dram_provenance for t in ticks} == {Provenance.GPM}


# ---- wall-clock steps: windows on the monotonic clock ---------------------------------


def _stepped_ticks(steps: dict[int, float]) -> list[tuple[float, list]]:
    """50 ticks at 10 Hz of a GEMV that goes idle halfway; the wall clock steps at
    ``steps`` (tick index -> seconds), the monotonic clock never does."""
    ticks, offset_s = [], 0.0
    for k in range(50):
        offset_s += steps.get(k, 0.0)
        t = 0.1 * k + offset_s
        sample = gemv(t) if k < 25 else gpu(t, busy_pct=0.0, dram_bw_pct=0.0,
                                             tensor_active_pct=0.0, sm_active_pct=0.0)
        ticks.append((500.0 + 0.1 * k, [sample, HostSample(time_s=T0 + t, cpu_pct=5.0)]))
    return ticks


@pytest.mark.parametrize("steps", [{20: 3600.0}, {20: 3600.0, 35: -3600.0}, {10: -3600.0}])
def test_a_wall_clock_step_inside_a_window_weighs_nothing(steps):
    steady = build_window([r for _, rs in _stepped_ticks({}) for r in rs][::2])
    records = on_monotonic_time(_stepped_ticks(steps))
    window = build_window([r for r in records if isinstance(r, GpuSample)])
    # Before: the interval across a +1 h step weighed 3600 s against 0.1 s for the
    # others, and the window (so the verdict's) spanned an hour.
    assert window.end_s - window.start_s == pytest.approx(4.9)
    assert window.dram_pct == pytest.approx(steady.dram_pct)
    assert window.compute_pct == pytest.approx(steady.compute_pct)
    # The label is the wall time of the last tick: where the clock stands now.
    assert window.end_s == pytest.approx(_stepped_ticks(steps)[-1][1][0].time_s)


def test_a_window_without_a_step_is_returned_as_it_was_taken():
    ticks = _stepped_ticks({})
    records = on_monotonic_time(ticks)
    assert all(a is b for a, b in zip(records, [r for _, rs in ticks for r in rs], strict=True))


def test_an_engine_on_a_gpu_index_belongs_to_the_mig_instance_that_runs_its_pid():
    """GPU 0 in MIG mode: the engine names GPU 0 and its pid runs in instance B, so
    instance B's window has its TPOT and instance A's and the parent's do not; an
    engine no instance lists (another pid) still applies to every one of them."""
    records = []
    for t in (0.0, 0.5, 1.0):
        records += [
            gemv(t),
            gemv(t, mig_uuid="MIG-a", processes=(GpuProcess(pid=11),)),
            gemv(t, mig_uuid="MIG-b", processes=(GpuProcess(pid=22),)),
            engine(t, gpu_indices=(0,), pid=22, tpot_ms=9.0, engine_id="b"),
            engine(t, gpu_indices=(0,), pid=99, tpot_ms=5.0, engine_id="elsewhere"),
        ]
    windows = build_windows(records)
    engines = {key.mig_uuid: ws[0].engine for key, ws in windows.items()}
    assert set(engines["MIG-b"].engine_ids) == {"b", "elsewhere"}
    assert engines["MIG-a"].engine_ids == ("elsewhere",)
    assert engines[""].engine_ids == ("elsewhere",)
