"""The three-collector kill-and-return scenario, shared by the e2e test and the benchmark.

Three real ``agentctl collector`` processes (``CollectorProc``: each records every batch
it applies; each with a ``state_dir``, remote write into the Prometheus below when
asked, and ``disconnected_series_s`` when the collector has it), a real Prometheus
scraping all three (and receiving remote write), and ``tests.loadgen.LoadGen``'s
simulated agents (one process, real gRPC streams). ``Sharded.run`` goes through:

1. **steady**: every agent at home; the collectors' CPU and RSS measured over a window;
2. **kill**: SIGKILL one collector; its agents move to their next-ranked collector;
3. **away**: it stays dead for ``away_s``;
4. **return**: it starts again on the same port and state directory; its agents go
   home after ``return_after_s`` of healthy probes;
5. **settle**: on for the series grace (``disconnected_series_s``) and a few scrapes;
6. **drain**: generation stops, every batch is acked, the collectors stop.

``Outcome`` holds what happened: the generator's ledgers, every collector's applied
batches, the marks on disk at the kill, timings and resource figures. The checks
live in the test; the benchmark prints the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rooftop.collector.config import CollectorConfig
from rooftop.collector.marks import MARKS_FILE
from tests.e2e.conftest import CollectorProc, wait_for
from tests.loadgen import AgentLedger, LoadGen
from tests.support import prometheus_server

CLK_TCK = 100  # /proc/<pid>/stat ticks per second (Linux's USER_HZ)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` now, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def collector_knows(key: str) -> bool:
    """Whether the collector's config has ``key`` (a setting another change adds)."""
    return key in {f.name for f in dataclasses.fields(CollectorConfig)}


def durable_marks(state_dir: Path) -> dict[tuple[str, str], int]:
    """The marks file as a restarted collector reads it (the last line of a pair wins)."""
    marks: dict[tuple[str, str], int] = {}
    path = state_dir / MARKS_FILE
    if not path.exists():
        return marks
    for line in path.read_text().splitlines():
        try:
            agent_id, boot_id, mark = json.loads(line)
        except ValueError:
            break  # a torn last line
        marks[(agent_id, boot_id)] = mark
    return marks


def prometheus_query(base: str, promql: str, **params: Any) -> list[dict[str, Any]]:
    """The ``result`` of a Prometheus query (``query_range`` when ``start`` is given)."""
    api = "query_range" if "start" in params else "query"
    url = f"{base}/api/v1/{api}?" + urllib.parse.urlencode({"query": promql, **params})
    with urllib.request.urlopen(url, timeout=60) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@dataclass
class Outcome:
    """What one run produced (see the module docstring)."""

    agents: int
    gpus: int
    ledgers: list[AgentLedger]
    applied: list[Counter[tuple[str, int]]]  # per collector: (agent_id, seq) -> times
    killed: int  # index of the collector that was killed
    killed_homed: list[str]  # agent ids whose home it is
    kill_s: float
    restart_s: float
    marks_at_kill: dict[tuple[str, str], int]
    cpu_cores: list[float]  # per collector, over the steady window
    rss_mib: list[float]  # per collector, at the end of the steady window
    samples_per_s: list[float]  # per collector, GPU samples applied, steady window
    agents_on: list[int]  # per collector, agents streaming to it in the steady window
    generator_cores: float
    rehome_s: dict[str, float] = field(default_factory=dict)  # agent -> kill → first ack away
    home_s: dict[str, float] = field(default_factory=dict)  # agent -> restart → back home
    duplicate_spans_s: dict[str, float] = field(default_factory=dict)  # GPU -> longest span
    duplicates_after_grace: int = 0
    grace_end_s: float = 0.0
    grace_s: float = 0.0  # disconnected_series_s
    scrape_interval_s: float = 0.0
    prometheus_series: int = 0
    remote_write_series: int = 0
    # outcome (sent, rejected, dropped, resent) -> samples, over the remote writers
    remote_write_samples: dict[str, float] = field(default_factory=dict)
    # per collector at the drain: missing, acked_elsewhere, duplicates (the restarted
    # collector's since its restart)
    counts: list[dict[str, float]] = field(default_factory=list)
    remote_write_sent_by: list[float] = field(default_factory=list)  # per remote writer
    # stream failures on a collector that was up (not the victim's at its kill), by status
    live_stream_failures: Counter[str] = field(default_factory=Counter)

    def per_thousand(self, values: list[float]) -> list[float]:
        """``values`` (one per collector) per 1,000 agents streaming to it."""
        return [v / n * 1000 if n else 0.0 for v, n in zip(values, self.agents_on, strict=True)]


