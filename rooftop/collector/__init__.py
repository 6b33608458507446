"""Rooftop collector: ingest agent streams, keep fleet state, export OpenTelemetry metrics.

The flow, one module per stage: ``ingest`` (gRPC bidi stream, dedup by agent, boot,
seq) → ``fleet`` (latest state per agent, GPU and engine) → ``otel`` (observable
gauges over the fleet state, OTLP and Prometheus). ``service`` wires them together
and ``config`` reads the TOML file.
"""

__all__: list[str] = []
