"""Dedup table bench: legitimate ingest throughput with a table of 1k keys vs a full 100k.

Issue 14.3: eviction scanned every key, so with the table full at 100k (agent_id,
boot_id) pairs (a token holder spraying boot ids fills it) each new pair cost a scan
and legitimate throughput fell from 6,611 to 52 batches/s. Eviction is O(1) now (an
``OrderedDict`` LRU). Both phases run in the same process and run, so the ratio holds
on any machine:

1. ``1k``: the table holds 1,000 pairs, far below its bound: no eviction.
2. ``100k full``: the table is full (100,000 pairs); every batch comes from a new boot,
   so every batch evicts (the worst case for legitimate traffic).

Each phase: a real in-process ingest server on loopback, one client stream sending
``--batches`` one-sample batches, timed from the first send to the last ack. Also the
bare ``Deduplicator`` (commits per second, eviction on every commit).

Usage: .venv/bin/python bench/bench_dedup.py [--batches 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.collector.helpers: the real client stream

from rooftop.collector.dedup import DEFAULT_MAX_KEYS, Deduplicator  # noqa: E402
from tests.collector.helpers import AgentStream, batch, gpu, start_server  # noqa: E402


def fill(dedup: Deduplicator, keys: int) -> None:
    for i in range(keys):
        dedup.commit((f"filler-{i}", "boot"), 1, first_on_stream=True)


def ingest_batches_per_s(keys: int, batches: int, *, new_boot_each: bool) -> float:
    server, _ = start_server()
    try:
        fill(server.servicer.dedup, keys)
        sample = gpu(0)
        msgs = [
            batch(1, boot_id=f"boot-{i}", records=[sample])
            if new_boot_each
            else batch(i + 1, records=[sample])
            for i in range(batches)
        ]
        with AgentStream(f"127.0.0.1:{server.port}") as stream:
            start_s = time.perf_counter()
            stream.send(*msgs)
            if new_boot_each:
                stream.wait(lambda acks: any(a.boot_id == f"boot-{batches - 1}" for a in acks), 120)
            else:
                stream.wait_acked(batches, 120)
            return batches / (time.perf_counter() - start_s)
    finally:
        server.shutdown(timeout_s=1)


def commits_per_s(keys: int, commits: int) -> float:
    dedup = Deduplicator(max_keys=keys)
    fill(dedup, keys)
    start_s = time.perf_counter()
    for i in range(commits):
        dedup.commit((f"agent-{i}", "boot"), 1, first_on_stream=True)
    return commits / (time.perf_counter() - start_s)


def main() -> None:
    """Run both phases and print batches/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    small = ingest_batches_per_s(1_000, args.batches, new_boot_each=False)
    full = ingest_batches_per_s(DEFAULT_MAX_KEYS, args.batches, new_boot_each=True)
    print(f"ingest, table of 1k pairs:                      {small:8.0f} batches/s")
    print(f"ingest, table full at 100k, every batch evicts: {full:8.0f} batches/s")
    print(f"ratio 100k-full / 1k:                           {full / small:8.2f}")
    c_small = commits_per_s(1_000, 20_000)
    c_full = commits_per_s(DEFAULT_MAX_KEYS, 20_000)
    print(f"Deduplicator.commit with eviction, 1k: {c_small:10.0f}/s, 100k: {c_full:10.0f}/s "
          f"(ratio {c_full / c_small:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
