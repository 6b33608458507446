"""``agentctl demo``: the whole pipeline on one machine, no GPU — clearly a replay.

A collector runs in this process; two agents run as real ``agentctl agent``
subprocesses, each replaying a playlist of the real H100 recordings shipped in
``rooftop/agent/data`` (idle, GEMV, GEMM, host stall, HF generate...) so the fleet's verdicts
change as the workloads do. The collector's Prometheus endpoint is served as usual,
and the terminal shows the fleet view (the same one ``agentctl status`` prints).

Each demo node reports its agent id as its host name and its replayed GPU gets a
UUID of its own (the recordings' are anonymised to zeros), so ``/metrics`` shows two
GPUs as the screen does. Ctrl-C, SIGTERM or ``--seconds`` stop the agents and remove
the temporary directory alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rooftop.agent.trace import BUNDLED_RECORDINGS, TraceWriter, read_trace
from rooftop.common.model import Record
from rooftop.common.systemd import StopSignals

__all__ = ["DEMO_NODES", "DemoNode", "build_playlist", "run_demo"]


@dataclass(frozen=True, slots=True)
class DemoNode:
    """A simulated GPU host: its agent id and the recordings it replays, in order."""

    agent_id: str
    recordings: tuple[str, ...]


DEMO_NODES = (
    DemoNode("demo-h100-a", ("idle", "gemv_b1", "gemm_8192", "hf_8b_b1", "host_stall")),
    DemoNode("demo-h100-b", ("gemm_8192", "hf_1b_b1", "gemv_b16", "idle2", "hf_8b_b64")),
)
# Each recording plays this long at least, so a verdict holds long enough to read it.
_MIN_SEGMENT_S = 8.0


def build_playlist(names: Sequence[str], directory: Path = BUNDLED_RECORDINGS) -> list[Record]:
    """The recordings back to back on one timeline, each looped to ``_MIN_SEGMENT_S``."""
    out: list[Record] = []
    t_next = 0.0
    for name in names:
        records = sorted(read_trace(directory / f"{name}.jsonl").records, key=lambda r: r.time_s)
        t0, t1 = records[0].time_s, records[-1].time_s
        span_s = max(t1 - t0, 0.1) + 0.1
        loops = max(1, int(_MIN_SEGMENT_S // span_s) + 1)
        for i in range(loops):
            base = t_next + i * span_s
            out.extend(replace(r, time_s=base + (r.time_s - t0)) for r in records)
        t_next += loops * span_s
    return out


def _agent_config(node: DemoNode, collector: str, trace: Path, spool: Path) -> str:
    return "\n".join([
        f'agent_id = "{node.agent_id}"',
        # Both agents run on this machine: its host name would merge their series.
        f'hostname = "{node.agent_id}"',
        f'collectors = ["{collector}"]',
        "insecure = true  # loopback only, this machine",
        f'backend = "replay:{trace}"',
        "rate_hz = 5",
        "window_s = 2",
        "hysteresis_windows = 1",
        "host_sensor = false",
        'hook_socket = ""  # the replay brings its own engine samples',
        f'spool_dir = "{spool}"',
        "batch_interval_s = 0.5",
        "backoff_base_s = 0.2",
        "",
    ])


def run_demo(
    *,
    seconds: float | None,
    prometheus_listen: str,
    refresh_s: float = 1.0,
    nodes: Sequence[DemoNode] = DEMO_NODES,
    echo: Callable[[str], None] = print,
    clear_screen: bool = True,
) -> int:
    """Run collector + agents, showing the fleet view until ``seconds`` pass or Ctrl-C.

    SIGTERM stops it as Ctrl-C (SIGINT) does. Returns the number of fleet views shown.
    The agents are stopped with SIGTERM (killed if still running 15 s later) and the
    temporary directory is removed, however the demo stops.
    """
    # Imported here: the collector (OTel SDK, grpc) is not needed by other commands.
    from rooftop.agent.status import format_status  # noqa: PLC0415
    from rooftop.collector.config import CollectorConfig  # noqa: PLC0415
    from rooftop.collector.query import fleet_status  # noqa: PLC0415
    from rooftop.collector.service import Collector  # noqa: PLC0415

    config = CollectorConfig(listen="127.0.0.1:0", insecure=True,
                             prometheus_listen=prometheus_listen).validated()
    procs: list[subprocess.Popen[bytes]] = []
    shown = 0
    # SIGTERM, like Ctrl-C, must end in the cleanup below: its default action would
    # kill this process on the spot and leave the agents and the directory behind.
    with StopSignals() as signals:
        collector = Collector(config)
        collector.start()
        address = f"127.0.0.1:{collector.ingest.port}"
        try:
            with tempfile.TemporaryDirectory(prefix="rooftop-demo-") as tmp:
                try:
                    for node in nodes:
                        trace = Path(tmp) / f"{node.agent_id}.jsonl"
                        with trace.open("w", encoding="utf-8") as f:
                            TraceWriter(f).write(build_playlist(node.recordings))
                        cfg = Path(tmp) / f"{node.agent_id}.toml"
                        cfg.write_text(
                            _agent_config(node, address, trace, Path(tmp) / node.agent_id))
                        procs.append(subprocess.Popen(
                            [sys.executable, "-m", "rooftop", "agent", "--config", str(cfg),
                             "--log-level", "warning"],
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}))
                    port = collector.telemetry.prometheus_port
                    banner = (
                        "Rooftop demo — a REPLAY of real H100 recordings "
                        "(rooftop/agent/data/h100-2026-11-22), not live GPUs.\n"
                        f"collector {address}; Prometheus endpoint "
                        f"{f'http://127.0.0.1:{port}/metrics' if port else 'off'}; "
                        "Ctrl-C stops.\n"
                    )
                    deadline = None if seconds is None else time.monotonic() + seconds
                    while deadline is None or time.monotonic() < deadline:
                        if signals.wait(refresh_s) is not None:
                            break
                        view = format_status(fleet_status(collector.fleet.snapshot()),
                                             collector=address)
                        echo(("\033[2J\033[H" if clear_screen else "") + banner + view)
                        shown += 1
                finally:
                    _stop_agents(procs)
        finally:
            collector.shutdown(timeout_s=5.0)
    return shown


def _stop_agents(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every agent (they flush to the collector, still up), then reap them."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
