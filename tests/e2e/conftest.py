"""End-to-end harness: REAL collector and agent processes on loopback, counted by seq.

- ``CollectorProc``: ``agentctl collector`` in a subprocess (through
  ``tests/e2e/recording_collector.py``, which records every applied batch to a JSON
  Lines file), plaintext, on a free port, with its real Prometheus endpoint.
- ``AgentProc``: ``python -m rooftop agent --config FILE`` with a temp TOML config
  (``insecure = true``, fake H100s, high rate, small batches, short backoff), its log
  in a file.
- ``Proxy``: a TCP forwarder on loopback between the two that can *cut* (reset every
  connection and refuse new ones: the collector unreachable) or *freeze* (stop moving
  bytes without closing anything: a silent partition).
- ``Ledger``: the recorded batches, per (agent_id, boot_id), with the checks the
  scenarios share (contiguous, each once, holes).
- ``e2e`` runs plaintext; parametrized indirectly with ``"mtls"`` the collector serves
  mTLS (through its TLS gate) and every agent gets a certificate of its own from a
  throwaway CA (``tests/security/pki.py``).

Every process a test starts is killed at teardown if it is still running.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.security.pki import OPENSSL, Pki
from tests.support import Proxy
from tests.support import subprocess_env as _env
from tests.support import toml_value as _toml_value

REPO = Path(__file__).resolve().parents[2]

# Fast settings so the whole suite fits in ~2 minutes on 2 cores. The spool's fsync
# interval stays at the design's 0.5 s: scenario (b) measures the loss window it gives.
AGENT_DEFAULTS: dict[str, Any] = {
    "insecure": True,
    "backend": "fake:h100",
    "fake_gpus": 2,
    "rate_hz": 20,
    "window_s": 1.0,
    "batch_interval_s": 0.1,
    "fsync_interval_s": 0.5,
    "backoff_base_s": 0.1,
    "backoff_max_s": 0.5,
    "connect_timeout_s": 1.0,
    "shutdown_timeout_s": 3.0,
}


def wait_for(
    cond: Callable[[], object],
    what: str,
    timeout_s: float = 20.0,
    procs: tuple[Any, ...] = (),
    interval_s: float = 0.05,
    why: Callable[[], str] | None = None,
) -> None:
    """Poll ``cond`` until truthy; fail naming ``what`` (and a dead process's log).

    ``why``, when given, says what was still missing at the timeout.
    """
    deadline = time.monotonic() + timeout_s
    while not cond():
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited while waiting for {what}:\n{proc.log()}")
        if time.monotonic() > deadline:
            detail = f": {why()}" if why is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{detail}")
        time.sleep(interval_s)


# --- the record of applied batches ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Applied:
    """One batch as the collector applied it."""

    agent_id: str
    boot_id: str
    seq: int
    samples: int
    newest_sample_s: float | None
    oldest_sample_s: float | None
    skewed: int
    received_s: float
    stats: dict[str, int] | None
    collector_pid: int
    gpu_columns_rows: int = 0  # of ``samples``, those that came as Batch.gpu_columns


@dataclass(slots=True)
class Ledger:
    """Applied batches read back from the record file, with the checks scenarios share."""

    batches: list[Applied] = field(default_factory=list)

    def of(self, agent_id: str, boot_id: str | None = None) -> list[Applied]:
        return [
            b
            for b in self.batches
            if b.agent_id == agent_id and (boot_id is None or b.boot_id == boot_id)
        ]

    def boots(self, agent_id: str) -> list[str]:
        """Boot ids of ``agent_id`` in first-applied order."""
        seen: dict[str, None] = {}
        for b in self.of(agent_id):
            seen.setdefault(b.boot_id, None)
        return list(seen)

    def seqs(self, agent_id: str, boot_id: str) -> Counter[int]:
        """How many times each seq was applied (more than once only across collectors)."""
        return Counter(b.seq for b in self.of(agent_id, boot_id))

    def last_stats(self, agent_id: str) -> dict[str, int]:
        """The in-band agent stats of the last applied batch."""
        with_stats = [b.stats for b in self.of(agent_id) if b.stats is not None]
        assert with_stats, f"no stats from {agent_id}"
        return with_stats[-1]

    def samples(self, agent_id: str, boot_id: str) -> int:
        """Samples in the distinct seqs applied (a re-application counted once)."""
        first: dict[int, int] = {}
        for b in self.of(agent_id, boot_id):
            first.setdefault(b.seq, b.samples)
        return sum(first.values())


def holes(seqs: Counter[int] | set[int], upto: int) -> list[int]:
    """Seqs in 1..upto never applied."""
    return [s for s in range(1, upto + 1) if s not in seqs]


def assert_each_once(seqs: Counter[int], last: int) -> None:
    """Applied seqs are exactly 1..last, each once."""
    missing = holes(seqs, last)
    twice = sorted(s for s, n in seqs.items() if n > 1)
    extra = sorted(s for s in seqs if not 1 <= s <= last)
    assert (missing, twice, extra) == ([], [], []), (
        f"missing {missing[:20]}, applied twice {twice[:20]}, unknown {extra[:20]}"
    )


# --- the processes -------------------------------------------------------------------------


class _Proc:
    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; the exit status (fails if it does not exit in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout_s} s:\n{self.log()}"
            ) from None
        finally:
            self._close_pipes()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout:
            self.proc.stdout.close()


class CollectorProc(_Proc):
    """A real ``agentctl collector`` subprocess recording what it applies."""

    name = "collector"

    def __init__(
        self,
        directory: Path,
        *,
        port: int = 0,
        prometheus: dict[str, Any] | None = None,
        remote_write: dict[str, Any] | None = None,
        **collector: Any,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory / "collector.log")
        self.directory = directory
        self.record = directory / "applied.jsonl"
        self.record.touch()
        self.port = port
        self.metrics_port = 0
        self.collector = {"insecure": True, **collector}
        self.prometheus = prometheus or {}  # more [prometheus] keys (dcgm_names)
        self.remote_write = remote_write  # a [[remote_write]] table, when given
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CollectorProc:
        """Start (again, on the same port once it has one); returns when it serves."""
        assert not self.alive()
        self.starts += 1
        config = self.directory / "collector.toml"
        lines = ["[collector]", f'listen = "127.0.0.1:{self.port}"']
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.collector.items()]
        lines += ["[prometheus]", 'listen = "127.0.0.1:0"']
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.prometheus.items()]
        if self.remote_write is not None:
            lines += ["[[remote_write]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in self.remote_write.items()]
        config.write_text("\n".join(lines) + "\n")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.recording_collector", str(self.record),
             "collector", "--config", str(config)],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        log.close()
        assert self.proc.stdout is not None
        ingest = metrics = None
        deadline = time.monotonic() + 30
        while ingest is None or metrics is None:
            line = self.proc.stdout.readline().decode()
            if not line or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"collector did not start: {line!r}\n{self.log()}")
            if m := re.search(r"ingest on 127\.0\.0\.1:(\d+)", line):
                ingest = int(m.group(1))
            if m := re.search(r"prometheus on http://127\.0\.0\.1:(\d+)/", line):
                metrics = int(m.group(1))
        self.port, self.metrics_port = ingest, metrics
        return self

    def ledger(self) -> Ledger:
        """Every batch applied so far, by every run of this collector."""
        batches = []
        # The last line may be half written while we read: only whole lines count.
        for line in self.record.read_text().split("\n")[:-1]:
            if line.strip():
                batches.append(Applied(**json.loads(line)))
        return Ledger(batches)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The Prometheus endpoint, scraped and parsed: (name, labels) → value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over the series whose labels include ``labels`` (0 if none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= set(ls))


class AgentProc(_Proc):
    """A real ``python -m rooftop agent`` subprocess with a temp TOML config."""

    name = "agent"

    def __init__(
        self,
        directory: Path,
        agent_id: str,
        collector: str,
        *,
        environ: dict[str, str] | None = None,
        **config: Any,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory / "agent-0.log")
        self.directory = directory
        self.agent_id = agent_id
        self.environ = environ or {}  # extra variables, e.g. NODE_NAME (downward API)
        self.spool_dir = directory / "spool"
        self.config = {
            "agent_id": agent_id,
            "collectors": [collector],
            "spool_dir": self.spool_dir,
            **AGENT_DEFAULTS,
            **config,
        }
        self.starts = 0
        self.boot_id = ""
        self.started_s = 0.0

    def start(self) -> AgentProc:
        """Start (a new boot: new log file); returns once it logged its boot id."""
        assert not self.alive()
        self.starts += 1
        self.log_path = self.directory / f"agent-{self.starts}.log"
        path = self.directory / "agent.toml"
        path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in self.config.items()))
        log = self.log_path.open("wb")
        self.started_s = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rooftop", "agent", "--config", str(path)],
            cwd=REPO, env={**_env(), **self.environ}, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        wait_for(lambda: re.search(r"\(boot ([0-9a-f-]+)\)", self.log()), "the agent's boot id",
                 procs=(self,))  # fmt: skip
        match = re.search(r"\(boot ([0-9a-f-]+)\)", self.log())
        assert match is not None
        self.boot_id = match.group(1)
        return self

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (final flush, exit 0); returns the last seq of this boot."""
        code = self.terminate(timeout_s)
        assert code == 0, f"agent exited {code}:\n{self.log()}"
        match = re.search(r"last seq (\d+)", self.log())
        assert match is not None, self.log()
        return int(match.group(1))


# --- the proxy -----------------------------------------------------------------------------


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class Harness:
    """Factories for the processes and proxies of one test; teardown kills leftovers."""

    tmp_path: Path
    pki: Pki | None = None  # mTLS when set
    procs: list[_Proc] = field(default_factory=list)
    proxies: list[Proxy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pki is not None:
            self.pki.ca("ca")
            self.server = self.pki.issue("collector", ca="ca", cn="localhost",
                                         sans=("IP:127.0.0.1",), usage="serverAuth")  # fmt: skip

    def collector(self, name: str = "collector", **collector: Any) -> CollectorProc:
        if self.pki is not None:
            collector = {"insecure": False, "tls_cert_file": self.server.cert,
                         "tls_key_file": self.server.key,
                         "tls_client_ca_file": self.pki.root / "ca.crt", **collector}  # fmt: skip
        proc = CollectorProc(self.tmp_path / name, **collector)
        self.procs.append(proc)
        return proc.start()

    def agent(self, agent_id: str, collector: str, *, start: bool = True, **config: Any
              ) -> AgentProc:  # fmt: skip
        if self.pki is not None:
            cert = self.pki.issue(agent_id, ca="ca", cn=agent_id)
            config = {"insecure": False, "ca_file": self.pki.root / "ca.crt",
                      "cert_file": cert.cert, "key_file": cert.key, **config}  # fmt: skip
        proc = AgentProc(self.tmp_path / agent_id, agent_id, collector, **config)
        self.procs.append(proc)
        return proc.start() if start else proc

    def proxy(self, upstream_port: int) -> Proxy:
        proxy = Proxy(upstream_port)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proxy in self.proxies:
            proxy.close()


@pytest.fixture
def e2e(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Real collector / agent processes and proxies, all cleaned up after the test.

    Plaintext, or mTLS with ``@pytest.mark.parametrize("e2e", [...], indirect=True)``.
    """
    transport = getattr(request, "param", "plaintext")
    if transport == "mtls" and OPENSSL is None:
        pytest.skip("no openssl CLI to make certificates")
    harness = Harness(tmp_path, Pki(tmp_path / "pki") if transport == "mtls" else None)
    try:
        yield harness
    finally:
        harness.close()