_COUNTS = ("missing", "acked_elsewhere", "duplicates")


def _collector_counts(proc: CollectorProc) -> dict[str, float]:
    """``proc``'s seq counters (``rooftop_collector_<name>_total``, summed over labels)."""
    counts = dict.fromkeys(_COUNTS, 0.0)
    for (name, _), value in proc.metrics().items():
        key = name.removeprefix("rooftop_collector_").removesuffix("_total")
        if key in counts:
            counts[key] += value
    return counts


def _collect_remote_write(proc: CollectorProc, into: dict[str, float]) -> float:
    """Add ``proc``'s remote-write counters, by outcome, to ``into``; its ``sent``."""
    sent = 0.0
    for (name, labels), value in proc.metrics().items():
        if name == "rooftop_collector_remote_write_samples_total":
            outcome = dict(labels).get("rooftop_remote_write_outcome", "")
            into[outcome] = into.get(outcome, 0.0) + value
            sent += value if outcome == "sent" else 0.0
    return sent


@dataclass
class Sharded:
    """The scenario's settings; ``run`` drives it (see the module docstring)."""

    root: Path
    agents: int = 2000
    gpus: int = 8
    rate_hz: float = 1.0
    samples_per_gpu: int = 1  # per batch: 10 for a 10 Hz agent (it batches each second)
    steady_s: float = 10.0  # the measured window, after start-up
    away_s: float = 15.0
    return_after_s: float = 3.0
    disconnected_series_s: float = 3.0
    scrape_interval_s: int = 5
    settle_scrapes: int = 3
    remote_write: bool = True
    remote_writers: tuple[int, ...] = (0, 1, 2)  # which collectors remote-write
    # What they remote-write (``[[remote_write]] include``): the verdicts' confidence, a
    # point per GPU per window, as a large fleet sends a chosen few (everything is 17
    # points per GPU sample; tests/collector/test_remote_write_prometheus.py sends
    # every sample of a 10 Hz agent).
    remote_write_include: tuple[str, ...] = ("rooftop_gpu_bound_confidence",)
    # Agents start over this long: 2,000 streams opened within 5 s on a loaded 2-core
    # machine left some that never sent a batch (the generator's own gRPC client was
    # starved), which no fleet of real hosts does.
    start_spread_s: float = 15.0
    collectors: list[CollectorProc] = field(default_factory=list)

    @property
    def targets_file(self) -> Path:
        """Prometheus' file_sd targets: the collectors' metrics ports (new on each start)."""
        return self.root / "targets.json"

    def write_targets(self) -> None:
        """Point Prometheus at the running collectors' endpoints (atomically)."""
        targets = [f"127.0.0.1:{c.metrics_port}" for c in self.collectors if c.alive()]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets}]))
        tmp.replace(self.targets_file)

    @contextlib.contextmanager
    def prometheus(self) -> Iterator[str]:
        """The scenario's real Prometheus (remote-write receiver, out-of-order window,
        scraping the collectors in ``targets_file``, keeping only the verdict series);
        yields its base URL."""
        self.write_targets()
        workdir = self.root / "prometheus"
        workdir.mkdir(exist_ok=True)
        with prometheus_server(
            workdir,
            None,
            remote_write_receiver=True,
            out_of_order_window="30m",
            scrape_interval_s=self.scrape_interval_s,
            keep_metrics="rooftop_gpu_bound",
            # The collectors render only that family for these scrapes (name[]): the
            # whole exposition of 5,000+ GPUs costs each of them ~1 s of CPU per scrape.
            scrape_names=("rooftop_gpu_bound",),
            targets_file=self.targets_file,
            # The observer must not take the observed's CPU: in a fleet Prometheus has
            # machines of its own; on this one (2 cores in CI, ~1.9 of them busy) the
            # collectors taking a killed peer's agents go first. It scrapes every 10 s
            # and its remote-write receiver is queued to: lagging costs it nothing.
            nice=10,
        ) as base:
            yield base

    def collector_settings(self, index: int, prometheus_base: str | None) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "state_dir": self.root / f"collector-{index}" / "state",
            # Room for one collector's share plus the agents that fail over to it, with
            # the series of agents that left it (until forget_after_s).
            "max_agents": self.agents * 2,
            "max_gpus": self.agents * self.gpus * 2,
        }
        if self.disconnected_series_s > 0 and collector_knows("disconnected_series_s"):
            settings["disconnected_series_s"] = self.disconnected_series_s
        return settings

    def start_collectors(self, prometheus_base: str | None) -> list[CollectorProc]:
        rw = (
            {
                "url": f"{prometheus_base}/api/v1/write",
                "queue_max_samples": 200_000,
                "include": list(self.remote_write_include),
            }
            if self.remote_write and prometheus_base is not None
            else None
        )
        for i in range(3):
            proc = CollectorProc(
                self.root / f"collector-{i}",
                remote_write=rw if i in self.remote_writers else None,
                **self.collector_settings(i, prometheus_base),
            )
            self.collectors.append(proc)
            proc.start()
        self.write_targets()
        return self.collectors

    def run(self, prometheus_base: str | None, *, kill: int = 0) -> Outcome:
        """Drive the scenario against started collectors; returns what happened."""
        cols = self.collectors
        addresses = [c.address for c in cols]
        gen = LoadGen(
            addresses,
            agents=self.agents,
            gpus=self.gpus,
            rate_hz=self.rate_hz,
            samples_per_gpu=self.samples_per_gpu,
            return_after_s=self.return_after_s,
            start_spread_s=self.start_spread_s,
        ).start()
        try:
            return self._run(gen, addresses, prometheus_base, kill)
        finally:
            gen.stop()

    def _run(
        self, gen: LoadGen, addresses: list[str], prometheus_base: str | None, kill: int
    ) -> Outcome:
        cols = self.collectors
        # 1. steady: everyone home, then a measured window.
        # A stream the collector has not taken in 30 s is cancelled by gRPC (the agent
        # then tries its next collector): on a loaded machine some need a second try.
        wait_for(lambda: all(led.acked_seq > 0 for led in gen.ledgers), "every agent acked", 120,
                 interval_s=0.2, why=lambda: _not_acked(gen.ledgers))  # fmt: skip
        # Steady means caught up: 2,000 streams opening over start_spread_s leave the
        # collectors a backlog of batches on a 2-core machine. Killing one before that
        # backlog is gone measures the start-up, not the failover.
        wait_for(lambda: max(len(led.unacked) for led in gen.ledgers) <= 2,
                 "every agent caught up (at most 2 batches unacked)", 90, interval_s=0.5,
                 why=lambda: _behind(gen.ledgers))  # fmt: skip
        time.sleep(2.0)
        applied0 = [len(c.ledger().batches) for c in cols]
        cpu0 = [proc_cpu_s(c.pid) for c in cols]
        gen_cpu0, t0 = _self_cpu_s(), time.monotonic()
        time.sleep(self.steady_s)
        wall = time.monotonic() - t0
        cpu = [(proc_cpu_s(c.pid) - c0) / wall for c, c0 in zip(cols, cpu0, strict=True)]
        generator_cores = (_self_cpu_s() - gen_cpu0) / wall
        rss = [proc_rss_mib(c.pid) for c in cols]
        agents_on = [gen.on(a) for a in addresses]
        batches = [len(c.ledger().batches) - a0 for c, a0 in zip(cols, applied0, strict=True)]
        samples = [b * self.gpus * self.samples_per_gpu / wall for b in batches]
        # 2. kill.
        victim = cols[kill]
        homed = [led.agent_id for led in gen.homes()[victim.address]]
        victim.kill()
        kill_s = time.time()
        marks = durable_marks(self.root / f"collector-{kill}" / "state")
        # 3. away.
        time.sleep(self.away_s)
        # 4. return.
        victim.start()
        restart_s = time.time()
        self.write_targets()
        homed_set = set(homed)
        wait_for(
            lambda: all(
                led.current == led.home for led in gen.ledgers if led.agent_id in homed_set
            ),
            "the killed collector's agents home again",
            60,
            interval_s=0.2,
            why=lambda: f"{sum(led.current != led.home for led in gen.ledgers)} are not; "
            f"home probes so far: {gen.probes.copy()}",
        )
        home_at = time.time()
        # 5. settle: the series grace, then scrapes that must show no GPU twice.
        grace_end_s = home_at + self.disconnected_series_s + self.scrape_interval_s
        time.sleep(
            max(0.0, grace_end_s - time.time()) + self.settle_scrapes * self.scrape_interval_s
        )
        end_s = time.time()
        # Everyone home at the end. An agent whose stream to a live collector broke
        # during the settle (a loaded 2-core machine does that now and then) fails over
        # and comes back after return_after_s of answered probes: give it that long.
        # (The test asserts that they all are: no wait_for here, which would fail every
        # check of the run.)
        deadline = time.monotonic() + self.return_after_s + gen.probe_interval_s + 20.0
        while time.monotonic() < deadline and any(led.current != led.home for led in gen.ledgers):
            time.sleep(0.2)
        # 6. drain.
        gen.stop()
        remote_write: dict[str, float] = {}
        sent_by: list[float] = []
        if self.remote_write and prometheus_base is not None:
            # Flushed: whatever is queued goes out at the drain's end; give it a moment.
            time.sleep(2.0)
            sent_by = [_collect_remote_write(cols[i], remote_write) for i in self.remote_writers]
        counts = [_collector_counts(c) for c in cols]
        for c in cols:
            c.terminate()
        outcome = Outcome(
            agents=self.agents,
            gpus=self.gpus,
            ledgers=gen.ledgers,
            applied=[Counter((b.agent_id, b.seq) for b in c.ledger().batches) for c in cols],
            killed=kill,
            killed_homed=homed,
            kill_s=kill_s,
            restart_s=restart_s,
            marks_at_kill=marks,
            cpu_cores=cpu,
            rss_mib=rss,
            samples_per_s=samples,
            agents_on=agents_on,
            generator_cores=generator_cores,
            grace_end_s=grace_end_s,
            remote_write_samples=remote_write,
            remote_write_sent_by=sent_by,
            counts=counts,
            grace_s=self.disconnected_series_s,
            scrape_interval_s=self.scrape_interval_s,
        )
        by_id = {led.agent_id: led for led in gen.ledgers}
        for agent_id in homed:
            events = by_id[agent_id].events
            away = [
                e.time_s
                for e in events
                if e.kind == "streaming" and e.time_s > kill_s and e.address != victim.address
            ]
            home = [e.time_s for e in events if e.kind == "home" and e.time_s > restart_s]
            outcome.rehome_s[agent_id] = (min(away) - kill_s) if away else float("inf")
            outcome.home_s[agent_id] = (min(home) - restart_s) if home else float("inf")
        # Streams that broke on a collector that was up: everything but the victim's
        # streams at the kill.
        outcome.live_stream_failures = Counter(
            e.detail
            for led in gen.ledgers
            for e in led.events
            if e.kind == "failed"
            and not (e.address == victim.address and kill_s <= e.time_s < restart_s + 1.0)
        )
        if prometheus_base is not None:
            self._prometheus(outcome, prometheus_base, kill_s - 30, end_s)
        return outcome

    def _prometheus(self, out: Outcome, base: str, start_s: float, end_s: float) -> None:
        # Each GPU's scraped verdict series (one per state; "memory" is enough to count
        # GPUs) on more than one collector at one evaluation step.
        promql = (
            'count by (hw_id, host_name) (rooftop_gpu_bound{job="rooftop",'
            'rooftop_bound="memory"}) > 1'
        )
        step = self.scrape_interval_s
        result = prometheus_query(base, promql, start=start_s, end=end_s, step=step)
        for series in result:
            times = [float(t) for t, _ in series["values"]]
            gpu = f"{series['metric'].get('host_name')}/{series['metric'].get('hw_id')}"
            out.duplicate_spans_s[gpu] = max(times) - min(times) + step
            out.duplicates_after_grace += sum(1 for t in times if t > out.grace_end_s)
        with urllib.request.urlopen(f"{base}/api/v1/status/tsdb", timeout=60) as resp:
            out.prometheus_series = int(json.loads(resp.read())["data"]["headStats"]["numSeries"])
        if self.remote_write:
            # Remote-written series carry no job label (scraped ones do).
            rw = prometheus_query(base, 'count({__name__=~"rooftop_.+|hw_.+", job=""})')
            out.remote_write_series = int(float(rw[0]["value"][1])) if rw else 0


