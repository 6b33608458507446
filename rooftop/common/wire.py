"""What agent and collector agree on beyond the schema: call metadata and size limits."""

from __future__ import annotations

__all__ = ["AGENT_ID_METADATA", "DEFAULT_MAX_MESSAGE_BYTES", "INGEST_SERVICE", "QUERY_SERVICE"]

# The agent's claimed id, as call metadata: checked against its client certificate
# (mTLS) before the collector runs any handler. Each batch's agent_id is checked too.
AGENT_ID_METADATA = "x-rooftop-agent-id"
# A batch (≤ 1 MiB) with headroom for its stats and framing; the collector must accept it.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The gRPC services of rooftop/v1/telemetry.proto, as call paths and health checks name them.
INGEST_SERVICE = "rooftop.v1.Ingest"
QUERY_SERVICE = "rooftop.v1.Query"
