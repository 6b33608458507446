"""GPU health beside the verdict: XID events, ECC, row remapping, clock-event reasons.

The backend runs over the fake NVML (and, for the XID path, over the C-level stand-in
under the real pynvml); the XID events go through a real NVML event set, never mocked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rooftop.agent.health_report import format_health, health_of
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.fake import FakeNvmlLibrary, fake_backend
from rooftop.agent.sensors.nvml import HEALTH_EVERY_S, NvmlBackend
from rooftop.agent.sensors.xid import MAX_CODES
from rooftop.agent.trace import BUNDLED_RECORDINGS, encode_line
from rooftop.cli import main
from rooftop.common.codec import record_from_proto, record_to_proto
from rooftop.common.health import HealthState, assess, clock_event_names
from rooftop.common.model import GpuSample


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sample(**fields: Any) -> GpuSample:
    return GpuSample(time_s=1.0, gpu_index=0, **fields)


# -- the pure function -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "state", "first_reason"),
    [
        ({}, HealthState.OK, None),
        ({"xid_codes": (), "xid_count": 0, "ecc_corrected_volatile": 12}, HealthState.OK, None),
        ({"xid_codes": (79,), "xid_count": 1}, HealthState.FAILED, "XID 79: GPU has fallen off"),
        ({"xid_codes": (48,), "xid_count": 1}, HealthState.FAILED, "XID 48: double-bit ECC"),
        ({"xid_codes": (13, 79)}, HealthState.FAILED, "XID 79"),  # the failing XID first
        ({"xid_codes": (13,)}, HealthState.DEGRADED, "XID 13"),
        ({"ecc_uncorrected_volatile": 2}, HealthState.FAILED, "2 uncorrected ECC errors"),
        ({"ecc_uncorrected_aggregate": 2}, HealthState.OK, None),  # history, not now
        ({"remap_failed": True}, HealthState.FAILED, "row remapping failed"),
        ({"remap_pending": True}, HealthState.DEGRADED, "row remap pending"),
        ({"retired_pages_pending": True}, HealthState.DEGRADED, "page retirement pending"),
        ({"retired_pages_single_bit": 5, "retired_pages_double_bit": 1,
          "retired_pages_pending": False}, HealthState.OK, None),  # retired: done, history
        ({"clock_event_reasons": 0x40}, HealthState.DEGRADED, "clocks held down: hw_thermal"),
        ({"clock_event_reasons": 0x4 | 0x1}, HealthState.OK, None),  # power cap, idle: policy
        ({"lost": True}, HealthState.FAILED, "GPU lost"),
        ({"lost": True, "inaccessible": "NO_PERMISSION"}, HealthState.UNKNOWN,
         "not accessible to the agent (NVML NO_PERMISSION)"),
    ],
)
def test_health_table(fields, state, first_reason):
    health = assess(sample(**fields))
    assert health.state is state
    if first_reason is None:
        assert health.reasons == ()
    else:
        assert health.reasons[0].startswith(first_reason)


def test_clock_event_reasons_are_named_in_one_place():
    assert clock_event_names(None) == ()
    assert clock_event_names(0) == ()
    assert clock_event_names(0x1FF) == (
        "idle", "applications_clocks", "sw_power_cap", "hw_slowdown", "sync_boost",
        "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake", "display_clocks",
    )  # fmt: skip
    assert clock_event_names(0x8 | 0x400) == ("hw_slowdown", "0x400")  # unknown bits shown


# -- the backend -------------------------------------------------------------------


def test_xid_79_reaches_the_sample_from_the_event_thread():
    backend = fake_backend("h100", 2, "gemv")
    lib = backend.library
    try:
        first = backend.read(1, time.time())
        assert (first.xid_codes, first.xid_count) == ((), 0)
        lib.raise_xid(1, 79)
        wait_for(lambda: backend.xid_tally(1)[1] == 1)
        s = backend.read(1, time.time())
        assert (s.xid_codes, s.xid_count) == ((79,), 1)
        assert backend.read(0, time.time()).xid_codes == ()  # GPU 0 had none
        # Sticky: a later read still says so; the count grows with each event.
        lib.raise_xid(1, 79)
        lib.raise_xid(1, 13)
        wait_for(lambda: backend.xid_tally(1)[1] == 3)
        later = backend.read(1, time.time())
        assert (later.xid_codes, later.xid_code_counts) == ((79, 13), (2, 1))
        assert assess(backend.read(1, time.time())).state is HealthState.FAILED
    finally:
        backend.close()
    assert lib.live_event_sets == 0  # the set is freed on close, before shutdown
    assert not lib.initialized


def test_past_the_distinct_code_bound_an_xid_counts_in_the_total_only():
    backend = fake_backend("h100", 1, "gemv")
    lib = backend.library
    try:
        for xid in range(1, MAX_CODES + 2):
            lib.raise_xid(0, xid)
        lib.raise_xid(0, 1)
        wait_for(lambda: backend.xid_tally(0)[1] == MAX_CODES + 2)
        s = backend.read(0, time.time())
        assert s.xid_codes == tuple(range(1, MAX_CODES + 1))
        assert s.xid_code_counts == (2, *(1,) * (MAX_CODES - 1))
        assert s.xid_count == sum(s.xid_code_counts) + 1  # the 17th code: total only
    finally:
        backend.close()


def test_a_lost_gpu_keeps_its_xid_in_the_sampler():
    backend = fake_backend("h100", 1, "gemv")
    lib = backend.library
    try:
        lib.raise_xid(0, 79)
        wait_for(lambda: backend.xid_tally(0)[1] == 1)
        lib.inject(0, "*", "gpu_is_lost")  # what follows XID 79
        (gpu, _host) = Sampler(backend).tick() + [None]
        assert isinstance(gpu, GpuSample) and gpu.lost
        assert (gpu.xid_codes, gpu.xid_count, gpu.xid_code_counts) == ((79,), 1, (1,))
        assert assess(gpu).reasons[0] == "XID 79: GPU has fallen off the bus"
    finally:
        backend.close()


def test_a_failing_look_at_the_xid_events_is_counted_and_the_reads_go_on():
    class Failing(FakeNvmlLibrary):
        waits = 0

        def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:  # noqa: N803
            Failing.waits += 1
            if Failing.waits == 1:
                raise RuntimeError("a driver the library does not know")
            return super().nvmlEventSetWait_v2(eventSet, timeoutms)

    backend = NvmlBackend(Failing("h100", 1, "gemv"))
    try:
        # The read that looked is not touched by the look's trouble.
        assert backend.read(0, time.time()).busy_pct is not None
        assert ("nvmlEventSetWait_v2", "RuntimeError") in backend.errors
        backend.library.raise_xid(0, 48)
        wait_for(lambda: backend.xid_tally(0)[0] == (48,))  # it looked again after backing off
    finally:
        backend.close()


def test_without_event_support_xids_are_absent_not_zero():
    lib = FakeNvmlLibrary("h100", 1, "gemv")
    lib.inject(0, "nvmlDeviceRegisterEvents", "not_supported")
    backend = NvmlBackend(lib)
    try:
        s = backend.read(0, time.time())
        assert (s.xid_codes, s.xid_count) == ((), None)
    finally:
        backend.close()
    assert lib.live_event_sets == 0


def test_ecc_and_remapped_rows_are_read_every_health_interval():
    now = [100.0]
    backend = fake_backend("h100", 1, "gemv", clock=lambda: now[0])
    lib = backend.library
    try:
        lib.add_ecc_errors(0, corrected=5, uncorrected=1)
        lib.set_remapped_rows(0, 3, 1, pending=True)
        s = backend.read(0, 1.0)
        assert (s.ecc_corrected_volatile, s.ecc_uncorrected_volatile) == (5, 1)
        assert (s.ecc_corrected_aggregate, s.ecc_uncorrected_aggregate) == (5, 1)
        assert (s.remapped_rows_corrected, s.remapped_rows_uncorrected) == (3, 1)
        assert (s.remap_pending, s.remap_failed) == (True, False)
        calls = lib.calls["nvmlDeviceGetTotalEccErrors"]
        lib.add_ecc_errors(0, corrected=1)
        assert backend.read(0, 2.0).ecc_corrected_volatile == 5  # cached within the interval
        assert lib.calls["nvmlDeviceGetTotalEccErrors"] == calls
        now[0] += HEALTH_EVERY_S
        assert backend.read(0, 3.0).ecc_corrected_volatile == 6
    finally:
        backend.close()


def test_no_ecc_is_absent_field_by_field():
    lib = FakeNvmlLibrary("h100", 1, "gemv")
    lib.inject(0, "nvmlDeviceGetTotalEccErrors", "not_supported")
    lib.inject(0, "nvmlDeviceGetRemappedRows", "not_supported")
    backend = NvmlBackend(lib)
    try:
        s = backend.read(0, time.time())
        assert s.ecc_corrected_volatile is None and s.ecc_uncorrected_aggregate is None
        assert s.remapped_rows_corrected is None and s.remap_pending is None
        assert s.busy_pct is not None  # the rest of the tick stands
        assert ("nvmlDeviceGetTotalEccErrors", "NVMLError_NotSupported") in backend.errors
    finally:
        backend.close()


def test_xid_through_real_pynvml_over_the_c_stand_in():
    from rooftop.agent.sensors.nvml_standin import NvmlLibraryStandIn, installed

    model = FakeNvmlLibrary("h100", 2, "gemv")
    standin = NvmlLibraryStandIn(model, "r580")
    with installed(standin):
        backend = NvmlBackend()
        try:
            model.add_ecc_errors(1, corrected=7)
            model.set_remapped_rows(1, 2, 0, failed=True)
            model.raise_xid(1, 79)
            wait_for(lambda: backend.xid_tally(1)[1] == 1)
            s = backend.read(1, time.time())
            assert s.xid_codes == (79,) and s.ecc_corrected_aggregate == 7
            assert s.xid_code_counts == (1,)
            assert (s.remapped_rows_corrected, s.remap_failed) == (2, True)
            assert backend.read(0, time.time()).xid_codes == ()
        finally:
            backend.close()
    assert standin.failures == []
    assert model.live_event_sets == 0


def test_health_fields_round_trip_the_wire():
    s = sample(
        xid_codes=(79, 13),
        xid_count=4,
        ecc_corrected_volatile=1,
        ecc_uncorrected_volatile=0,
        ecc_corrected_aggregate=9,
        ecc_uncorrected_aggregate=0,
        remapped_rows_corrected=2,
        remapped_rows_uncorrected=0,
        remap_pending=False,
        remap_failed=False,
        retired_pages_single_bit=3,
        retired_pages_double_bit=0,
        retired_pages_pending=True,
    )
    assert record_from_proto(record_to_proto(s)) == s
    bare = sample()
    assert record_from_proto(record_to_proto(bare)) == bare  # absent stays absent


# -- diagnose ----------------------------------------------------------------------


def test_health_report_puts_failed_gpus_first():
    records = [
        GpuSample(time_s=1.0, gpu_index=0, gpu_name="H100", remap_pending=True),
        GpuSample(time_s=1.0, gpu_index=1, gpu_name="H100"),
        GpuSample(time_s=1.0, gpu_index=2, gpu_name="H100", xid_codes=(48,)),
        GpuSample(time_s=0.5, gpu_index=1, gpu_name="H100", xid_codes=(79,)),  # older
    ]
    reports = health_of(records)
    assert [(r.gpu_index, r.health.state.value) for r in reports] == [
        (2, "failed"), (0, "degraded"), (1, "ok"),
    ]  # fmt: skip
    assert format_health(reports) == [
        "GPU 2 (H100) FAILED: XID 48: double-bit ECC error",
        "GPU 0 (H100) degraded: row remap pending: reset the GPU to apply it",
    ]


def _trace_with_xid(tmp_path: Path, xid: int) -> Path:
    lines = (BUNDLED_RECORDINGS / "idle.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        obj = json.loads(line)
        if "gpu" in obj:
            obj["gpu"]["xid_codes"] = [xid]
            obj["gpu"]["xid_count"] = "1"
        out.append(json.dumps(obj))
    path = tmp_path / "xid.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def test_diagnose_says_a_fallen_off_gpu_first(tmp_path: Path):
    path = _trace_with_xid(tmp_path, 79)
    result = CliRunner().invoke(main, ["diagnose", "--replay", str(path)])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("GPU 0") and "FAILED: XID 79: GPU has fallen off the bus" in first
    result = CliRunner().invoke(main, ["diagnose", "--replay", str(path), "--json"])
    report = json.loads(result.stdout)
    assert report["health"][0] == {
        "gpu_index": 0,
        "state": "failed",
        "reasons": ["XID 79: GPU has fallen off the bus"],
        "xid_codes": [79],
    }


def test_diagnose_of_a_healthy_gpu_adds_no_line():
    path = BUNDLED_RECORDINGS / "idle.jsonl"
    plain = CliRunner().invoke(main, ["diagnose", "--replay", str(path)])
    assert plain.exit_code == 0
    assert not plain.stdout.startswith("GPU ")
    assert "FAILED" not in plain.stdout


def test_encode_line_carries_the_xid():
    line = encode_line(sample(xid_codes=(79,), xid_count=1))
    assert json.loads(line)["gpu"]["xid_codes"] == [79]


def test_xid_events_are_taken_by_the_reads_never_waited_for_and_none_is_lost():
    # A thread of its own woke once a second (earlier: ten times, in 100 ms waits); the
    # reads now look at the set without blocking, at most every POLL_S. NVML queues
    # events in the set, so a look between them loses none.
    class Counting(FakeNvmlLibrary):
        timeouts: list[int] = []

        def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:  # noqa: N803
            Counting.timeouts.append(timeoutms)
            return super().nvmlEventSetWait_v2(eventSet, timeoutms)

    backend = NvmlBackend(Counting("h100", 1, "gemv"))
    try:
        time.sleep(0.2)
        assert Counting.timeouts == []  # nobody read: nobody looked
        assert not [t for t in threading.enumerate() if "xid" in t.name]
        for _ in range(10):
            backend.read(0, time.time())
        assert Counting.timeouts == [0]  # ten reads inside POLL_S: one look, no wait
        for xid in (79, 13, 79):
            backend.library.raise_xid(0, xid)  # queued between two looks
        wait_for(lambda: backend.read(0, time.time()).xid_count == 3)
        sample = backend.read(0, time.time())
        assert (sample.xid_codes, sample.xid_code_counts) == ((79, 13), (2, 1))
        assert set(Counting.timeouts) == {0}
    finally:
        backend.close()
    assert backend.library.live_event_sets == 0
