"""Security tests: a real PKI (openssl CLI), real collector and agent processes.

- ``pki``: CA ``ca`` and a second, unrelated ``wrong-ca``; the collector's certificate
  (SAN ``IP:127.0.0.1``, ``DNS:localhost``); agent certificates for ``agent-1`` and
  ``agent-2`` (CN and SAN); an expired ``agent-1`` certificate; an ``agent-1``
  certificate from the wrong CA; an operator certificate (``ops``).
- ``CollectorProc``: ``python -m rooftop collector --config FILE`` on 127.0.0.1, port 0.
- ``AgentProc``: ``python -m rooftop agent --config FILE`` with fake H100s.
- ``Proxy``: a TCP forwarder whose ``cut()`` resets every open connection (the agent
  then reconnects), used to prove rotated credentials on the next connection.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security.pki import OPENSSL, Cert, Pki
from tests.support import Proxy
from tests.support import subprocess_env as _env
from tests.support import toml_value as _toml

REPO = Path(__file__).resolve().parents[2]


class Certs:
    def __init__(self, root: Path) -> None:
        pki = Pki(root)
        self.pki = pki
        self.ca = pki.ca("ca")
        self.wrong_ca = pki.ca("wrong-ca")
        self.server = pki.issue("server", ca="ca", cn="localhost",
                                sans=("IP:127.0.0.1", "DNS:localhost"),
                                usage="serverAuth")  # fmt: skip
        self.agent1 = pki.issue("agent-1", ca="ca", cn="agent-1", sans=("DNS:agent-1",))
        self.agent2 = pki.issue("agent-2", ca="ca", cn="agent-2", sans=("DNS:agent-2",))
        self.ops = pki.issue("ops", ca="ca", cn="ops")
        self.expired = pki.issue("agent-1-expired", ca="ca", cn="agent-1",
                                 sans=("DNS:agent-1",), expired=True)  # fmt: skip
        self.foreign = pki.issue("agent-1-foreign", ca="wrong-ca", cn="agent-1",
                                 sans=("DNS:agent-1",))  # fmt: skip

    def issue(self, name: str, **kwargs: Any) -> Cert:
        return self.pki.issue(name, ca="ca", **kwargs)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """The PKI; skips every test that needs it when there is no openssl CLI to make it.

    (A ``pytestmark`` here would do nothing: pytest reads it only in test modules. The
    tests that need no certificate, e.g. plaintext refusals and config checks, run.)
    """
    if OPENSSL is None:
        pytest.skip("no openssl CLI to make certificates")
    return Certs(tmp_path_factory.mktemp("pki"))


def wait_for(cond: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class CollectorProc:
    """``agentctl collector`` in a subprocess, its stderr (logs) in a file."""

    def __init__(self, directory: Path, **collector: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.log_path = directory / "collector.log"
        self.collector = {"listen": "127.0.0.1:0", "ack_interval_s": 0.05, **collector}
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.port = 0

    def start(self) -> CollectorProc:
        config = self.directory / "collector.toml"
        lines = ["[collector]", *(f"{k} = {_toml(v)}" for k, v in self.collector.items())]
        lines += ["[prometheus]", 'listen = ""']
        config.write_text("\n".join(lines) + "\n")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rooftop", "collector", "--config", str(config)],
                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        lines_q: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        self._reader = threading.Thread(
            target=lambda: [lines_q.put(x) for x in stdout], daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = lines_q.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"collector did not start:\n{self.log()}") from None
                continue
            match = re.search(r"ingest on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)  # it ends at EOF, when the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class AgentProc:
    """``agentctl agent`` in a subprocess with fake H100s, its log in a file."""

    DEFAULTS: dict[str, Any] = {
        "backend": "fake:h100",
        "fake_gpus": 2,
        "rate_hz": 20,
        "window_s": 1.0,
        "batch_interval_s": 0.1,
        "backoff_base_s": 0.1,
        "backoff_max_s": 0.5,
        "connect_timeout_s": 1.0,
        "shutdown_timeout_s": 5.0,
        "host_sensor": False,
    }

    def __init__(self, directory: Path, **config: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.log_path = directory / "agent.log"
        self.config = {**self.DEFAULTS, "spool_dir": directory / "spool", **config}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        path = self.directory / "agent.toml"
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in self.config.items()))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rooftop", "agent", "--config", str(path)],
                cwd=REPO, env=_env(), stdout=log, stderr=log,
            )  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM, wait for the graceful exit; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def last_seq(self) -> int:
        match = re.search(r"agent stopped \(last seq (\d+)\)", self.log())
        assert match, self.log()
        return int(match.group(1))


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Everything a test starts; stopped at teardown, whatever happened."""
    started: list[Any] = []
    yield started
    for p in reversed(started):
        if isinstance(p, Proxy):
            p.close()
        else:
            p.stop()
