"""``rooftop.collector.service.run``: what it leaves behind in the process that called it."""

from __future__ import annotations

import gc
import threading

from rooftop.collector.config import CollectorConfig
from rooftop.collector.service import run


def test_run_tunes_the_gc_while_serving_and_restores_it_after():
    # The daemon collects less often while it serves (per-batch cost); a process that
    # calls run() and goes on (a test, an embedding) gets its GC back as it was.
    before = gc.get_threshold()
    stop = threading.Event()
    seen: list[tuple[tuple[int, int, int], int]] = []

    def echo(line: str) -> None:
        if "ingest on" in line:
            seen.append((gc.get_threshold(), gc.get_freeze_count()))
            stop.set()

    config = CollectorConfig(listen="127.0.0.1:0", insecure=True, prometheus_listen="")
    run(config, echo=echo, stop=stop, env={})
    assert seen and seen[0][0] != before and seen[0][1] > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
