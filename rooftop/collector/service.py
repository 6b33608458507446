"""Wiring: ingest → fleet → OpenTelemetry, run until SIGTERM. No logic of its own.

Under systemd (``Type=notify``) ``run`` says ``READY=1`` once both ports are bound,
``WATCHDOG=1`` from its main loop every ``WatchdogSec/2`` and ``STOPPING=1`` when a
signal ends it, through the agent daemon's ``sd_notify``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from rooftop.collector.config import CollectorConfig, SecurityMode
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.collector.otel import MetricReader, Telemetry
from rooftop.collector.remote_write import RemoteWriter, redacted_url
from rooftop.common import gcpolicy
from rooftop.common.systemd import StopSignals, sd_notify, watchdog_interval_s

__all__ = ["Collector", "run", "security_summary"]

log = logging.getLogger(__name__)

# The main loop wakes at least this often to notice ``stop`` (and feed the watchdog).
_LOOP_S = 1.0


class Collector:
    """The whole collector: ``start()``, ``flush(timeout_s)``, ``shutdown(timeout_s)``.

    Args:
        config: a validated ``CollectorConfig``.
        readers: extra OTel metric readers (tests).
        clock: wall clock (Unix epoch seconds).
    """

    def __init__(
        self,
        config: CollectorConfig,
        *,
        readers: Sequence[MetricReader] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.fleet = Fleet(
            clock=clock,
            forget_after_s=config.forget_after_s,
            limits=config.fleet_limits(),
            disconnected_series_s=config.disconnected_series_s,
        )
        self.telemetry = Telemetry(
            self.fleet,
            prometheus_listen=config.prometheus_listen,
            # Kubernetes' probes (deploy/k8s): live while ingest's loop answers and its
            # apply thread is not stuck on one batch, ready while it also serves and is
            # not shutting down.
            prometheus_checks={
                "/healthz": lambda: self.ingest.health_problem(ready=False),
                "/readyz": lambda: self.ingest.health_problem(ready=True),
            },
            dcgm_names=config.prometheus_dcgm_names,
            prometheus_max_connections=config.prometheus_max_connections,
            prometheus_timeout_s=config.prometheus_timeout_s,
            otlp=config.otlp,
            readers=readers,
            max_series_per_metric=config.max_series_per_metric,
            clock=clock,
        )
        # One remote-write output per [[remote_write]]: every sample at its own time.
        self.remote_writers = [
            RemoteWriter(rw, self.telemetry.points) for rw in config.remote_write
        ]
        for writer in self.remote_writers:
            self.telemetry.add_remote_write(redacted_url(writer.config.url), writer.stats)
        self.ingest = IngestServer(
            self.fleet, config, observers=[self.telemetry, *self.remote_writers], clock=clock
        )

    def start(self) -> None:
        """Serve metrics first, then accept agents (so nothing applied goes unexported)."""
        self.telemetry.start()
        for writer in self.remote_writers:
            writer.start()
        try:
            self.ingest.start()
        except BaseException:
            self.telemetry.shutdown(timeout_s=1.0)
            for writer in self.remote_writers:
                writer.shutdown(timeout_s=1.0)
            raise

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export what the fleet holds now."""
        ok = self.ingest.flush(timeout_s) and self.telemetry.flush(timeout_s)
        return all([writer.flush(timeout_s) for writer in self.remote_writers]) and ok

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting agents (grace for open streams), then a final export. Idempotent."""
        self.ingest.shutdown(timeout_s=min(timeout_s, 5.0))
        for writer in self.remote_writers:
            writer.shutdown(timeout_s=min(timeout_s, 5.0))
        self.telemetry.shutdown(timeout_s=timeout_s)


def security_summary(config: CollectorConfig) -> str:
    """How agents must authenticate, in words: ``mTLS + token``, ``PLAINTEXT``, …."""
    mode = config.security_mode
    text = "PLAINTEXT" if mode is SecurityMode.PLAINTEXT else mode.value
    if config.read_token_file is not None:
        text += " + read-only token"
    if not mode.authenticates:
        text += ", no authentication"
    return text


def run(
    config: CollectorConfig,
    *,
    echo: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a collector until SIGTERM or SIGINT (or ``stop`` is set), then shut down.

    Args:
        config: a validated config.
        echo: where the bound addresses are announced (one line each).
        stop: an event that ends the run (tests), noticed within a second.
        env: where ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` are read (``os.environ``).
    """
    # Configs built in code get the start-up checks too, the open-door refusal included.
    config = config.validated()
    stop = stop or threading.Event()
    env = os.environ if env is None else env
    watchdog_s = watchdog_interval_s(env)
    collector = Collector(config)
    # Handlers first: a SIGTERM during start-up still shuts down gracefully.
    with StopSignals() as signals:
        _serve(collector, config, echo, stop, signals, env, watchdog_s)


def _serve(
    collector: Collector,
    config: CollectorConfig,
    echo: Callable[[str], None],
    stop: threading.Event,
    signals: StopSignals,
    env: Mapping[str, str],
    watchdog_s: float | None,
) -> None:
    # Start, announce, feed the watchdog until a signal or ``stop``, then shut down.
    gc_before: tuple[int, int, int] | None = None
    try:
        collector.start()
        gc_before = gcpolicy.tune()
        host = config.listen.rpartition(":")[0]
        echo(
            f"rooftop collector: ingest on {host}:{collector.ingest.port} "
            f"({security_summary(config)}; Query and health on the same port)"
        )
        port = collector.telemetry.prometheus_port
        if port is not None:
            phost = config.prometheus_listen.rpartition(":")[0]
            echo(f"rooftop collector: prometheus on http://{phost}:{port}/metrics")
        for exp in config.otlp:
            every = f"every {exp.interval_s:g} s"
            echo(f"rooftop collector: otlp {exp.protocol} to {exp.endpoint} {every}")
        sd_notify(f"READY=1\nSTATUS=ingest on port {collector.ingest.port}", env)
        # WATCHDOG=1 every WatchdogSec/2 from this loop: a wedged process stops the pings.
        wait_s = _LOOP_S if watchdog_s is None else min(_LOOP_S, watchdog_s)
        last_ping_s = -float("inf")
        while True:
            now_s = time.monotonic()
            if watchdog_s is not None and now_s - last_ping_s >= watchdog_s:
                last_ping_s = now_s
                sd_notify("WATCHDOG=1", env)
            name = signals.wait(wait_s)
            if name is not None:
                log.info("%s: shutting down", name)
                break
            if stop.is_set():
                break
    finally:
        sd_notify("STOPPING=1", env)
        collector.shutdown()
        if gc_before is not None:
            gcpolicy.restore(gc_before)
        echo("rooftop collector: stopped")
