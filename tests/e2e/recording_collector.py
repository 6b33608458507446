"""``agentctl collector`` with a test-side observer: one JSON line per applied batch.

Run as ``python -m tests.e2e.recording_collector RECORD_FILE collector --config …``.
Everything after RECORD_FILE goes to the real ``agentctl`` CLI unchanged (config
loading, signals, graceful shutdown, Prometheus endpoint); the only addition is a
wrapper around ``Fleet.apply`` that appends (agent_id, boot_id, seq, samples, sample
times, in-band agent stats) to RECORD_FILE. ``Fleet.apply`` runs after the ingest's
de-duplication and before the ack, so a line exists for every batch the collector
applied (each application, not each arrival: duplicates the ingest drops are not
written, and show in ``rooftop_collector_duplicates`` instead), and it exists before
the agent sees the ack. The file is opened for appending and written line-buffered:
a collector restarted on the same file appends, and a SIGKILL loses no written line.

This is how the end-to-end tests count by seq, as the OpenTelemetry Collector's
testbed does with its data receiver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from rooftop.cli import main
from rooftop.collector.fleet import DecodedBatch, Fleet


def install(path: str) -> None:
    """Wrap ``Fleet.apply`` so that every applied batch is appended to ``path``."""
    out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 — lives as long as we do
    original = Fleet.apply
    pid = os.getpid()

    def apply(self: Fleet, batch: DecodedBatch, *, received_s: float) -> None:
        original(self, batch, received_s=received_s)
        line: dict[str, Any] = {
            "agent_id": batch.agent_id,
            "boot_id": batch.boot_id,
            "seq": batch.seq,
            "samples": batch.samples,
            "newest_sample_s": batch.newest_sample_s,
            "oldest_sample_s": batch.oldest_sample_s,
            "skewed": batch.skewed,
            "received_s": received_s,
            "stats": dataclasses.asdict(batch.stats) if batch.stats is not None else None,
            "collector_pid": pid,
            # GPU samples that came as columns (Batch.gpu_columns), not records.
            "gpu_columns_rows": batch.raw.gpu_columns.rows if batch.raw is not None else 0,
        }
        out.write(json.dumps(line) + "\n")

    Fleet.apply = apply  # type: ignore[method-assign]


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["agentctl", *sys.argv[2:]]
    main()
