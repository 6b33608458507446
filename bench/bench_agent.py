"""Whole-agent benchmark: a real ``agentctl agent`` streaming to a real ``agentctl collector``.

The agent runs the fake backend with 8 GPUs (and the fake host sensor) exactly as
deployed: its own process, default config except the rate, streaming over loopback
gRPC to a collector subprocess. Its CPU time comes from its CPU-time clock, its RSS
and threads from /proc/<pid>.

1. **overhead**: for each configuration the agent starts, warms up (imports, first
   connection, first windows), then runs for ``--seconds``. CPU = the delta of the
   process's CPU-time clock (``clock_getcpuclockid``: every thread, the ended ones too,
   in nanoseconds) over that span, as % of one core, and per thread the delta of
   ``/proc/<pid>/task/*/schedstat`` with the thread's wakeups (voluntary context
   switches) a second, named by ``/proc/<pid>/task/*/comm`` (the agent names its Python
   threads' OS threads, ``rooftop.common.threadnames``; gRPC's C threads name
   themselves). Before the runs, a thread that does nothing but wake 40 times a second
   measures what one wakeup costs this machine. Configurations:

   - ``floor``: 0.01 Hz, idle GPUs, no engines (one tick at start, then nothing to
     sample, receive, batch or send during the span): what the process costs by being
     alive (timers, idle wakeups, keepalives).
   - ``idle1``: 1 Hz, 8 idle GPUs, no engines (what this bench measured before).
   - ``gpus1``: 1 Hz, the busy GPUs below without their engines (DESIGN §8's "8 busy
     GPUs at 1 Hz"): what the engines' summaries cost is the difference to ``busy1``.
   - ``busy1`` / ``busy10``: 1 Hz / 10 Hz on a **busy** serving host (``BUSY_DOC``):
     every GPU is running a workload (``BUSY_WORKLOADS``: DRAM and tensor activity,
     tens of GiB used, one compute process each, whose CPU the host sensor reports)
     and has an engine: a feeder subprocess runs 8 in-process hooks
     (``rooftop.agent.hooks.Aggregator``, one per GPU, ``gpu_indices`` set), each
     finishing ``FEED_REQUESTS_PER_S`` requests of ``FEED_TOKENS`` tokens a second and
     sending its summary once a second to the agent's hook socket, as vLLM would.

   Configurations run interleaved, ``--repeat`` times each; the table gives the
   median and (min–max). The budget (DESIGN §8) is checked against the *total*, not
   total − floor: the budget is for the agent as deployed. ``--before DIR`` runs the
   agent from another source tree too (``git archive HEAD | tar -x -C DIR``), in the
   same interleaving, for a before/after on the same machine and minute.
   ``--also-dgram-qlen N`` runs this code a second time, interleaved, with
   ``net.unix.max_dgram_qlen`` set to N while its agent binds the hook socket (root
   only; the value is put back after): the hook receiver's cost depends on how many
   datagrams the kernel queues (10 + 1 by default and in a new network namespace, 512 +
   1 where systemd's sysctl defaults apply).
   ``--write-docs`` puts the tables between the ``bench_agent`` markers of
   docs/PERFORMANCE.md.
2. **drain**: 8 GPUs at 10 Hz with the collector down for ``--outage-s``; then the
   collector comes back on the same port. Reported: how long the agent took to
   reconnect (its backoff), and how fast it drained the backlog once connected:
   samples in the batches made before the reconnect ÷ the time from the first to the
   last of them applied, and that as a multiple of real time (÷ 90 samples/s, what
   8 GPUs + the host make at 10 Hz; budget ≥ 10×). For exact receive times the
   collector runs through ``tests/e2e/recording_collector.py`` (the real CLI plus a
   line per applied batch).

Usage: .venv/bin/python bench/bench_agent.py [--seconds 60] [--repeat 3]
    [--configs floor,idle1,gpus1,busy1,busy10] [--before DIR] [--also-dgram-qlen 512]
    [--write-docs] [--outage-s 120]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from perfdoc import DOC, write_block  # bench/perfdoc.py, beside this script
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None)  # clock_getcpuclockid: another process's CPU-time clock
GPUS = 8
# Per network namespace, read when a unix datagram socket is created: the hook
# socket's kernel queue (rooftop.agent.engines.receiver.kernel_queue_datagrams).
MAX_DGRAM_QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")
# A serving host: GPUs decoding and prefilling, one GEMM-bound, one batch-1 GEMV
# (fake.WORKLOADS: DESIGN §2's measured rows). The config's backend key takes no schedules.
BUSY_WORKLOADS = "decode,decode,decode,prefill,decode,prefill,gemm,gemv"
FEED_REQUESTS_PER_S = 4  # per engine
FEED_TOKENS = 32  # per request
BUSY_DOC = (
    f"every GPU busy (fake `h100:{BUSY_WORKLOADS}`: util.gpu 95-98 %, DRAM 25-85 %, "
    "1-72 GiB used, one compute process per GPU at 60-100 % of a core, reported by the "
    f"host sensor) and one engine hook per GPU ({FEED_REQUESTS_PER_S} requests/s of "
    f"{FEED_TOKENS} tokens, a summary a second to the agent's hook socket)"
)
CONFIGS = {  # name: (rate_hz, busy GPUs, engines)
    "floor": (0.01, False, False),
    "idle1": (1.0, False, False),
    "gpus1": (1.0, True, False),
    "busy1": (1.0, True, True),
    "busy10": (10.0, True, True),
}
LABELS = {
    "floor": "floor (0.01 Hz, idle GPUs, no engines)",
    "idle1": "1 Hz, idle GPUs, no engines",
    "gpus1": "1 Hz, busy GPUs, no engines",
    "busy1": "**1 Hz, busy GPUs + engines**",
    "busy10": "10 Hz, busy GPUs + engines",
}
BUDGETS = {"idle1": 0.5, "gpus1": 0.5, "busy1": 0.5, "busy10": 3.0}
THREADS_DOC = (
    "Threads: `sampler` (ticks: the NVML reads, the XID events queued since the last "
    "look, the engines' summaries off the hook socket; encodes, classifies, batches), "
    "`hook-receiver` (the hook socket's backstop: where the socket has gone unread for "
    "half of what the kernel queues, it takes the datagrams off it for the next tick to "
    "decode), `stream` (the asyncio loop sending batches), `spool` (the disk writer), "
    "`pods` (kubelet attribution, idle off Kubernetes), `python` (the main thread, "
    "waiting for SIGTERM; it keeps the process's name), `asyncio` (the stream loop's "
    "executor, DNS); `event_engine`, `grpc_global_tim`, `lifeguard` and `Thread-1 (_poll` "
    "(the grpc.aio poller) are gRPC's (`agentctl agent` runs it with "
    "`GRPC_EXPERIMENTS=-event_engine_client` unless that is set). CPU: the process's "
    "CPU-time clock (`clock_getcpuclockid`, every thread, to the nanosecond) and per "
    "thread `/proc/<pid>/task/*/schedstat`; a thread's wakeups are its voluntary context "
    "switches."
)
# The engines' feeder: 8 hooks as an engine runs them (stdlib only, like the hooks).
FEEDER = """
import os, sys, time
from rooftop.agent.hooks import Aggregator
parent = os.getppid()
sock, gpus, rps, tokens = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
aggs = [Aggregator(engine_id=f"bench-engine-{i}", model="llama-3-8b", gpu_indices=(i,),
                   socket_path=sock) for i in range(gpus)]
