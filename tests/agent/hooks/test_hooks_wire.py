"""The hook datagram format, without sockets."""

from __future__ import annotations

import json

import pytest

from rooftop.agent.hooks.wire import (
    KIND,
    MAX_DATAGRAM_BYTES,
    Distribution,
    HookSummary,
    decode_summary,
    encode_summary,
    summarize,
)

SUMMARY = HookSummary(
    pid=42,
    engine_id="vllm-42-0",
    seq=3,
    time_s=1_767_225_600.5,
    interval_s=1.001,
    model="llama",
    requests_running=3,
    requests_waiting=1,
    requests_started=2,
    requests_finished=1,
    output_tokens=512,
    tpot_ms=Distribution(count=4, mean=5.8, p50=5.7, p99=6.4),
    ttft_ms=None,
    kv_cache_usage_ratio=0.25,
    dropped=1,
    errors=0,
)


def doc(**overrides):
    d = json.loads(encode_summary(SUMMARY))
    d.update(overrides)
    return json.dumps(d).encode()


def test_roundtrip():
    data = encode_summary(SUMMARY)
    assert len(data) < 600
    assert decode_summary(data) == SUMMARY


def test_unknown_fields_are_ignored():
    assert decode_summary(doc(future_field={"x": 1})) == SUMMARY


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        doc(kind="something.else"),
        doc(v=2),
        doc(engine_id=""),
        doc(engine_id=7),
        doc(pid=-1),
        doc(pid=True),
        doc(seq="3"),
        doc(output_tokens=-5),
        doc(requests_running=1.5),
        doc(time_s=None),
        doc(interval_s=True),
        doc(interval_s="1.0"),
        doc(seq=3.0),
        doc(requests_finished=False),
        doc(model=5),
        doc(kv_cache_usage_ratio=1.5),
        doc(tpot_ms=[1, 2]),
        doc(tpot_ms={"count": 1, "mean": -1.0, "p50": 1.0, "p99": 1.0}),
        doc(tpot_ms={"count": 1, "mean": 1.0}),
        b'{"v":1,"kind":"' + KIND.encode() + b'","engine_id":"e","pid":1,"seq":1,'
        b'"time_s":NaN,"interval_s":1}',
        b" " * (MAX_DATAGRAM_BYTES + 1),
    ],
)
def test_malformed_datagrams_raise_value_error(data):
    with pytest.raises(ValueError):
        decode_summary(data)


def test_zero_count_distribution_is_none():
    assert decode_summary(doc(ttft_ms={"count": 0, "mean": 0, "p50": 0, "p99": 0})).ttft_ms is None


def test_summarize_nearest_rank():
    assert summarize([]) is None
    d = summarize([float(v) for v in range(1, 101)])
    assert d == Distribution(count=100, mean=50.5, p50=50.0, p99=99.0)
    one = summarize([7.0])
    assert one == Distribution(count=1, mean=7.0, p50=7.0, p99=7.0)
    two = summarize([1.0, 9.0])
    assert (two.p50, two.p99) == (1.0, 9.0)


def test_encode_refuses_nan():
    bad = HookSummary(pid=1, engine_id="e", seq=1, time_s=float("nan"), interval_s=1.0)
    with pytest.raises(ValueError):
        encode_summary(bad)


def test_integer_valued_floats_decode_as_floats():
    decoded = decode_summary(doc(interval_s=2, time_s=1_767_225_600))
    assert (decoded.interval_s, decoded.time_s) == (2.0, 1_767_225_600.0)
    assert type(decoded.interval_s) is float and type(decoded.time_s) is float
