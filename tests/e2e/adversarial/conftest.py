"""Adversarial scenarios against a REAL collector process: every bound asserted as a bound.

Each module replays one abuse from issue 14 (items 3 and 6) at a scale that runs in
seconds, against ``agentctl collector`` in a subprocess (``tests/e2e/conftest.py``'s
``CollectorProc``, through the ``e2e`` harness), with the collector's bounds set low
so the scaled scenario crosses them. What is asserted is memory (VmRSS / VmHWM from
``/proc``), series, log lines, threads and the refusal counters, never a duration:

- the collector's memory grows by less than the bound times the per-item cost;
- what the bound refused is counted (``rooftop_collector_limited_total``,
  ``rooftop_collector_refused_total``, ``rooftop_collector_rejected_total``);
- a legitimate agent is still served (its batches applied and acked) and a scrape
  still succeeds.

Each test prints one ``ADVERSARIAL <scenario> {json}`` line with what it measured
(``pytest -s`` shows them); docs/OPERATOR-GUIDE.md ("Bounds under abuse") has the
before/after table they fill.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.conftest import CollectorProc

MIB = 1024 * 1024


def proc_status(pid: int, field: str) -> int:
    """A number from ``/proc/PID/status`` (``VmRSS`` and ``VmHWM`` in KiB, ``Threads``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    assert match is not None, f"no {field} in /proc/{pid}/status"
    return int(match.group(1))


def rss_mib(pid: int) -> float:
    """The process's resident memory now, MiB."""
    return proc_status(pid, "VmRSS") / 1024


def settled_rss_mib(pid: int, *, samples: int = 5, interval_s: float = 0.2) -> float:
    """The lowest RSS over a few samples: memory the process still holds, not a blip."""
    values = []
    for _ in range(samples):
        values.append(rss_mib(pid))
        time.sleep(interval_s)
    return min(values)


def scrape(collector: CollectorProc, timeout_s: float = 30.0) -> str:
    """The collector's ``/metrics`` text (fails if the endpoint refuses or errs)."""
    url = f"http://127.0.0.1:{collector.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        assert resp.status == 200
        return resp.read().decode()


def counter(collector: CollectorProc, name: str, label: str, reason: str) -> float:
    """One reason's value of a refusal counter, read off the Prometheus endpoint."""
    return collector.metric(name, **{label: reason})


def limited(collector: CollectorProc, reason: str) -> float:
    """``rooftop_collector_limited_total`` for ``reason``."""
    return counter(collector, "rooftop_collector_limited_total", "rooftop_limit_reason", reason)


def log_lines(collector: CollectorProc, pattern: str) -> list[str]:
    """The collector's log lines matching ``pattern`` (a regular expression)."""
    return [line for line in collector.log().splitlines() if re.search(pattern, line)]


def report(scenario: str, figures: dict[str, Any]) -> None:
    """One ``ADVERSARIAL <scenario> {json}`` line with what the test measured."""
    rounded = {k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}
    print(f"\nADVERSARIAL {scenario} {json.dumps(rounded, sort_keys=True)}")