t = time.monotonic()
while os.getppid() == parent:  # the bench gone (killed): so is this
    for agg in aggs:
        req = agg.start_request()
        for _ in range(tokens):
            req.token()
        req.end()
    t += 1.0 / rps
    time.sleep(max(0.0, t - time.monotonic()))
"""


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far, the ended ones included.

    From the process's CPU-time clock (``clock_getcpuclockid``: the scheduler's own
    count, to the nanosecond); where that is refused, utime + stime of ``/proc/<pid>/stat``
    (10 ms ticks).
    """
    clock_id = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock_id)) == 0:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock_id.value)
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _stat_cpu_s(stat: Path) -> float:
    """utime + stime of a ``/proc/.../stat`` file, in seconds (10 ms ticks)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_cpu_s(pid: int) -> dict[int, tuple[str, float, int]]:
    """Per thread (tid): its OS name (comm), CPU seconds and wakeups so far.

    CPU from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; ``stat``'s 10 ms ticks
    where the kernel keeps no schedstat); wakeups are the thread's voluntary context
    switches (each a sleep the thread was woken from).
    """
    out: dict[int, tuple[str, float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
            try:
                cpu_s = int((task / "schedstat").read_text().split()[0]) / 1e9
            except FileNotFoundError:
                cpu_s = _stat_cpu_s(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        switches = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        out[int(task.name)] = (comm, cpu_s, int(switches.group(1)) if switches else 0)
    return out


# A thread that only wakes: what one wakeup costs this machine's CPU (VMs pay dearly).
WAKER = """
import sys, threading, time
hz, seconds = float(sys.argv[1]), float(sys.argv[2])
stop = threading.Event()
woken = [0]
def wake():
    while not stop.wait(1 / hz):
        woken[0] += 1
