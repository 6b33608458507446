"""Direct OTLP: the collector's fleet and export, inside the agent, with no collector process.

For sites that run an OpenTelemetry Collector on every node (``[otlp]`` in the
agent's config, see ``rooftop.agent.config``). The names, units and attributes are
exactly the collector's, because they come from the same code: the daemon's own
batches are applied to a local ``fleet.Fleet`` and exported by ``otel.Telemetry``,
whose ``METRICS`` is the one table (docs/METRICS.md). The agent does not import this
module: ``agentctl agent`` hands ``DirectExporter`` to the daemon as its ``BatchSink``
factory, which keeps the two roles apart.
Left out are the metrics of the agent → collector pipeline itself
(``rooftop.agent.*``, ``rooftop.collector.*``): there is no such pipeline here.

The resource says ``service.name = rooftop-agent`` (the collector's says
``rooftop-collector``); ``host.name`` is this node, on the resource and, as in the
collector's export, on every metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from rooftop.collector.fleet import Fleet, PoisonBatch, decode_batch
from rooftop.collector.otel import METRICS, MetricReader, Telemetry
from rooftop.common.otlp import OtlpExport
from rooftop.v1 import telemetry_pb2 as pb

__all__ = ["DIRECT_METRICS", "DirectExporter"]

log = logging.getLogger(__name__)

# Every metric but those describing the agent -> collector pipeline.
DIRECT_METRICS: tuple[str, ...] = tuple(
    m.name for m in METRICS if not m.name.startswith(("rooftop.agent.", "rooftop.collector."))
)


class DirectExporter:
    """The agent's own OTLP export: ``observe(batch)`` for every batch the daemon makes.

    Lifecycle like every component: ``start()``, ``flush(timeout_s)`` (export now),
    ``shutdown(timeout_s)`` (final export; idempotent).

    Args:
        export: where to push (None: only ``readers``, for tests).
        readers: extra OTel readers (a test's ``InMemoryMetricReader``).
        host_name: the resource's ``host.name`` (default: this host's name).
        clock: wall clock (Unix epoch seconds).
    """

    def __init__(
        self,
        export: OtlpExport | None,
        *,
        readers: Sequence[MetricReader] = (),
        host_name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self.fleet = Fleet(clock=clock)
        self.telemetry = Telemetry(
            self.fleet,
            otlp=[export] if export is not None else [],
            readers=readers,
            host_name=host_name,
            clock=clock,
            service_name="rooftop-agent",
            scope_name="rooftop.agent",
            metrics=DIRECT_METRICS,
        )
        self._invalid_logged = False

    def start(self) -> None:
        """Nothing to start: the periodic OTLP reader runs from construction."""
        self.telemetry.start()

    def observe(self, batch: pb.Batch) -> None:
        """Fold one batch into the local fleet (latency histograms recorded at once)."""
        received_s = self._clock()
        try:
            decoded = decode_batch(batch, received_s=received_s)
        except PoisonBatch as exc:
            # The agent made it, so this is a bug or a sensor gone mad: say so once.
            if not self._invalid_logged:
                self._invalid_logged = True
                log.warning("direct OTLP: batch %d not exported: %s", batch.seq, exc)
            return
        self.fleet.apply(decoded, received_s=received_s)
        self.telemetry.observe_batch(decoded, received_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export now; True when it finished in time."""
        return self.telemetry.flush(timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Final export, then stop (idempotent)."""
        self.telemetry.shutdown(timeout_s)
