"""Trace format v1: reading real recordings, round trips, and bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from rooftop.agent.trace import TraceWriter, encode_line, read_trace
from rooftop.common.errors import TraceError
from rooftop.common.model import EngineSample, GpuProcess, GpuSample, HostProcess, HostSample

GOOD_GPU = {"gpu": {"time": "2026-11-22T18:40:39.241113Z", "gpu_index": 0, "busy_pct": 50.0}}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_every_shared_recording_with_gpu_samples(shared_traces: Path):
    for path in sorted(shared_traces.glob("*.jsonl")):
        trace = read_trace(path)
        gpus = [r for r in trace.records if isinstance(r, GpuSample)]
        assert len(gpus) >= 10, path.name
        assert gpus[0].gpu_name == "NVIDIA H100 80GB HBM3"
        assert trace.skipped == 0


def test_absent_metric_stays_none_not_zero(shared_traces: Path):
    first = next(r for r in read_trace(shared_traces / "idle.jsonl").records
                 if isinstance(r, GpuSample))
    assert first.busy_pct == 0.0  # measured zero is kept
    assert first.temperature_c is None  # not in the file: absent, never 0
    assert first.fp16_active_pct is None


def test_engine_records_are_read(shared_traces: Path):
    engines = [r for r in read_trace(shared_traces / "hf_8b_b1.jsonl").records
               if isinstance(r, EngineSample)]
    assert engines and engines[0].tpot_ms == pytest.approx(96.436)
    assert engines[0].requests_running == 1


def test_round_trip_of_every_record_kind(tmp_path: Path):
    records = [
        GpuSample(time_s=1795372839.25, gpu_index=3, gpu_uuid="GPU-x", busy_pct=12.5,
                  dram_bw_pct=80.0, mem_used_bytes=2**40, clock_event_reasons=4,
                  processes=(GpuProcess(42, 1024), GpuProcess(43, None))),
        EngineSample(time_s=1795372839.5, engine_id="vllm", requests_running=0,
                     tpot_ms=5.84, gpu_indices=(0, 1)),
        HostSample(time_s=1795372840.0, cpu_pct=12.0,
                   processes=(HostProcess(42, 99.5, (3,), None, "python"),)),
    ]
    buf = io.StringIO()
    TraceWriter(buf).write(records)
    path = tmp_path / "rt.jsonl"
    path.write_text(buf.getvalue())
    assert list(read_trace(path).records) == records


def test_gpu_index_zero_is_written_explicitly():
    line = encode_line(GpuSample(time_s=0.0, gpu_index=0))
    assert json.loads(line)["gpu"]["gpu_index"] == 0


def test_invalid_json_names_file_and_line(tmp_path: Path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD_GPU), "{not json"])
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: not valid JSON"):
        read_trace(path)


def test_json_that_is_not_a_trace_record_names_file_and_line(tmp_path: Path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"gpu": {"busy_pct": "lots"}})])
    with pytest.raises(TraceError, match=r"bad\.jsonl:1: not a TraceRecord"):
        read_trace(path)


def test_record_with_no_kind_is_an_error(tmp_path: Path):
    path = write_lines(tmp_path / "bad.jsonl", ["{}"])
    with pytest.raises(TraceError, match=r":1: not a TraceRecord"):
        read_trace(path)


def test_unknown_fields_are_ignored(tmp_path: Path):
    rec = {"gpu": {**GOOD_GPU["gpu"], "future_metric": 1}, "future_kind_note": "x"}
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(rec)])
    assert read_trace(path).records[0].busy_pct == 50.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "value"),
    [("busy_pct", "NaN"), ("dram_bw_pct", -3.0), ("mem_ctrl_pct", 140.0), ("power_w", -1.0)],
)
def test_out_of_range_values_are_skipped_and_counted(tmp_path: Path, field: str, value: object):
    bad = {"gpu": {**GOOD_GPU["gpu"], field: value}}
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD_GPU), json.dumps(bad)])
    trace = read_trace(path)
    assert len(trace.records) == 1
    assert trace.skipped == 1
    assert trace.skipped_reasons[field] == 1


def test_empty_trace_is_a_clear_error(tmp_path: Path):
    path = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(TraceError, match="empty trace"):
        read_trace(path)


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "nope.jsonl")


def test_project_copy_of_the_h100_recordings_matches_shared():
    from tests.conftest import DATA_TRACES, SHARED_TRACES

    if not SHARED_TRACES.is_dir():
        pytest.skip("../shared/traces is not checked out beside the project")
    for shared in SHARED_TRACES.glob("*.jsonl"):
        assert (DATA_TRACES / shared.name).read_bytes() == shared.read_bytes(), shared.name