thread = threading.Thread(target=wake)
thread.start()
time.sleep(0.5)
cpu0, n0 = time.process_time(), woken[0]
time.sleep(seconds)
cpu1, n1 = time.process_time(), woken[0]
stop.set()
thread.join()
print((cpu1 - cpu0) / max(1, n1 - n0) * 1e6)
"""


def wakeup_cost_us(seconds: float = 5.0, rate_hz: float = 40.0) -> float:
    """CPU (µs) per wakeup of a thread woken ``rate_hz`` times a second, doing nothing else."""
    out = subprocess.run([sys.executable, "-c", WAKER, str(rate_hz), str(seconds)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.strip())


def proc_rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def thread_group(comm: str) -> str:
    """Threads of one kind together: gRPC's pools number their threads."""
    return re.sub(r"[-_ ]?\d+$", "", comm) or comm


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


def start_agent(
    workdir: Path,
    collector_port: int,
    rate_hz: float,
    *,
    busy: bool,
    extra: dict[str, object],
    tree: Path = REPO,
) -> subprocess.Popen[bytes]:
    config: dict[str, object] = {
        "agent_id": f"bench-{rate_hz:g}hz",
        "collectors": [f"127.0.0.1:{collector_port}"],
        "insecure": True,
        "backend": f"fake:h100:{BUSY_WORKLOADS}" if busy else "fake:h100",
        "fake_gpus": GPUS,
        "rate_hz": rate_hz,
        "window_s": max(5.0, 1.0 / rate_hz),
        "spool_dir": str(workdir / "spool"),
        "hook_socket": str(workdir / "hooks.sock"),
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
    # cwd = the source tree: `-m rooftop` imports the tree's own package (--before).
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "agent", "--config", str(path)],
        cwd=tree, env=env(), stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    return proc


