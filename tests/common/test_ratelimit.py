"""RateLimitedLog: one line per kind and interval, the rest counted, memory bounded."""

from __future__ import annotations

import logging

import pytest

from rooftop.common.ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_repeated_line_is_written_once_per_interval_then_says_how_many_were_left_out(
    caplog: pytest.LogCaptureFixture,
):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t"), interval_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        written = [limited.log(logging.WARNING, "poison", "rejected %d", i) for i in range(1000)]
        clock.now_s = 61
        limited.log(logging.WARNING, "poison", "rejected %d", 1000)
    assert written.count(True) == 1
    assert limited.suppressed == 999
    assert [r.getMessage() for r in caplog.records] == [
        "rejected 0",
        "rejected 1000 (999 more like it in the last 60 s, not logged)",
    ]


def test_kinds_are_limited_apart_and_memory_is_bounded(caplog: pytest.LogCaptureFixture):
    limited = RateLimitedLog(logging.getLogger("t"), max_keys=2, clock=Clock())
    with caplog.at_level(logging.INFO, "t"):
        for key in ("a", "b", "a", "c", "a"):
            limited.log(logging.INFO, key, key)
    # "a" was forgotten when "c" came (the least recently written of three kinds).
    assert [r.getMessage() for r in caplog.records] == ["a", "b", "c", "a"]
    assert len(limited._seen) == 2
