"""Helpers shared by the tests that run real servers and processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rooftop.common.wire import INGEST_SERVICE
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

BOOT = "boot-1"


def free_port() -> int:
    """A loopback port free right now (for servers that must keep a port across restarts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """``value`` written as TOML (bools, numbers, strings, paths, lists of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    return repr(value)


def subprocess_env() -> dict[str, str]:
    """The environment for a daemon under test: no ROOFTOP_* leaking in, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    env["GRPC_VERBOSITY"] = "ERROR"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proxy:
    """TCP forwarder on loopback: forward, cut (collector unreachable) or freeze (partition)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = threading.Event()
        self.down = threading.Event()
        self.closed = threading.Event()
        self.accepted = 0
        self.from_clients = bytearray()  # every byte the clients sent, in order (one client)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        """Close with RST, as a dead host or a firewall reject would."""
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        except OSError:
            pass
        sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.down.is_set():
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self.accepted += 1
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                tap = self.from_clients if a is client else None
                threading.Thread(target=self._pump, args=(a, b, tap), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, tap: bytearray | None) -> None:
        try:
            src.settimeout(0.05)
        except OSError:
            return
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.02)  # bytes pile up in the kernel; nobody is told
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)  # pass the FIN on
                except OSError:
                    pass
                return
            while self.frozen.is_set() and not self.closed.is_set():
                time.sleep(0.02)  # read just as the partition began: it never arrives
            if tap is not None:
                with self._lock:
                    tap += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            self._reset(conn)

    def cut(self) -> None:
        """The collector becomes unreachable: reset every connection, refuse new ones."""
        self.down.set()
        self._drop_all()

    def restore(self) -> None:
        """Reachable again."""
        self.down.clear()

    def freeze(self) -> None:
        """A silent partition: nothing moves, nothing is closed, nobody is told."""
        self.frozen.set()

    def reset(self) -> None:
        """Reset every open connection (as a flapping link would); new ones pass."""
        self._drop_all()

    def heal(self) -> None:
        """End the partition: connections from before it are dead; new ones pass."""
        self._drop_all()
        self.frozen.clear()

    def close(self) -> None:
        self.closed.set()
        self._drop_all()
        self.listener.close()
        self._thread.join(2)


class FakeIngest(telemetry_pb2_grpc.IngestServicer):
    """Acks the highest contiguous seq per boot after each batch; can reject or refuse.

    With ``columns`` its acks say it reads ``Batch.gpu_columns`` (as every current
    collector's do); without, it is a collector older than that field. With ``mute`` it
    takes the batches and acks none: a wedged collector, whose connection answers
    pings all the same.
    """

    def __init__(
        self,
        reject: set[int] | None = None,
        abort: grpc.StatusCode | None = None,
        columns: bool = False,
        mute: bool = False,
    ):
        self.columns = columns
        self.mute = mute
        self.lock = threading.Lock()
        self.received: list[pb.Batch] = []
        self.done: dict[str, set[int]] = {}
        self.contiguous: dict[str, int] = {}
        self.reject = reject or set()
        self.abort = abort
        self.streams = 0

    def Stream(self, request_iterator, context):
        with self.lock:
            self.streams += 1
        if self.abort is not None:
            context.abort(self.abort, "refused by the test")
        first_on_stream: set[str] = set()
        for batch in request_iterator:
            with self.lock:
                self.received.append(batch)
                if self.mute:
                    continue
                done = self.done.setdefault(batch.boot_id, set())
                done.add(batch.seq)
                top = self.contiguous.get(batch.boot_id, 0)
                if batch.boot_id not in first_on_stream:
                    # As the real collector does: a stream's first batch past the
                    # contiguous seq starts there (what lies before went elsewhere).
                    first_on_stream.add(batch.boot_id)
                    top = max(top, batch.seq - 1)
                while top + 1 in done:
                    top += 1
                self.contiguous[batch.boot_id] = top
            ack = pb.Ack(boot_id=batch.boot_id, acked_seq=top, columns=self.columns)
            if batch.seq in self.reject:
                ack.rejected_seq = batch.seq
                ack.error = "poison batch"
            yield ack

    def seqs(self, boot: str = BOOT) -> list[int]:
        """Each received seq once, in first-arrival order."""
        with self.lock:
            seen: list[int] = []
            for b in self.received:
                if b.boot_id == boot and b.seq not in seen:
                    seen.append(b.seq)
            return seen

    def applied(self) -> dict[str, set[int]]:
        """Per boot, the seqs received."""
        with self.lock:
            return {boot: set(s) for boot, s in self.done.items()}

    def count(self, seq: int, boot: str = BOOT) -> int:
        with self.lock:
            return sum(1 for b in self.received if b.boot_id == boot and b.seq == seq)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_PING = 0x6  # frame type (RFC 9113 §6.7); flag 0x1 marks the answer


def http2_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of each whole frame a client sent (plaintext h2c)."""
    if not data.startswith(HTTP2_PREFACE):
        raise ValueError("not an HTTP/2 client's bytes")
    frames, at = [], len(HTTP2_PREFACE)
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        if at + 9 + length > len(data):
            break  # the last frame is still on its way
        frames.append((data[at + 3], data[at + 4], bytes(data[at + 9 : at + 9 + length])))
        at += 9 + length
    return frames


class Server:
    """A real grpc server; stop() and start() again keep the same port."""

    def __init__(self, servicer: FakeIngest) -> None:
        self.servicer = servicer
        self.port = 0
        self.server: grpc.Server | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 100),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        telemetry_pb2_grpc.add_IngestServicer_to_server(self.servicer, server)
        # As the collector does: agents probe a collector they want to return to.
        health_servicer = health.HealthServicer()
        health_servicer.set(INGEST_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"cannot bind 127.0.0.1:{self.port}"
        self.port = port
        server.start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait(5)
            self.server = None


def wait_for(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def in_ci() -> bool:
    """Whether this run is CI's (the runner sets ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(
    name: str, path: str | None, *, installer: str = ".ci/install-prometheus.sh"
) -> str:
    """``path`` of the ``name`` binary, or stop the test: skip it with the reason, but
    under CI (``CI`` set) FAIL it, so a missing tool cannot turn CI green with the
    tests that need it skipped (``installer``, which scripts/test.sh runs, installs it:
    .ci/install-prometheus.sh Debian's ``prometheus`` and ``promtool``,
    .ci/install-kustomize.sh ``kustomize``)."""
    if path is not None:
        return path
    reason = f"no {name} binary on PATH ({installer} installs it)"
    if in_ci():
        pytest.fail(f"{reason}; CI must run the tests that need it", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def prometheus_server(
    workdir: Path,
    target_port: int | Sequence[int] | None,
    *,
    rule_file: Path | None = None,
    remote_write_receiver: bool = False,
    out_of_order_window: str | None = None,
    scrape_interval_s: int = 1,
    keep_metrics: str | None = None,
    targets_file: Path | None = None,
    scrape_names: Sequence[str] = (),
    nice: int = 0,
) -> Iterator[str]:
    """A real Prometheus scraping 127.0.0.1:``target_port`` every second (job
    ``rooftop``; a list of ports: each is a target; None: no scraping), evaluating
    ``rule_file`` every second; yields its base URL. ``remote_write_receiver`` serves
    ``/api/v1/write``; ``out_of_order_window`` (``"30m"``) accepts samples older than
    a series' newest. ``scrape_interval_s`` (also the scrape timeout) for large
    targets; ``keep_metrics``: a regex of metric names kept from scrapes (the rest
    dropped before storage, ``metric_relabel_configs``), to spare a small machine.
    ``targets_file``: targets also come from this file (``file_sd_configs``, JSON, re-read
    when it changes): for targets whose ports change, such as a restarted collector.
    ``scrape_names``: the scrape asks for these families only (``params: name[]``), so
    the collectors render nothing else. ``nice``: Prometheus runs at this niceness
    (``nice -n``, which execs it: the process is Prometheus itself).

    Needs ``PROMETHEUS`` (``.ci/install-prometheus.sh`` installs Debian's).
    """
    prometheus = require_tool("prometheus", PROMETHEUS)
    config = workdir / "prometheus.yml"
    rules = f"rule_files: ['{rule_file}']\n" if rule_file is not None else ""
    if out_of_order_window is not None:
        rules += f"storage:\n  tsdb:\n    out_of_order_time_window: {out_of_order_window}\n"
    ports = [target_port] if isinstance(target_port, int) else list(target_port or ())
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    keep = (
        "    metric_relabel_configs:\n"
        "      - source_labels: [__name__]\n"
        f"        regex: '{keep_metrics}'\n"
        "        action: keep\n"
        if keep_metrics is not None
        else ""
    )
    params = (
        "    params:\n      'name[]': [" + ", ".join(f"'{n}'" for n in scrape_names) + "]\n"
        if scrape_names
        else ""
    )
    static = f"    static_configs:\n      - targets: [{targets}]\n" if ports else ""
    files = (
        f"    file_sd_configs:\n      - files: ['{targets_file}']\n" if targets_file else ""
    )
    scrape = (
        "scrape_configs:\n"
        "  - job_name: rooftop\n"
        f"{static}"
        f"{files}"
        f"{keep}"
        f"{params}"
        if ports or targets_file
        else ""
    )
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval_s}s\n"
        f"  scrape_timeout: {scrape_interval_s}s\n"
        "  evaluation_interval: 1s\n"
        f"{rules}"
        f"{scrape}"
    )
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                *(["nice", "-n", str(nice)] if nice else []),
                prometheus,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                "--log.level=warn",
                *(["--web.enable-remote-write-receiver"] if remote_write_receiver else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NotifySocket:
    """A systemd notify socket (``$NOTIFY_SOCKET``) recording what a daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.5)

    def wait_for_watchdogs(
        self, proc: subprocess.Popen[Any], count: int = 2, timeout_s: float = 30.0
    ) -> None:
        """Record messages until ``count`` WATCHDOG=1 (or ``timeout_s``); ``proc`` must live."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.messages.count("WATCHDOG=1") < count:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None, proc.communicate()[0]

    def drain(self) -> None:
        """Record what is left (until half a second of silence)."""
        while True:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                return

    def close(self) -> None:
        self._sock.close()


def nvml_works() -> bool:
    """Whether a real NVIDIA driver answers here (probed in a child: init is process-wide)."""
    probe = "import pynvml; pynvml.nvmlInit()"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          check=False).returncode == 0
