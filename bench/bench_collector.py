"""Collector ingest benchmark: simulated agents (real gRPC clients) against a real collector.

The collector runs as ``agentctl collector`` in a subprocess; its CPU time and RSS
come from /proc/<pid>. Two phases:

1. **throughput**: a few agents stream 500-sample batches as fast as their window
   (64 unacked batches, as the real agent) allows. Reports samples/s, collector CPU
   µs per sample and samples/s per collector core. Batches are pre-encoded (the
   seq is appended to the wire bytes) so the clients spend little CPU on the
   shared machine.
2. **lag**: many agents at a realistic rate (8 GPUs at 10 Hz each, a batch per
   second). Reports p50/p99 of sample → ack time at the agent: an upper bound on
   sample → collector lag (it adds the ack's way back and the ack delay), which is
   what the agent's spool experiences.

Both phases run once per batch format in the same run, each against a fresh
collector: ``records`` (one TraceRecord per sample, what agents send by default) and
``columns`` (``Batch.gpu_columns``, ``rooftop.common.columns``); the CPU ratio
columns / records is printed. ``--format`` runs one of them only.

With ``--tls`` both phases run twice in the same run: once in plaintext, once with
mTLS through the collector's TLS gate (a throwaway PKI made with the openssl CLI),
and the CPU ratio mTLS / plaintext is printed.

``--write-docs`` puts the both-formats table between the ``bench_collector`` markers of
docs/PERFORMANCE.md (with ``--tls``, the mTLS ratio under it).

Usage: .venv/bin/python bench/bench_collector.py [--throughput-agents 4] [--lag-agents 50]
       [--format records|columns|both] [--tls] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from rooftop.collector.snappy import varint
from rooftop.common.codec import record_to_proto, timestamp
from rooftop.common.columns import encode_samples
from rooftop.common.model import GpuSample
from rooftop.v1 import telemetry_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.security.pki, for --tls

from perfdoc import write_block  # bench/perfdoc.py, beside this script  # noqa: E402

WINDOW = 64  # the agent's default max_in_flight
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _sample(index: int, time_s: float) -> GpuSample:
    # Measurements move from tick to tick (columns of one repeated value are smaller on
    # the wire); the GPU's identity, memory size and PCIe link do not.
    k = (round(time_s * 100) + index) % 37
    return GpuSample(
        time_s=time_s, gpu_index=index, gpu_uuid=f"GPU-{index:04d}", gpu_name="H100 80GB HBM3",
        busy_pct=95.5 - k / 10, mem_ctrl_pct=97.1 - k / 8, sm_active_pct=81.3 + k / 9,
        sm_occupancy_pct=11.7 + k / 20, tensor_active_pct=2.2 + k / 30,
        fp16_active_pct=1.0 + k / 40, fp32_active_pct=0.5 + k / 50, fp64_active_pct=k / 100,
        dram_bw_pct=84.8 - k / 7,
        pcie_rx_bytes_per_s=1.5e9 + k * 1e6, pcie_tx_bytes_per_s=0.5e9 + k * 1e6,
        pcie_link_gen=5, pcie_link_width=16, power_w=650.0 + k, sm_clock_mhz=1980.0 - k * 15,
        mem_used_bytes=70 * 2**30 + k * 2**20, mem_total_bytes=80 * 2**30,
        temperature_c=61.0 + k / 4,
    )  # fmt: skip


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _proc_rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


class _Stream:
    """One agent's stream: a window of unacked batches, acks read on a thread."""

    def __init__(self, channel: grpc.Channel, *, raw: bool) -> None:
        self.requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.window = threading.Semaphore(WINDOW)
        self.acked = 0
        self.sent_at: dict[int, list[float]] = {}
        self.lags: list[float] = []
        self.lock = threading.Lock()
        serializer = (lambda b: b) if raw else pb.Batch.SerializeToString
        call = channel.stream_stream(
            "/rooftop.v1.Ingest/Stream",
            request_serializer=serializer,
            response_deserializer=pb.Ack.FromString,
        )
        self.call = call(self._iter())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _iter(self):  # noqa: ANN202
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for ack in self.call:
                now = time.time()
                with self.lock:
                    while self.acked < ack.acked_seq:
                        self.acked += 1
                        for t in self.sent_at.pop(self.acked, ()):
                            self.lags.append(now - t)
                        self.window.release()
        except grpc.RpcError:
            pass

    def send(self, seq: int, item: object, sample_times: list[float] | None = None) -> None:
        self.window.acquire()
        if sample_times is not None:
            with self.lock:
                self.sent_at[seq] = sample_times
        self.requests.put(item)

    def close(self) -> None:
        self.requests.put(None)
        self.reader.join(timeout=10)