def start_feeder(socket_path: Path) -> subprocess.Popen[bytes]:
    """The engines: 8 hooks sending summaries to the agent's socket (a process apart)."""
    return subprocess.Popen(
        [sys.executable, "-c", FEEDER, str(socket_path), str(GPUS), str(FEED_REQUESTS_PER_S),
         str(FEED_TOKENS)],
        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def overhead(config: str, seconds: float, warmup_s: float, workdir: Path, collector: Collector,
             extra: dict[str, object], tree: Path = REPO,
             dgram_qlen: int | None = None) -> dict[str, object]:  # fmt: skip
    """One run of one configuration: whole-process and per-thread CPU over ``seconds``.

    ``dgram_qlen``: ``net.unix.max_dgram_qlen`` for the agent's hook socket (set before
    the agent binds it; the caller restores it); None: as the machine has it.
    """
    rate_hz, busy, engines = CONFIGS[config]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if dgram_qlen is not None:
        MAX_DGRAM_QLEN.write_text(f"{dgram_qlen}\n")
    proc = start_agent(workdir, collector.port, rate_hz, busy=busy, extra=extra, tree=tree)
    feeder = start_feeder(workdir / "hooks.sock") if engines else None
    try:
        time.sleep(warmup_s)
        if proc.poll() is not None:
            raise SystemExit((workdir / "agent.log").read_text())
        th0, cpu0, t0 = threads_cpu_s(proc.pid), proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        th1, cpu1, t1 = threads_cpu_s(proc.pid), proc_cpu_s(proc.pid), time.monotonic()
        rss, hwm = proc_rss_mib(proc.pid)
    finally:
        if feeder is not None:
            feeder.kill()
            feeder.wait()
        stop_agent(proc)
    wall_s = t1 - t0
    per_thread: dict[str, float] = {}
    wakeups: dict[str, float] = {}
    counts: dict[str, int] = {}
    for tid, (comm, cpu, woken) in th1.items():
        group = thread_group(comm)
        # A thread born during the span counts from zero; one that ended is lost (rare).
        _, cpu_before, woken_before = th0.get(tid, ("", 0.0, 0))
        per_thread[group] = per_thread.get(group, 0.0) + 100 * (cpu - cpu_before) / wall_s
        wakeups[group] = wakeups.get(group, 0.0) + (woken - woken_before) / wall_s
        counts[group] = counts.get(group, 0) + 1
    return {"pct": 100 * (cpu1 - cpu0) / wall_s, "rss_mib": rss, "hwm_mib": hwm,
            "threads": per_thread, "wakeups": wakeups, "counts": counts}  # fmt: skip


def spread(values: Sequence[float]) -> str:
    """Median (min–max) of repeated runs; the median alone for one run."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f} %"
    return f"{med:.2f} % ({min(values):.2f}–{max(values):.2f})"


def overhead_tables(
    results: dict[str, dict[str, list[dict[str, object]]]],
    seconds: float,
    warmup_s: float,
    repeat: int,
    dgram_qlen: int | None = None,
    wakeup_us: float | None = None,
) -> list[str]:
    """Markdown: whole process per configuration (before/after), then per thread."""
    trees = list(results)
    configs = list(results[trees[0]])
    out = [
        f"**Results, fake backend ({datetime.date.today().isoformat()}, {os.cpu_count()}-core "
        f"{platform.machine()} machine, Python {sys.version.split()[0]}; {GPUS} GPUs; "
        f"{seconds:g} s per run after {warmup_s:g} s of warm-up, {repeat} run(s) of each, "
        f"interleaved; % of one core, median (min–max)):**",
        "",
        "| configuration | " + " | ".join(trees) + " | budget | RSS MiB (peak) |",
        "|---|" + "---:|" * len(trees) + "---|---|",
    ]
    for config in configs:
        cells = [spread([float(r["pct"]) for r in results[t][config]]) for t in trees]  # type: ignore[arg-type]
        last = results[trees[-1]][config][-1]
        budget = BUDGETS.get(config)
        out.append(
            f"| {LABELS[config]} | " + " | ".join(cells)
            + f" | {f'≤ {budget:g} %' if budget else '—'} | "
            + f"{float(last['rss_mib']):.1f} ({float(last['hwm_mib']):.1f}) |"  # type: ignore[arg-type]
        )  # fmt: skip
    out += ["", f"Busy = {BUSY_DOC}."]
    if dgram_qlen is not None:
        out[-1] += (
            f" This machine's `net.unix.max_dgram_qlen` is {dgram_qlen}: the hook socket "
            f"queues {dgram_qlen + 1} datagrams (systemd hosts: 512, 513)."
        )
    out.append("")
    # Per thread: the last tree (this code), every configuration, medians.
    tree = trees[-1]
    groups: dict[str, int] = {}
    for config in configs:
        for run in results[tree][config]:
            for g, n in run["counts"].items():  # type: ignore[attr-defined]
                groups[g] = max(groups.get(g, 0), n)
    def median_of(key: str, config: str, group: str) -> float:
        # Saved results from before the wakeup count have none: 0.
        return statistics.median(
            float(run.get(key, {}).get(group, 0.0))  # type: ignore[attr-defined]
            for run in results[tree][config]
        )

    cpu = {c: {g: median_of("threads", c, g) for g in groups} for c in configs}
    woken = {c: {g: median_of("wakeups", c, g) for g in groups} for c in configs}
    whole = {c: [float(r["pct"]) for r in results[tree][c]] for c in configs}  # type: ignore[arg-type]
    order = sorted(groups, key=lambda g: -max(cpu[c][g] for c in configs))
    out += [
        f"Per thread ({tree}; % of a core · wakeups a second; median of the runs):",
        "",
        "| thread (count) | " + " | ".join(LABELS[c].strip("*") for c in configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    for g in order:
        out.append(
            f"| `{g}` ({groups[g]}) | "
            + " | ".join(f"{cpu[c][g]:.3f} % · {woken[c][g]:.1f}" for c in configs)
            + " |"
        )
    out.append(
        "| whole process | "
        + " | ".join(
            f"{statistics.median(whole[c]):.3f} % · {sum(woken[c].values()):.1f}" for c in configs
        )
        + " |"
    )
    out += ["", THREADS_DOC]
    if wakeup_us is not None:
        out[-1] += (
            f" On this machine a thread that only wakes, 40 times a second, costs "
            f"{wakeup_us:.0f} µs of CPU per wakeup (measured in this run), so at 1 Hz the "
            "wakeups weigh about as much as the work."
        )
    return out


def write_docs(block: str) -> None:
    """Put ``block`` between this script's markers in docs/PERFORMANCE.md."""
    write_block("bench_agent", block)


def drain(outage_s: float, workdir: Path, extra: dict[str, object]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "applied.jsonl"
    collector = Collector(free_port(), record=record)
    # No collector: all of it spools. Idle GPUs, as this measurement always had.
    proc = start_agent(workdir, collector.port, 10.0, busy=False, extra=extra)
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
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--configs", default="floor,idle1,gpus1,busy1,busy10",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")  # fmt: skip
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="also run the agent from this source tree (git archive HEAD)",
    )
    parser.add_argument(
        "--also-dgram-qlen",
        type=int,
        metavar="N",
        help="also run this code with net.unix.max_dgram_qlen = N (root; restored after): "
        "512 is systemd's default, 10 the kernel's and a new network namespace's",
    )
    parser.add_argument("--outage-s", type=float, default=120.0)
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--save", type=Path, metavar="JSON",
                        help="also write the raw overhead results here")  # fmt: skip
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: print (--write-docs: write) a --save")  # fmt: skip
    parser.add_argument("--write-docs", action="store_true",
                        help="put the overhead tables into docs/PERFORMANCE.md")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra agent config, e.g. --set batch_interval_s=1.0")  # fmt: skip
    args = parser.parse_args()
    extra: dict[str, object] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = float(value) if re.fullmatch(r"[0-9.]+", value) else value
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := [c for c in configs if c not in CONFIGS]:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if args.before is not None and not (args.before / "rooftop" / "__init__.py").is_file():
        raise SystemExit(f"--before {args.before}: no rooftop package there")
    trees = {"before": args.before.resolve()} if args.before is not None else {}
    trees["after" if trees else "this code"] = REPO
    qlen_now = int(MAX_DGRAM_QLEN.read_text())
    # Variant name -> (source tree, max_dgram_qlen to set or None).
    variants: dict[str, tuple[Path, int | None]] = {
        (f"{name}, qlen {qlen_now}" if args.also_dgram_qlen else name): (tree, None)
        for name, tree in trees.items()
    }
    if args.also_dgram_qlen:
        if not os.access(MAX_DGRAM_QLEN, os.W_OK):
            raise SystemExit(f"--also-dgram-qlen: {MAX_DGRAM_QLEN} is not writable (root?)")
        variants[f"{'after' if args.before else 'this code'}, qlen {args.also_dgram_qlen}"] = (
            REPO, args.also_dgram_qlen)  # fmt: skip

    if args.render is not None:
        saved = json.loads(args.render.read_text())
        block = "\n".join(overhead_tables(saved["results"], saved["seconds"],
                                          saved["warmup_s"], saved["repeat"],
                                          saved.get("dgram_qlen"),
                                          saved.get("wakeup_us")))  # fmt: skip
        print(block)
        if args.write_docs:
            write_docs(block)
        return
    # SIGTERM unwinds like Ctrl-C, so the finally clauses stop the agent and collector.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    try:
        if not args.skip_overhead:
            results: dict[str, dict[str, list[dict[str, object]]]] = {
                v: {c: [] for c in configs} for v in variants
            }
            wakeup_us = wakeup_cost_us()
            print(f"  one idle wakeup: {wakeup_us:.0f} µs of CPU", flush=True)
            collector = Collector(free_port())
            collector.start()
            try:
                # Interleaved: a noisy minute on a shared machine hits every column alike.
                for n in range(args.repeat):
                    for config in configs:
                        for name, (tree, qlen) in variants.items():
                            run = overhead(config, args.seconds, args.warmup_s,
                                           workdir / config, collector, extra, tree,
                                           # Set back between variants, only where changed.
                                           qlen_now if args.also_dgram_qlen and qlen is None
                                           else qlen)  # fmt: skip
                            results[name][config].append(run)
                            print(f"  run {n + 1}/{args.repeat} {config:7} {name:9} "
                                  f"{float(run['pct']):.2f} %", flush=True)  # type: ignore[arg-type]  # fmt: skip
            finally:
                collector.stop()
                if args.also_dgram_qlen:
                    MAX_DGRAM_QLEN.write_text(f"{qlen_now}\n")
            if args.save is not None:
                args.save.write_text(json.dumps({
                    "results": results, "seconds": args.seconds,
                    "warmup_s": args.warmup_s, "repeat": args.repeat, "dgram_qlen": qlen_now,
                    "wakeup_us": wakeup_us,
                }))  # fmt: skip
            block = "\n".join(overhead_tables(results, args.seconds, args.warmup_s,
                                              args.repeat, qlen_now, wakeup_us))  # fmt: skip
            print(f"\n[overhead] agent, {GPUS} fake GPUs, streaming to a collector\n")
            print(block)
            if args.write_docs:
                write_docs(block)
                print(f"\nwritten to {DOC.relative_to(REPO)}")
        if not args.skip_drain:
            drain(args.outage_s, workdir / "drain", extra)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
