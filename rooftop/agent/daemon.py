"""Daemon: ``agentctl agent`` — wiring only; every decision lives in the stage modules.

::

    sampler thread, every 1/rate_hz:  Sampler.tick ──► records ─┬─► pending records
                                                                 └─► this window's records
        every window_s:        build_window per GPU ─► classify ─► Hysteresis ─► verdicts
        every batch_interval_s: Batcher.make(records, verdicts) ─► Spool.append ─► wake
    spool writer thread:  ring ─► disk segments (fsync ≤ fsync_interval_s)
    stream thread:        spool ─► collector, acks ─► spool
    with [otlp]:          each batch ─► direct OTLP (a local fleet) ─► OTLP, no collector needed

TLS, mTLS and the bearer token come from the config (``ca_file``, ``cert_file``,
``key_file``, ``token_file``) through ``credentials.ClientAuth``, re-read at each reconnect.

SIGTERM / SIGINT → stop sampling, spool what is buffered, wait for the collector's
acks up to ``shutdown_timeout_s``, exit 0. What is not acked by then stays in the
spool for the next start. With systemd (``Type=notify``) it says ``READY=1`` once
running, ``WATCHDOG=1`` from the sampling loop and ``STOPPING=1`` on the way out.
With ``heartbeat_file`` set, the sampling loop also touches that file after each tick
(``rooftop.agent.heartbeat``): the Kubernetes probes' watchdog, ``agentctl alive``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from rooftop.agent.batcher import Batcher
from rooftop.agent.classifier import Hysteresis, classify
from rooftop.agent.config import AgentConfig, load_config
from rooftop.agent.credentials import ClientAuth
from rooftop.agent.diagnose import FakeSpec, open_backend, open_host_sensor
from rooftop.agent.engines.sources import EngineEndpoint, EngineSources
from rooftop.agent.heartbeat import Heartbeat
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import Clock, GpuBackend, HostSensor
from rooftop.agent.sensors.pods import PodResources, pod_order
from rooftop.agent.sensors.replay import ReplayBackend
from rooftop.agent.spool import Spool
from rooftop.agent.stream import Streamer
from rooftop.agent.window import DeviceKey, build_window, engines_by_device, on_monotonic_time
from rooftop.common import gcpolicy
from rooftop.common.codec import verdict_to_proto
from rooftop.common.errors import ConfigError, RooftopError
from rooftop.common.model import EngineSample, GpuSample, HostSample, Record
from rooftop.common.otlp import OtlpExport
from rooftop.common.systemd import StopSignals, sd_notify, watchdog_interval_s
from rooftop.common.threadnames import name_os_threads
from rooftop.v1 import telemetry_pb2 as pb

__all__ = ["Agent", "BatchSink", "backend_from_spec", "run_agent", "startup_checks"]

log = logging.getLogger(__name__)


class BatchSink(Protocol):
    """Where the daemon's batches also go, beside the spool: direct OTLP export.

    ``agentctl agent`` passes ``rooftop.collector.direct.DirectExporter``; the agent
    does not import the collector, so the two roles stay apart.
    """

    def start(self) -> None:
        """Begin exporting."""

    def observe(self, batch: pb.Batch) -> None:
        """Take one batch the daemon made (on the sampler thread; must not block)."""

    def flush(self, timeout_s: float) -> bool:
        """Export now; True when done within ``timeout_s``."""

    def shutdown(self, timeout_s: float) -> None:
        """Final export, then stop (idempotent)."""

def backend_from_spec(spec: str, fake_gpus: int = 1, node: str = "") -> GpuBackend:
    """The ``GpuBackend`` that ``backend`` in the config names.

    ``node`` (the agent id) gives a replayed GPU recorded without a real UUID one of
    its own, so that nodes replaying the same recording stay distinct GPUs.

    Raises:
        NvmlUnavailable: ``nvml`` without a driver.
        ConfigError: an unknown backend.
    """
    if spec == "nvml":
        return open_backend()
    if spec.startswith("fake:"):
        return open_backend(FakeSpec.parse(spec.removeprefix("fake:")), gpus=fake_gpus)
    if spec.startswith("replay:"):
        from rooftop.agent.trace import read_trace  # noqa: PLC0415

        return ReplayBackend(read_trace(Path(spec.removeprefix("replay:"))), node=node)
    raise ConfigError(f"backend: {spec!r} is not one of nvml, fake:PROFILE, replay:PATH")


def startup_checks(config: AgentConfig, *, channel_credentials: Any = None) -> ClientAuth | None:
    """What the agent refuses to start without, beyond the config's own validation.

    ``Agent`` runs these first, and ``agentctl config check`` runs exactly these, so a
    file the check calls valid is one the agent starts with: somewhere to send (a
    collector or an ``[otlp]`` endpoint); TLS, or plaintext asked for explicitly; the
    TLS files and the token readable now (``ClientAuth`` loads them strictly); a
    ``replay:`` recording readable. Not checked: the driver (``nvml``), which the check
    may run without, and the spool directory, which systemd creates at start.

    Args:
        config: the loaded configuration.
        channel_credentials: fixed gRPC credentials (tests): TLS files are not used.

    Returns:
        The ``ClientAuth`` the stream presents (None without collectors, or with
        ``channel_credentials``).

    Raises:
        ConfigError: naming the key and what is wrong.
    """
    if not config.collectors and config.otlp is None:
        raise ConfigError(
            "collectors: set at least one collector address (config file or "
            "ROOFTOP_COLLECTORS), or an [otlp] endpoint to export directly"
        )
    tls_configured = any(
        f is not None for f in (config.ca_file, config.cert_file, config.token_file)
    )
    if config.collectors and channel_credentials is None and not config.insecure:
        if not tls_configured:
            raise ConfigError(
                "insecure: TLS is not configured; set ca_file (cert_file and key_file for "
                "mTLS, token_file for a token), or insecure = true to stream in plaintext"
            )
    if config.backend.startswith("replay:"):
        recording = Path(config.backend.removeprefix("replay:"))
        try:
            with recording.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"backend: {recording}: cannot read: {exc.strerror}") from None
    if not config.collectors or channel_credentials is not None:
        return None
    return ClientAuth.from_config(config)


class Agent:
    """The node agent: sampler, windows, verdicts, spool and stream, wired together.

    Lifecycle: ``start()``, ``flush(timeout_s)``, ``shutdown(timeout_s)`` (idempotent);
    ``run()`` does all three around waiting for SIGTERM / SIGINT.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: GpuBackend | None = None,
        host: HostSensor | None = None,
        channel_credentials: Any = None,
        boot_id: str | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        env: Mapping[str, str] | None = None,
        direct_otlp: Callable[[OtlpExport, str], BatchSink] | None = None,
    ) -> None:
        """Open everything the agent needs; nothing runs until ``start()``.

        ``direct_otlp`` makes the sink for an ``[otlp]`` endpoint in the config.

        Raises:
            ConfigError: no collector (nor OTLP endpoint), plaintext not explicitly
                allowed, or unreadable TLS files or token; an ``[otlp]`` endpoint
                without ``direct_otlp``.
            NvmlUnavailable: the config says ``nvml`` and there is no driver.
        """
        auth = startup_checks(config, channel_credentials=channel_credentials)
        self.config = config
        self.boot_id = boot_id or str(uuid.uuid4())
        self._env = os.environ if env is None else env
        self._monotonic = monotonic
        self.backend = backend or backend_from_spec(
            config.backend, config.fake_gpus, config.agent_id
        )
        if host is None and config.host_sensor:
            host = self._open_host_sensor(self.backend)
        self.engines = EngineSources(
            config.hook_socket or None,
            [EngineEndpoint.parse(url) for url in config.engine_urls],
            extra=[self.backend] if isinstance(self.backend, ReplayBackend) else (),
        )
        # Kubernetes: GPU -> pod attribution from the kubelet (inert without its socket).
        self.pods = PodResources(
            config.pod_resources_socket, refresh_s=config.pod_resources_refresh_s
        )
        self.sampler = Sampler(
            self.backend, host, clock=clock, engines=self.engines, pods=self.pods
        )
        # Direct OTLP export only (no collector): no spool, no stream.
        self.spool: Spool | None = None
        self.streamer: Streamer | None = None
        if config.collectors:
            self.spool = Spool(
                config.spool_dir,
                max_bytes=config.spool_max_bytes,
                segment_bytes=config.spool_segment_bytes,
                fsync_interval_s=config.fsync_interval_s,
            )
        self.batcher = Batcher(
            config.agent_id,
            self.boot_id,
            hostname=config.hostname or None,
            max_batch_bytes=config.batch_max_bytes,
            max_batch_samples=config.batch_max_samples,
            columns=config.batch_format == "columns",
        )
        if self.spool is not None:
            self.streamer = Streamer(
                self.spool,
                config.collectors,
                channel_credentials=channel_credentials,
                # Given credentials are fixed (tests); else files re-read per connection.
                auth=auth,
                agent_id=config.agent_id,
                keepalive_time_s=config.keepalive_time_s,
                keepalive_timeout_s=config.keepalive_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                ack_timeout_s=config.ack_timeout_s,
                max_message_bytes=config.max_message_bytes,
                backoff_base_s=config.backoff_base_s,
                backoff_max_s=config.backoff_max_s,
                return_home_after_s=config.return_home_after_s,
                home_probe_interval_s=config.home_probe_interval_s,
                resolve_interval_s=config.resolve_interval_s,
                engine_scrape_errors=self.engines.scrape_errors,
                auto_columns=config.batch_format == "auto",
            )
        self.otlp: BatchSink | None = None
        if config.otlp is not None:
            if direct_otlp is None:
                raise ConfigError(
                    "otlp: direct OTLP export is not available here "
                    "(run the agent with agentctl agent)"
                )
            # The resource's host.name is the node (config, $NODE_NAME), as on the series:
            # in a pod, this machine's own name is the pod's generated one.
            self.otlp = direct_otlp(config.otlp, config.hostname or socket.gethostname())
        self.hysteresis = Hysteresis(hold=config.hysteresis_windows)

        self._lock = threading.Lock()  # the buffers below: sampler thread vs flush
        self._records: list[Record] = []  # the model's: the batcher encodes them once
        self._verdicts: list[pb.Verdict] = []
        # (monotonic time, records) per tick: windows are timed on the monotonic clock.
        self._window: list[tuple[float, list[Record]]] = []
        self._held_engines: list[EngineSample] = []
        self._window_start_s = 0.0
        self._last_batch_s = 0.0
        self._watchdog_s = watchdog_interval_s(self._env)
        self._last_watchdog_s = -float("inf")
        # The kubelet's stand-in for the watchdog: `agentctl alive` reads this file.
        self.heartbeat = Heartbeat(config.heartbeat_file, monotonic=monotonic)
        self._stop = threading.Event()  # stops the sampler thread
        self._thread: threading.Thread | None = None
        self._shut = False

    @staticmethod
    def _open_host_sensor(backend: GpuBackend) -> HostSensor | None:
        try:
            return open_host_sensor(backend)
        except (ImportError, RooftopError, OSError) as exc:
            log.warning("host sensor unavailable (%s): verdicts will lack CPU evidence", exc)
            return None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the spool writer, the stream and the sampler (idempotent)."""
        if self._thread is not None or self._shut:
            return
        if self.spool is not None and self.streamer is not None:
            self.spool.start()
            self.streamer.start()
        if self.otlp is not None:
            self.otlp.start()
        self.engines.start()
        self.pods.start()  # one List before the first tick, so it carries the pods
        for warning in self.engines.warnings:
            log.warning("%s", warning)
        self.heartbeat.clear()  # a previous container's heartbeat is not this one's
        now = self._monotonic()
        self._window_start_s = self._last_batch_s = now
        self._thread = threading.Thread(target=self._sample_loop, name="rooftop-sampler")
        self._thread.start()
        # Every thread is running now: name them for top -H and per-thread CPU figures.
        name_os_threads()
        gpus = len(self.sampler.devices)
        log.info(
            "agent %s (boot %s): %d GPU(s) at %g Hz → %s",
            self.config.agent_id,
            self.boot_id,
            gpus,
            self.config.rate_hz,
            ", ".join(self.config.collectors)
            + (f" otlp {self.config.otlp.endpoint}" if self.config.otlp is not None else ""),
        )
        sd_notify(f"READY=1\nSTATUS=sampling {gpus} GPU(s)", self._env)

    def flush(self, timeout_s: float) -> bool:
        """Spool what is buffered and wait until the collector acked it all."""
        deadline = self._monotonic() + timeout_s
        self._emit()
        ok = True
        if self.spool is not None and self.streamer is not None:
            self.spool.flush(timeout_s)
            ok = self.streamer.flush(max(0.0, deadline - self._monotonic()))
        if self.otlp is not None:
            ok = self.otlp.flush(max(0.0, deadline - self._monotonic())) and ok
        return ok

    def shutdown(self, timeout_s: float) -> None:
        """Stop sampling, final flush, close everything (idempotent)."""
        if self._shut:
            return
        self._shut = True
        deadline = self._monotonic() + timeout_s
        sd_notify("STOPPING=1", self._env)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - self._monotonic()))
        self.heartbeat.clear()
        self._emit()
        if self.spool is not None and self.streamer is not None:
            self.spool.flush(max(0.0, deadline - self._monotonic()))
            self.streamer.shutdown(max(0.0, deadline - self._monotonic()))
            self.spool.shutdown(max(0.0, deadline - self._monotonic()))
        if self.otlp is not None:  # after the stream, which gets the shutdown budget first
            self.otlp.shutdown(max(0.1, deadline - self._monotonic()))
        self.engines.shutdown(max(0.1, deadline - self._monotonic()))
        self.pods.shutdown(max(0.1, deadline - self._monotonic()))
        self.backend.close()
        left = self.spool.stats() if self.spool is not None else None
        if left is not None and left.queued:
            log.warning("stopped with %d batch(es) unacked: kept in the spool", left.queued)
        log.info("agent stopped (last seq %d)", self.batcher.last_seq)

    def run(self) -> int:
        """Start, wait for SIGTERM or SIGINT, shut down gracefully; the exit status."""
        gc_before: tuple[int, int, int] | None = None
        with StopSignals() as signals:
            try:
                self.start()
                gc_before = gcpolicy.tune()  # what start() loaded lives as long as we do
                while (name := signals.wait()) is None:
                    pass
                log.info("%s: shutting down", name)
            finally:
                self.shutdown(self.config.shutdown_timeout_s)
                if gc_before is not None:
                    gcpolicy.restore(gc_before)
        return 0

    # --- the sampler thread ---------------------------------------------------------

    def _sample_loop(self) -> None:
        period_s = 1.0 / self.config.rate_hz
        start_s = self._monotonic()
        ticks = 0
        while not self._stop.is_set():
            try:
                # Monotonic time as the tick starts, when the sampler reads the wall clock.
                tick_s = self._monotonic()
                self._on_tick(self.sampler.tick(), tick_s)
            except Exception:  # thread boundary: one bad tick must not stop sampling
                log.exception("sampling tick failed; going on")
            self._watchdog()
            self.heartbeat.beat()
            ticks += 1
            now_s = self._monotonic()
            # Absolute deadlines keep the rate; after a stall, skip ticks, do not burst.
            ticks = max(ticks, int((now_s - start_s) / period_s) + 1)
            self._stop.wait(max(0.0, start_s + ticks * period_s - now_s))

    def _on_tick(self, records: list[Record], tick_s: float) -> None:
        now_s = self._monotonic()
        with self._lock:
            # The window closes before this tick's samples, which open the next one.
            if self._window and now_s - self._window_start_s >= self.config.window_s - 1e-3:
                self._window_start_s = now_s
                window, self._window = self._window, []
                # Wall time is a label: a step of it inside the window must not weigh.
                self._verdicts.extend(self._classify(on_monotonic_time(window)))
            self._records.extend(records)
            self._window.append((tick_s, records))
            due = now_s - self._last_batch_s >= self.config.batch_interval_s - 1e-3
        if due or len(self._records) >= self.config.batch_max_samples:
            self._last_batch_s = now_s
            self._emit()

    def _classify(self, records: list[Record]) -> list[pb.Verdict]:
        # By device: each MIG instance is judged on its own, apart from its parent.
        by_gpu: dict[DeviceKey, list[GpuSample]] = {}
        hosts = [r for r in records if isinstance(r, HostSample)]
        engines = [r for r in records if isinstance(r, EngineSample)]
        for r in records:
            if isinstance(r, GpuSample):
                by_gpu.setdefault(DeviceKey.of(r), []).append(r)
        # An engine reports once per its interval, which may straddle the window's
        # start: the previous window's reports let a held state cover that edge.
        with_held = [*self._held_engines, *engines]
        if engines:
            self._held_engines = engines
        verdicts = []
        device_engines = engines_by_device(by_gpu, with_held)  # an engine's MIG instance
        for key, samples in sorted(by_gpu.items()):
            window = build_window(
                samples, device_engines[key], hosts, sole_gpu=len(by_gpu) == 1
            )
            verdict = self.hysteresis.update(classify(window))
            # Every container that held the GPU in the window (a held verdict keeps its
            # regime, but the pods are this window's).
            pods = tuple(sorted({p for s in samples for p in s.pods}, key=pod_order))
            if pods or verdict.pods:
                verdict = dataclasses.replace(verdict, pods=pods)
            verdicts.append(verdict_to_proto(verdict))
        return verdicts

    def _emit(self) -> None:
        with self._lock:
            records, self._records = self._records, []
            verdicts, self._verdicts = self._verdicts, []
            if self.config.batch_format == "auto" and self.streamer is not None:
                # Columns while the last ack said the collector reads them (an outage
                # too: the spool holds columns); the stream turns a batch into records
                # for a collector that has not said so.
                self.batcher.columns = self.streamer.collector_reads_columns
            for batch in self.batcher.make(records, verdicts):
                if self.otlp is not None:
                    self.otlp.observe(batch)  # before the spool: the stream thread sets stats
                if self.spool is not None:
                    self.spool.append(batch)
        if self.streamer is not None:
            self.streamer.wake()

    def _watchdog(self) -> None:
        if self._watchdog_s is None:
            return
        now_s = self._monotonic()
        if now_s - self._last_watchdog_s >= self._watchdog_s:
            self._last_watchdog_s = now_s
            sd_notify("WATCHDOG=1", self._env)


def run_agent(
    config_path: Path | None,
    *,
    fake: str | None = None,
    fake_gpus: int | None = None,
    log_level: str = "info",
    direct_otlp: Callable[[OtlpExport, str], BatchSink] | None = None,
) -> int:
    """``agentctl agent``: load the config, run until SIGTERM; the exit status.

    ``direct_otlp`` makes the sink for an ``[otlp]`` endpoint (see ``Agent``).

    Raises:
        ConfigError: a bad config (one line, naming the key).
        NvmlUnavailable: ``backend = "nvml"`` on a host without a driver.
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    overrides: dict[str, Any] = {}
    if fake is not None:
        overrides["backend"] = f"fake:{fake}"
    if fake_gpus is not None:
        overrides["fake_gpus"] = fake_gpus
    config = load_config(config_path, overrides=overrides)
    return Agent(config, direct_otlp=direct_otlp).run()