@dataclass(frozen=True)
class Tls:
    """mTLS material: the CA, the collector's and an agent's certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    agent_cert: Path
    agent_key: Path

    @classmethod
    def make(cls, root: Path, agent_ids: list[str]) -> Tls:
        """A PKI in ``root``; one client certificate naming every agent id (SANs)."""
        from tests.security.pki import Pki

        pki = Pki(root)
        ca = pki.ca("ca")
        server = pki.issue("server", ca="ca", cn="localhost", sans=("IP:127.0.0.1",),
                           usage="serverAuth")  # fmt: skip
        agent = pki.issue("agent", ca="ca", cn="bench",
                          sans=tuple(f"DNS:{a}" for a in agent_ids))  # fmt: skip
        return cls(ca, server.cert, server.key, agent.cert, agent.key)

    def channel(self, target: str, options: list[tuple[str, object]]) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.agent_key.read_bytes(),
            certificate_chain=self.agent_cert.read_bytes(),
        )
        return grpc.secure_channel(target, creds, options=options)


def _channel(target: str, tls: Tls | None, **options: object) -> grpc.Channel:
    opts = [(f"grpc.{k}", v) for k, v in options.items()]
    return tls.channel(target, opts) if tls else grpc.insecure_channel(target, options=opts)


def _fill(batch: pb.Batch, samples: list[GpuSample], fmt: str) -> None:
    if fmt == "columns":
        batch.gpu_columns.CopyFrom(encode_samples(samples))
    else:
        batch.records.extend(record_to_proto(s) for s in samples)


def throughput_agent(
    target: str,
    agent: int,
    duration_s: float,
    out: mp.Queue,
    tls: Tls | None = None,
    fmt: str = "records",
) -> None:
    template = pb.Batch(agent_id=f"bench-{agent}", boot_id="boot", hostname=f"node-{agent}")
    now = time.time()
    _fill(template, [_sample(i % 8, now + i * 0.01) for i in range(500)], fmt)
    body = template.SerializeToString()
    channel = _channel(target, tls, max_send_message_length=4 << 20)
    stream = _Stream(channel, raw=True)
    deadline = time.monotonic() + duration_s
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        stream.send(seq, body + b"\x18" + varint(seq))  # field 3 (seq), varint
    while stream.acked < seq and stream.reader.is_alive():
        time.sleep(0.01)
    stream.close()
    channel.close()
    out.put(("throughput", agent, seq * 500))


def lag_agents(
    target: str,
    first: int,
    count: int,
    duration_s: float,
    hz: float,
    out: mp.Queue,
    tls: Tls | None = None,
    fmt: str = "records",
) -> None:
    channel = _channel(target, tls)
    streams = [_Stream(channel, raw=False) for _ in range(count)]
    period_s = 1.0 / hz
    seqs = [0] * count
    pending: list[list[GpuSample]] = [[] for _ in range(count)]
    start = time.monotonic()
    next_tick = start
    last_flush = start
    while time.monotonic() - start < duration_s:
        now = time.time()
        for a in range(count):
            pending[a].extend(_sample(g, now) for g in range(8))
        if time.monotonic() - last_flush >= 1.0:  # the agent's ≤ 1 s batching
            last_flush = time.monotonic()
            for a, stream in enumerate(streams):
                seqs[a] += 1
                b = pb.Batch(agent_id=f"lag-{first + a}", boot_id="boot", seq=seqs[a],
                             hostname=f"node-{first + a}")  # fmt: skip
                _fill(b, pending[a], fmt)
                b.sent_time.CopyFrom(timestamp(time.time()))
                stream.send(seqs[a], b, [s.time_s for s in pending[a]])
                pending[a] = []
        next_tick += period_s
        time.sleep(max(0.0, next_tick - time.monotonic()))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        s.acked < q for s, q in zip(streams, seqs, strict=True)
    ):
        time.sleep(0.01)
    lags: list[float] = []
    for s in streams:
        s.close()
        lags += s.lags
    channel.close()
    out.put(("lag", first, lags))


def start_collector(tls: Tls | None) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "rooftop", "collector", "--listen", "127.0.0.1:0",
               "--prometheus", "127.0.0.1:0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    if tls is None:
        command.append("--insecure")
    else:
        env.update(
            ROOFTOP_COLLECTOR_TLS_CERT_FILE=str(tls.server_cert),
            ROOFTOP_COLLECTOR_TLS_KEY_FILE=str(tls.server_key),
            ROOFTOP_COLLECTOR_TLS_CLIENT_CA_FILE=str(tls.ca),
        )
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    port = re.search(r"ingest on 127\.0\.0\.1:(\d+)", line)
    if port is None:
        proc.kill()
        raise SystemExit(f"collector did not start: {line!r}")
    proc.stdout.readline()  # the prometheus line
    return proc, f"127.0.0.1:{port.group(1)}"


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Result:
    samples_per_s: float
    cpu_us_per_sample: float
    lag_p99_ms: float
    lag_cores: float
    rss_mib: float = 0.0
    peak_rss_mib: float = 0.0


def run(args: argparse.Namespace, tls: Tls | None, fmt: str = "records") -> Result:
    """Both phases against one fresh collector; prints as it goes."""
    mode = ("mTLS through the TLS gate" if tls else "plaintext") + f", {fmt}"
    proc, target = start_collector(tls)
    ctx = mp.get_context("spawn")
    try:
        time.sleep(0.5)
        idle_rss, _ = _proc_rss_mib(proc.pid)
        print(f"\n=== {mode}: collector pid {proc.pid} on {target}; idle RSS {idle_rss:.0f} MiB")

        out: mp.Queue = ctx.Queue()
        cpu0, t0 = _proc_cpu_s(proc.pid), time.monotonic()
        workers = [
            ctx.Process(target=throughput_agent, args=(target, a, args.throughput_s, out, tls, fmt))
            for a in range(args.throughput_agents)
        ]
        for w in workers:
            w.start()
        samples = sum(out.get(timeout=args.throughput_s + 120)[2] for _ in workers)
        cpu1, t1 = _proc_cpu_s(proc.pid), time.monotonic()
        for w in workers:
            w.join()
        wall_s, cpu_s = t1 - t0, cpu1 - cpu0
        rss, hwm = _proc_rss_mib(proc.pid)
        print(
            f"\n[throughput] {args.throughput_agents} agents, 500-sample batches, window {WINDOW}"
        )
        print(f"  samples acked        {samples:,} in {wall_s:.1f} s (incl. client start-up)")
        print(f"  ingest rate          {samples / wall_s:,.0f} samples/s")
        print(f"  collector CPU        {cpu_s:.2f} s = {cpu_s / wall_s:.2f} cores")
        print(f"  collector CPU/sample {cpu_s / samples * 1e6:.2f} µs")
        print(f"  per collector core   {samples / cpu_s:,.0f} samples/s")
        print(f"  collector RSS        {rss:.0f} MiB (peak {hwm:.0f} MiB)")

        per_proc = -(-args.lag_agents // 2)
        lag_cpu0, lag_t0 = _proc_cpu_s(proc.pid), time.monotonic()
        workers = []
        for first in range(0, args.lag_agents, per_proc):
            count = min(per_proc, args.lag_agents - first)
            workers.append(
                ctx.Process(
                    target=lag_agents,
                    args=(target, first, count, args.lag_s, args.hz, out, tls, fmt),
                )
            )
        for w in workers:
            w.start()
        lags: list[float] = []
        for _ in workers:
            lags += out.get(timeout=args.lag_s + 120)[2]
        lag_cpu1, lag_t1 = _proc_cpu_s(proc.pid), time.monotonic()
        for w in workers:
            w.join()
        rate = args.lag_agents * 8 * args.hz
        rss, hwm = _proc_rss_mib(proc.pid)
        lag_cores = (lag_cpu1 - lag_cpu0) / (lag_t1 - lag_t0)
        print(
            f"\n[lag] {args.lag_agents} agents x 8 GPUs at {args.hz:g} Hz = {rate:,.0f} samples/s,"
        )
        print("      one batch per agent per second")
        print(f"  samples              {len(lags):,}")
        print(f"  sample -> ack p50    {_percentile(lags, 50) * 1000:.0f} ms")
        print(f"  sample -> ack p99    {_percentile(lags, 99) * 1000:.0f} ms")
        print(f"  sample -> ack max    {max(lags) * 1000:.0f} ms")
        print(f"  collector CPU        {lag_cores:.3f} cores")
        print(f"  collector RSS        {rss:.0f} MiB (peak {hwm:.0f} MiB)")
        return Result(
            samples / wall_s,
            cpu_s / samples * 1e6,
            _percentile(lags, 99) * 1000,
            lag_cores,
            rss,
            hwm,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--throughput-agents", type=int, default=4)
    parser.add_argument("--throughput-s", type=float, default=10.0)
    parser.add_argument("--lag-agents", type=int, default=50)
    parser.add_argument("--lag-s", type=float, default=15.0)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--tls", action="store_true", help="also run with mTLS; print ratios")
    parser.add_argument(
        "--format", choices=("records", "columns", "both"), default="both",
        help="batch format(s) to measure (default: both, in this run)",
    )  # fmt: skip
    parser.add_argument(
        "--write-docs", action="store_true",
        help="write the table into docs/PERFORMANCE.md (needs both formats)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.write_docs and args.format != "both":
        parser.error("--write-docs needs both formats in the run (--format both)")
    formats = ("records", "columns") if args.format == "both" else (args.format,)
    results = {fmt: run(args, None, fmt) for fmt in formats}
    if len(results) == 2:
        old, new = results["records"], results["columns"]
        print("\n=== columns / records, same run (plaintext)")
        print(f"  CPU per sample       {new.cpu_us_per_sample / old.cpu_us_per_sample:.2f}x "
              f"({old.cpu_us_per_sample:.2f} -> {new.cpu_us_per_sample:.2f} µs)")  # fmt: skip
        print(f"  per collector core   {1e6 / old.cpu_us_per_sample:,.0f} -> "
              f"{1e6 / new.cpu_us_per_sample:,.0f} samples/s")  # fmt: skip
        print(f"  ingest rate          {new.samples_per_s / old.samples_per_s:.2f}x")
        print(f"  lag phase CPU        {old.lag_cores:.3f} -> {new.lag_cores:.3f} cores")
        print(f"  lag p99              {old.lag_p99_ms:.0f} -> {new.lag_p99_ms:.0f} ms")
    plain = results[formats[0]]
    lines = report(args, results) if args.write_docs else []
    if not args.tls:
        _write(lines)
        return
    with tempfile.TemporaryDirectory(prefix="rooftop-bench-pki-") as root:
        # mTLS checks each batch's agent_id against the certificate's names.
        ids = [f"bench-{a}" for a in range(args.throughput_agents)]
        ids += [f"lag-{a}" for a in range(args.lag_agents)]
        mtls = run(args, Tls.make(Path(root), ids), formats[0])
    print("\n=== mTLS / plaintext, same run")
    print(f"  CPU per sample       {mtls.cpu_us_per_sample / plain.cpu_us_per_sample:.2f}x "
          f"({plain.cpu_us_per_sample:.2f} -> {mtls.cpu_us_per_sample:.2f} µs)")  # fmt: skip
    print(f"  ingest rate          {mtls.samples_per_s / plain.samples_per_s:.2f}x")
    print(f"  lag phase CPU        {mtls.lag_cores / plain.lag_cores:.2f}x "
          f"({plain.lag_cores:.3f} -> {mtls.lag_cores:.3f} cores)")  # fmt: skip
    print(f"  lag p99              {plain.lag_p99_ms:.0f} -> {mtls.lag_p99_ms:.0f} ms")
    if lines:
        lines += [
            "",
            f"mTLS through the TLS gate ({formats[0]}, same run): CPU per sample "
            f"{plain.cpu_us_per_sample:.2f} → {mtls.cpu_us_per_sample:.2f} µs "
            f"({mtls.cpu_us_per_sample / plain.cpu_us_per_sample:.2f}×); lag phase "
            f"{plain.lag_cores:.3f} → {mtls.lag_cores:.3f} cores; lag p99 "
            f"{plain.lag_p99_ms:.0f} → {mtls.lag_p99_ms:.0f} ms.",
        ]
    _write(lines)


def report(args: argparse.Namespace, results: dict[str, Result]) -> list[str]:
    """The markdown block: records and columns side by side, from this run."""
    old, new = results["records"], results["columns"]
    load = os.getloadavg()[0]
    return [
        f"**Results ({datetime.date.today().isoformat()}, {os.cpu_count()} cores, load "
        f"average {load:.1f} at the end; {args.throughput_agents} throughput agents × "
        f"{args.throughput_s:g} s, {args.lag_agents} lag agents × {args.lag_s:g} s at "
        f"{args.hz:g} Hz).**",
        "",
        "| | records | columns | budget |",
        "|---|---|---|---|",
        f"| collector CPU per sample | {old.cpu_us_per_sample:.2f} µs | "
        f"**{new.cpu_us_per_sample:.2f} µs** ({new.cpu_us_per_sample / old.cpu_us_per_sample:.2f}×)"
        " | ≤ 1 µs |",
        f"| samples/s per collector core | {1e6 / old.cpu_us_per_sample:,.0f} | "
        f"{1e6 / new.cpu_us_per_sample:,.0f} | |",
        f"| ingest rate (saturated) | {old.samples_per_s:,.0f} samples/s | "
        f"{new.samples_per_s:,.0f} samples/s | |",
        f"| ⇒ CPU for 80k samples/s | {old.cpu_us_per_sample * 0.08:.2f} core | "
        f"**{new.cpu_us_per_sample * 0.08:.2f} core** | ≤ 0.25 core |",
        f"| lag phase ({args.lag_agents * 8 * args.hz:,.0f} samples/s): CPU, sample → ack p99 | "
        f"{old.lag_cores:.3f} cores, {old.lag_p99_ms:,.0f} ms | "
        f"{new.lag_cores:.3f} cores, {new.lag_p99_ms:,.0f} ms | p99 ≤ 2 s |",
        f"| RSS (peak) | {old.rss_mib:.0f} ({old.peak_rss_mib:.0f}) MiB | "
        f"{new.rss_mib:.0f} ({new.peak_rss_mib:.0f}) MiB | |",
    ]


def _write(lines: list[str]) -> None:
    if lines:
        write_block("bench_collector", "\n".join(lines))
        print("\nwrote docs/PERFORMANCE.md")


if __name__ == "__main__":
    main()
