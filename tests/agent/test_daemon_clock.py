"""The daemon's windows and verdicts on the monotonic clock while the wall clock steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from rooftop.agent.config import load_config
from rooftop.agent.daemon import Agent
from rooftop.agent.sensors.fake import fake_backend
from rooftop.common.codec import timestamp_s
from rooftop.v1 import telemetry_pb2 as pb

WINDOW_S = 1.0
T0 = 1_800_000_000.0


class ManualClock:
    """Seconds that move only when told to (a wall clock may be stepped back)."""

    def __init__(self, start_s: float) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def run_ticks(
    tmp_path: Path, steps: dict[int, float], ticks: int = 80
) -> tuple[list[pb.Verdict], float]:
    """Tick an agent (fake GEMV GPU, not started: no threads, no network) at 10 Hz,
    stepping its wall clock at ``steps`` (tick -> seconds); its verdicts, the wall time."""
    wall, mono = ManualClock(T0), ManualClock(1000.0)
    cfg = load_config(env={}, overrides={
        "agent_id": "node-clock", "collectors": ["127.0.0.1:9"], "insecure": True,
        "backend": "fake:h100", "rate_hz": 10, "window_s": WINDOW_S,
        "batch_interval_s": 60.0, "spool_dir": tmp_path / "spool", "host_sensor": False,
    })  # fmt: skip
    backend = fake_backend("h100", gpus=1, workloads="gemv", clock=mono)
    agent = Agent(cfg, backend=backend, clock=wall, monotonic=mono, env={})
    try:
        for k in range(ticks):
            wall.advance(steps.get(k, 0.0))
            tick_s = mono()
            agent._on_tick(agent.sampler.tick(), tick_s)  # what the sampler thread does
            wall.advance(0.1)
            mono.advance(0.1)
        return list(agent._verdicts), wall()
    finally:
        backend.close()


@pytest.mark.parametrize(
    "steps",
    [{25: 3600.0, 45: -3600.0}, {25: -3600.0}],
    ids=["plus_1h_and_back", "minus_1h"],
)
def test_a_wall_clock_step_neither_stretches_a_window_nor_changes_its_verdict(tmp_path, steps):
    verdicts, wall_s = run_ticks(tmp_path, steps)
    assert len(verdicts) >= 6
    spans = [timestamp_s(v.window_end) - timestamp_s(v.window_start) for v in verdicts]
    # Before: the window holding the step spanned an hour (its ticks sorted by wall time).
    assert max(spans) <= WINDOW_S + 1e-6, spans
    assert {v.verdict for v in verdicts} == {"memory-bound"}
    # Labelled with the wall clock as it stood when the window closed: the last one
    # reads the clock as it is now, not where it stood before a step.
    assert wall_s - 2 * WINDOW_S <= timestamp_s(verdicts[-1].window_end) <= wall_s
