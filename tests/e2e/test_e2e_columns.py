"""A real agent sending columnar batches (``batch_format = "columns"``, or the default
``"auto"`` once the collector's ack says it reads them) to a real collector.

Every batch arrives once, in order, with its GPU samples as columns, and the collector
serves both fake GPUs from them, as it does for records.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Harness, assert_each_once, wait_for

pytestmark = pytest.mark.slow


def test_an_agent_in_columnar_mode_delivers_every_batch_and_sample(e2e: Harness):
    c = e2e.collector()
    a = e2e.agent("node-col", c.address, batch_format="columns")
    wait_for(lambda: len(c.ledger().of(a.agent_id)) >= 10, "10 batches applied", procs=(a, c))
    last = a.stop()

    ledger = c.ledger()
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), last)
    batches = ledger.of(a.agent_id, a.boot_id)
    samples = ledger.samples(a.agent_id, a.boot_id)
    columns = sum(b.gpu_columns_rows for b in batches)
    # 2 GPUs per tick as columns; the host sample of each tick stays a record.
    assert columns > 0 and all(b.gpu_columns_rows for b in batches if b.samples > 1)
    assert samples - columns <= columns / 2 + len(batches)
    assert c.metric("rooftop_collector_batches_total") == last
    assert c.metric("rooftop_collector_rejected_total") == 0
    busy = {labels for (name, labels), _ in c.metrics().items() if name == "hw_gpu_utilization"}
    assert len(busy) == 2  # both fake H100s, from their columns' newest rows


def test_an_agent_at_the_default_format_sends_columns_once_the_collector_says_it_reads_them(
    e2e: Harness,
):
    # batch_format "auto" (the default): records until the first ack says columns.
    c = e2e.collector()
    a = e2e.agent("node-auto", c.address)
    wait_for(lambda: len(c.ledger().of(a.agent_id)) >= 10, "10 batches applied", procs=(a, c))
    last = a.stop()

    ledger = c.ledger()
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), last)
    with_gpus = [b for b in ledger.of(a.agent_id, a.boot_id) if b.samples > 1]
    as_columns = [b.gpu_columns_rows > 0 for b in with_gpus]
    # Only what left before the first ack came back can be records: a prefix, then columns.
    assert as_columns == sorted(as_columns) and as_columns[-5:] == [True] * 5, as_columns
    assert c.metric("rooftop_collector_rejected_total") == 0
