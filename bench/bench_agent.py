"""Whole-agent benchmark: a real ``agentctl agent`` streaming to a real ``agentctl collector``.

The agent runs the fake backend with 8 GPUs (and the fake host sensor) exactly as
deployed: its own process, default config except the rate, streaming over loopback
gRPC to a collector subprocess. Its CPU time and RSS come from /proc/<pid>.

1. **overhead**: for each rate (default 1 Hz and 10 Hz) the agent starts, warms up
   (imports, first connection, first windows), then runs for ``--seconds``. CPU =
   utime + stime delta of the whole process (every thread: sampler, spool writer,
   grpc) over that span, as % of one core. The **floor** is the same daemon at
   0.01 Hz (one tick at start, then nothing to sample, batch or send during the
   span): what the process costs just by being alive (timers, idle wakeups,
   keepalives). The budget (DESIGN §8) is checked against the *total*, not total −
   floor: the budget is for the agent as deployed.
2. **drain**: 8 GPUs at 10 Hz with the collector down for ``--outage-s``; then the
   collector comes back on the same port. Reported: how long the agent took to
   reconnect (its backoff), and how fast it drained the backlog once connected:
   samples in the batches made before the reconnect ÷ the time from the first to the
   last of them applied, and that as a multiple of real time (÷ 90 samples/s, what
   8 GPUs + the host make at 10 Hz; budget ≥ 10×). For exact receive times the
   collector runs through ``tests/e2e/recording_collector.py`` (the real CLI plus a
   line per applied batch).

Usage: .venv/bin/python bench/bench_agent.py [--seconds 60] [--rates 1,10] [--outage-s 120]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
GPUS = 8


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def proc_rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    out["GRPC_VERBOSITY"] = "ERROR"
    return out


class Collector:
    """``agentctl collector`` on a fixed port (so it can come back on it)."""

    def __init__(self, port: int, record: Path | None = None) -> None:
        self.port = port
        self.record = record
        self.metrics_port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        # With a record file: the same CLI through tests/e2e/recording_collector.py, which
        # appends (seq, samples, sample times, receive time) of every applied batch.
        launcher = ["-m", "rooftop"]
        if self.record is not None:
            launcher = ["-m", "tests.e2e.recording_collector", str(self.record)]
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "collector", "--listen", f"127.0.0.1:{self.port}",
             "--prometheus", "127.0.0.1:0", "--insecure"],
            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        for _ in range(2):
            line = self.proc.stdout.readline()
            if m := re.search(r"prometheus on http://127\.0\.0\.1:(\d+)/", line):
                self.metrics_port = int(m.group(1))
        if not self.metrics_port:
            self.stop()
            raise SystemExit("collector did not start")

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def start_agent(workdir: Path, collector_port: int, rate_hz: float, **extra: object
                ) -> subprocess.Popen[bytes]:  # fmt: skip
    config = {
        "agent_id": f"bench-{rate_hz:g}hz",
        "collectors": [f"127.0.0.1:{collector_port}"],
        "insecure": True,
        "backend": "fake:h100",
        "fake_gpus": GPUS,
        "rate_hz": rate_hz,
        "window_s": max(5.0, 1.0 / rate_hz),
        "spool_dir": str(workdir / "spool"),
        **extra,
    }
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value}")
    path = workdir / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    log = (workdir / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "agent", "--config", str(path)],
        cwd=REPO, env=env(), stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    return proc


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def overhead(rate_hz: float, seconds: float, warmup_s: float, workdir: Path,
             collector: Collector, extra: dict[str, object]) -> dict[str, float]:  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    proc = start_agent(workdir, collector.port, rate_hz, **extra)
    try:
        time.sleep(warmup_s)
        if proc.poll() is not None:
            raise SystemExit((workdir / "agent.log").read_text())
        cpu0, t0 = proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = proc_cpu_s(proc.pid), time.monotonic()
        rss, hwm = proc_rss_mib(proc.pid)
    finally:
        stop_agent(proc)
    return {"cpu_s": cpu1 - cpu0, "wall_s": t1 - t0, "pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "rss_mib": rss, "hwm_mib": hwm}  # fmt: skip


def drain(outage_s: float, workdir: Path, extra: dict[str, object]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "applied.jsonl"
    collector = Collector(free_port(), record=record)
    proc = start_agent(workdir, collector.port, 10.0, **extra)  # no collector: all of it spools
    try:
        time.sleep(outage_s)
        agent_cpu0 = proc_cpu_s(proc.pid)
        t_up = time.time()
        collector.start()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            lines = record.read_text().split("\n")[:-1]
            applied = [json.loads(x) for x in lines if x]
            # Done once a batch made after the reconnect has landed.
            if applied and any(a["oldest_sample_s"] > applied[0]["received_s"] for a in applied):
                break
            time.sleep(0.2)
        else:
            raise SystemExit("the backlog did not drain in 150 s")
        agent_cpu = proc_cpu_s(proc.pid) - agent_cpu0
    finally:
        stop_agent(proc)
        collector.stop()
    connected_s = applied[0]["received_s"]
    backlog = [a for a in applied if a["oldest_sample_s"] < connected_s]
    samples = sum(a["samples"] for a in backlog)
    drain_s = max(a["received_s"] for a in backlog) - connected_s
    live_per_s = GPUS * 10.0 + 10.0  # 8 GPU samples + 1 host sample per tick at 10 Hz
    rate = samples / max(drain_s, 1e-3)
    print(f"\n[drain] 8 GPUs at 10 Hz, collector down {outage_s:g} s, then up on the same port")
    print(f"  reconnect after up   {connected_s - t_up:.2f} s (the agent's backoff at that moment)")
    print(f"  backlog              {len(backlog)} batches, {samples:,} samples "
          f"({samples / live_per_s:.0f} s of data at {live_per_s:.0f} samples/s)")  # fmt: skip
    print(f"  drain time           {drain_s * 1000:.0f} ms (first to last backlog batch applied)")
    print(f"  drain rate           {rate:,.0f} samples/s = {rate / live_per_s:,.0f}x real time "
          f"(budget >= 10x)")  # fmt: skip
    print(f"  agent CPU meanwhile  {agent_cpu:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--rates", default="1,10")
    parser.add_argument("--outage-s", type=float, default=120.0)
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra agent config, e.g. --set batch_interval_s=1.0")  # fmt: skip
    args = parser.parse_args()
    extra: dict[str, object] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = float(value) if re.fullmatch(r"[0-9.]+", value) else value

    workdir = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    try:
        if not args.skip_overhead:
            collector = Collector(free_port())
            collector.start()
            try:
                floor = overhead(0.01, args.seconds, args.warmup_s, workdir / "floor", collector,
                                 extra)  # fmt: skip
                rows = [(r, overhead(float(r), args.seconds, args.warmup_s, workdir / f"r{r}",
                                     collector, extra))
                        for r in args.rates.split(",")]  # fmt: skip
            finally:
                collector.stop()
            print(f"\n[overhead] agent, {GPUS} fake GPUs, streaming to a collector; "
                  f"{args.seconds:g} s after {args.warmup_s:g} s warm-up")  # fmt: skip
            print("  rate     CPU s   % core  budget  floor   total-floor  RSS MiB (peak)")
            budgets = {"1": 0.5, "10": 3.0}
            f = floor["pct"]
            print(f"  floor    {floor['cpu_s']:5.2f}  {f:6.2f}  -       -       -            "
                  f"{floor['rss_mib']:.1f} ({floor['hwm_mib']:.1f})")  # fmt: skip
            for r, m in rows:
                budget = budgets.get(r)
                limit = f"≤ {budget:.1f}" if budget else "-"
                rss = f"{m['rss_mib']:.1f} ({m['hwm_mib']:.1f})"
                print(f"  {r:>3} Hz  {m['cpu_s']:5.2f}  {m['pct']:6.2f}  {limit:6}  {f:5.2f}   "
                      f"{m['pct'] - f:6.2f}       {rss}")  # fmt: skip
        if not args.skip_drain:
            drain(args.outage_s, workdir / "drain", extra)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
