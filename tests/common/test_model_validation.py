"""``invalid_reason``: impossible figures in a record, and the histogram opt-out."""

from __future__ import annotations

import math

import pytest

from rooftop.common.model import (
    EMPTY_HISTOGRAM,
    EngineSample,
    GpuSample,
    HistogramDelta,
    invalid_reason,
)

BAD_HIST = HistogramDelta(bounds_s=(0.2, 0.1), bucket_counts=(1, 0, 0), sum_s=0.1, count=1)


def engine(**kw) -> EngineSample:
    return EngineSample(time_s=1.0, engine_id="e", tpot_ms=5.0, tpot_hist=EMPTY_HISTOGRAM, **kw)


def test_an_impossible_histogram_is_invalid_by_default():
    assert invalid_reason(engine(ttft_hist=BAD_HIST)) == (
        "ttft_hist: bounds are not finite and strictly increasing"
    )


def test_histograms_false_skips_only_the_histograms_the_caller_has_checked():
    assert invalid_reason(engine(ttft_hist=BAD_HIST), histograms=False) is None
    assert invalid_reason(engine(ttft_hist=BAD_HIST, ttft_ms=math.nan), histograms=False) == (
        "ttft_ms is nan"
    )
    assert invalid_reason(engine(requests_running=-1), histograms=False) == (
        "requests_running is negative (-1)"
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"busy_pct": 101.0}, "busy_pct is over 100 (101.0)"),
        ({"power_w": 20_000.0}, "power_w is over its ceiling 10000 (20000)"),
        ({"mem_used_bytes": -1}, "mem_used_bytes is negative (-1)"),
        ({"temperature_c": math.inf}, "temperature_c is inf"),
        ({"busy_pct": 100.0, "lost": True}, None),  # bool fields are not figures
    ],
)
def test_gpu_sample_figures_are_held_to_their_ranges(fields, reason):
    sample = GpuSample(time_s=1.0, gpu_index=0, gpu_uuid="GPU-0", gpu_name="H100", **fields)
    assert invalid_reason(sample) == reason


def test_xid_code_counts_are_none_or_one_per_code():
    assert invalid_reason(GpuSample(time_s=1.0, gpu_index=0, xid_codes=(79, 13))) is None
    counted = GpuSample(time_s=1.0, gpu_index=0, xid_codes=(79, 13), xid_code_counts=(2, 1))
    assert invalid_reason(counted) is None
    assert invalid_reason(GpuSample(time_s=1.0, gpu_index=0, xid_codes=(79, 13),
                                    xid_code_counts=(3,))) == (
        "xid_code_counts has 1 entries for 2 xid codes"
    )
