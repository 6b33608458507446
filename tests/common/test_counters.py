"""Counters: named once as a stats dataclass, bumped from any thread, read as one snapshot."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from rooftop.common.counters import Counters


@dataclass(frozen=True, slots=True)
class _Stats:
    sent: int = 0
    dropped: int = 0
    last_error: str | None = None


def test_counts_add_up_and_a_snapshot_never_changes_afterwards():
    counts = Counters(_Stats)
    counts.add(sent=2)
    before = counts.get()
    counts.add(sent=1, dropped=4)
    counts.set(last_error="boom")
    assert before == _Stats(sent=2)
    assert counts.get() == _Stats(sent=3, dropped=4, last_error="boom")


def test_a_misspelt_counter_fails_at_once():
    counts = Counters(_Stats)
    with pytest.raises(AttributeError):
        counts.add(sentt=1)
    with pytest.raises(TypeError):
        counts.set(nope=1)
    assert counts.get() == _Stats()


def test_no_increment_is_lost_across_threads():
    counts = Counters(_Stats)

    def bump() -> None:
        for _ in range(2000):
            counts.add(sent=1)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts.get().sent == 16_000