def _self_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _not_acked(ledgers: list[AgentLedger]) -> str:
    """Which agents have no ack yet, and their streams' last failures."""
    waiting = [led for led in ledgers if led.acked_seq == 0]
    failures = Counter(
        e.detail or "?" for led in waiting for e in led.events if e.kind == "failed"
    )
    return (f"{len(waiting)} of {len(ledgers)} agents have no ack; "
            f"their stream failures: {dict(failures.most_common(3))}")  # fmt: skip


def _behind(ledgers: list[AgentLedger]) -> str:
    """How far behind the agents are (batches unacked), for a wait's message."""
    behind = sorted((len(led.unacked) for led in ledgers), reverse=True)
    return (f"{sum(1 for n in behind if n > 2)} agents have more than 2 batches unacked; "
            f"the most: {behind[:5]}")  # fmt: skip


def summary(out: Outcome) -> dict[str, float]:
    """The figures the test prints and the benchmark tabulates."""
    rehome = sorted(out.rehome_s.values())
    home = sorted(out.home_s.values())
    total = sum(led.last_seq for led in out.ledgers)
    again = _applied_again(out)
    return {
        "agents": out.agents,
        "gpus_per_agent": out.gpus,
        "batches": total,
        "applied_again": again,
        "resends": sum(led.resends for led in out.ledgers),
        "rehome_p50_s": statistics.median(rehome) if rehome else 0.0,
        "rehome_max_s": rehome[-1] if rehome else 0.0,
        "home_again_max_s": home[-1] if home else 0.0,
        "collector_cores": statistics.mean(out.cpu_cores),
        "collector_rss_mib": statistics.mean(out.rss_mib),
        "cores_per_1000_agents": statistics.mean(out.per_thousand(out.cpu_cores)),
        "rss_mib_per_1000_agents": statistics.mean(out.per_thousand(out.rss_mib)),
        "cpu_us_per_sample": sum(out.cpu_cores) / max(1.0, sum(out.samples_per_s)) * 1e6,
        "samples_per_s": sum(out.samples_per_s),
        "generator_cores": out.generator_cores,
        "prometheus_series": out.prometheus_series,
        "remote_write_series": out.remote_write_series,
        **{f"remote_write_{k}": v for k, v in out.remote_write_samples.items()},
        **{k: sum(c[k] for c in out.counts) for k in _COUNTS},
        "duplicate_gpus": len(out.duplicate_spans_s),
        "duplicate_span_max_s": max(out.duplicate_spans_s.values(), default=0.0),
        "live_stream_failures": sum(out.live_stream_failures.values()),
    }


def _applied_again(out: Outcome) -> int:
    total: Counter[tuple[str, int]] = Counter()
    for applied in out.applied:
        total.update(applied)
    return sum(n - 1 for n in total.values() if n > 1)
