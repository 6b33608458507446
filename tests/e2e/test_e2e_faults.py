"""Fault matrix with REAL processes, counted by seq end to end (DESIGN §7, §9).

A real ``agentctl agent`` (fake H100s) streams to a real ``agentctl collector``; the
collector records every batch it applies (``recording_collector.py``), so each test
asserts exactly which (agent_id, boot_id, seq) arrived and how often, next to the
collector's Prometheus counters and the agent's in-band stats. Each test prints one
``E2E <scenario> {json}`` line with what it measured (``pytest -s`` shows them;
docs/FAULTS.md tabulates them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc  # noqa: TID251 — a raw client for poison / oversized messages and health
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rooftop.agent.spool import Spool
from rooftop.common.codec import record_to_proto
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu
from tests.e2e.conftest import (
    AGENT_DEFAULTS,
    AgentProc,
    CollectorProc,
    Harness,
    assert_each_once,
    holes,
    wait_for,
)

pytestmark = pytest.mark.slow

BATCH_S = AGENT_DEFAULTS["batch_interval_s"]
FSYNC_S = AGENT_DEFAULTS["fsync_interval_s"]
TICK_S = 1 / AGENT_DEFAULTS["rate_hz"]
# A loaded 2-core machine delays threads by this much now and then.
SCHEDULING_SLACK_S = 0.3


def report(scenario: str, **figures: Any) -> None:
    print(f"\nE2E {scenario} {json.dumps(figures, sort_keys=True)}")


def applied(c: CollectorProc, agent: AgentProc, boot_id: str | None = None) -> int:
    return len(c.ledger().of(agent.agent_id, boot_id or agent.boot_id))


def wait_applied(c: CollectorProc, agent: AgentProc, n: int, *, timeout_s: float = 20.0,
                 boot_id: str | None = None) -> None:  # fmt: skip
    wait_for(lambda: applied(c, agent, boot_id) >= n, f"{n} batches of {agent.agent_id} applied",
             timeout_s=timeout_s, procs=(agent, c))  # fmt: skip


def spooled_seqs(spool_dir: Path, tmp: Path) -> dict[str, list[int]]:
    """What a spool directory holds unacked, per boot (read from a copy: no side effects)."""
    copy = tmp / f"spool-copy-{time.monotonic_ns()}"
    shutil.copytree(spool_dir, copy)
    spool = Spool(copy)
    try:
        out: dict[str, list[int]] = {}
        for b in spool.pending(1_000_000):
            out.setdefault(b.boot_id, []).append(b.seq)
        return out
    finally:
        spool.shutdown(1)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        return int(stub.Check(request, timeout=5).status)  # type: ignore[attr-defined]


# The scenarios where the transport matters run plaintext and through the TLS gate.
TRANSPORTS = pytest.mark.parametrize("e2e", ["plaintext", "mtls"], indirect=True)


# --- (a) collector unreachable, then back ----------------------------------------------------


@TRANSPORTS
def test_a_collector_unreachable_then_back_loses_nothing_and_dedups(e2e: Harness):
    c = e2e.collector()
    proxy = e2e.proxy(c.port)
    a = e2e.agent("node-a", proxy.address)
    wait_applied(c, a, 10)
    proxy.cut()  # every connection reset, new ones refused: the collector is gone
    outage_s = 2.0
    time.sleep(outage_s)
    during = applied(c, a)
    proxy.restore()
    wait_for(lambda: c.ledger().last_stats(a.agent_id)["reconnects"] >= 1, "reconnect",
             procs=(a, c))  # fmt: skip
    last = a.stop()

    ledger = c.ledger()
    seqs = ledger.seqs(a.agent_id, a.boot_id)
    assert_each_once(seqs, last)
    assert last - during >= outage_s / BATCH_S * 0.7  # the outage's batches were spooled
    duplicates = c.metric("rooftop_collector_duplicates_total")
    assert c.metric("rooftop_collector_missing_total") == 0
    assert c.metric("rooftop_collector_batches_total") == last
    stats = ledger.last_stats(a.agent_id)
    report("a_unreachable", outage_s=outage_s, batches=last, spooled_in_outage=last - during,
           lost=0, duplicates_dropped=duplicates, applied_twice=0, reconnects=stats["reconnects"],
           samples=ledger.samples(a.agent_id, a.boot_id))  # fmt: skip


# --- (b) agent SIGKILLed and restarted ----------------------------------------------------


def _check_killed_boot(c: CollectorProc, a: AgentProc, old_boot: str, killed_s: float
                       ) -> dict[str, Any]:  # fmt: skip
    """The killed boot's applied seqs have no hole; its lost tail fits the fsync window."""
    ledger = c.ledger()
    seqs = ledger.seqs(a.agent_id, old_boot)
    top = max(seqs)
    assert holes(seqs, top) == []
    assert max(seqs.values()) == 1
    newest = max(b.newest_sample_s or 0.0 for b in ledger.of(a.agent_id, old_boot))
    lost_s = killed_s - newest
    # Unsent, unwritten data at the kill: the batch being filled, the ring the writer
    # has not written yet (≤ one fsync interval), a tick.
    assert lost_s <= FSYNC_S + BATCH_S + TICK_S + SCHEDULING_SLACK_S, lost_s
    return {"old_boot_batches": top, "lost_tail_s": round(lost_s, 3),
            "lost_tail_batches_est": max(0, math.ceil((lost_s - TICK_S) / BATCH_S))}  # fmt: skip


def test_b1_agent_sigkilled_mid_stream_resends_its_spool(e2e: Harness):
    c = e2e.collector()
    a = e2e.agent("node-b1", c.address)
    wait_applied(c, a, 15)
    old_boot = a.boot_id
    a.kill()
    killed_s = time.time()
    time.sleep(0.3)  # what was on the wire lands
    before_restart = c.ledger().seqs(a.agent_id, old_boot)
    on_disk = spooled_seqs(a.spool_dir, e2e.tmp_path).get(old_boot, [])

    a.start()
    wait_applied(c, a, 10)
    last = a.stop()
    figures = _check_killed_boot(c, a, old_boot, killed_s)
    ledger = c.ledger()
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), last)
    resent = [s for s in on_disk if s not in before_restart]
    report("b1_sigkill_mid_stream", **figures, unacked_on_disk_at_kill=len(on_disk),
           delivered_by_next_boot=len(resent),
           duplicates_dropped=c.metric("rooftop_collector_duplicates_total"),
           missing=c.metric("rooftop_collector_missing_total"), new_boot_batches=last)  # fmt: skip


def test_b2_agent_sigkilled_during_an_outage_loses_at_most_the_fsync_window(e2e: Harness):
    c = e2e.collector()
    proxy = e2e.proxy(c.port)
    a = e2e.agent("node-b2", proxy.address)
    wait_applied(c, a, 5)
    proxy.cut()
    time.sleep(1.6)  # everything from here on is only in the spool
    old_boot = a.boot_id
    a.kill()
    killed_s = time.time()
    on_disk = spooled_seqs(a.spool_dir, e2e.tmp_path).get(old_boot, [])
    before_restart = set(c.ledger().seqs(a.agent_id, old_boot))
    proxy.restore()

    a.start()
    wait_applied(c, a, 10)
    last = a.stop()
    figures = _check_killed_boot(c, a, old_boot, killed_s)
    ledger = c.ledger()
    old = ledger.seqs(a.agent_id, old_boot)
    # Everything the killed process had written was resent by the next one.
    assert set(on_disk) <= set(old)
    assert len(set(on_disk) - before_restart) >= 10
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), last)
    report("b2_sigkill_in_outage", **figures, unacked_on_disk_at_kill=len(on_disk),
           delivered_by_next_boot=len(set(on_disk) - before_restart),
           duplicates_dropped=c.metric("rooftop_collector_duplicates_total"),
           missing=c.metric("rooftop_collector_missing_total"), new_boot_batches=last)  # fmt: skip


# --- (c) spool full ----------------------------------------------------------------------


def test_c_spool_full_drops_oldest_counts_them_and_keeps_sampling(e2e: Harness):
    c = e2e.collector()
    proxy = e2e.proxy(c.port)
    # 16 KiB of 4 KiB segments: ~14 batches of ~1 KiB, about 1.4 s of data.
    a = e2e.agent("node-c", proxy.address, spool_max_bytes=16384, spool_segment_bytes=4096)
    wait_applied(c, a, 5)
    proxy.cut()
    outage_s = 4.0
    time.sleep(outage_s)
    proxy.restore()
    wait_for(lambda: c.ledger().last_stats(a.agent_id)["dropped_spool_full"] > 0,
             "dropped_spool_full reported in-band", procs=(a, c))  # fmt: skip
    last = a.stop()

    ledger = c.ledger()
    seqs = ledger.seqs(a.agent_id, a.boot_id)
    gap = holes(seqs, last)
    dropped = ledger.last_stats(a.agent_id)["dropped_spool_full"]
    assert gap, "nothing was dropped: the spool was not full"
    assert gap == list(range(gap[0], gap[-1] + 1)), f"not oldest-first: holes {gap}"
    assert len(gap) <= dropped  # a dropped batch may have been applied before its ack got lost
    assert max(seqs.values()) == 1
    assert all(s in seqs for s in range(gap[-1] + 1, last + 1))  # the newest all arrived
    assert c.metric("rooftop_collector_missing_total") == len(gap)
    assert c.metric("rooftop_agent_dropped_total", rooftop_drop_reason="spool_full") == dropped
    report("c_spool_full", outage_s=outage_s, batches=last, holes=len(gap),
           first_hole=gap[0], last_hole=gap[-1], dropped_spool_full=dropped,
           collector_missing=len(gap), kept_after_gap=last - gap[-1],
           duplicates_dropped=c.metric("rooftop_collector_duplicates_total"))  # fmt: skip


# --- (d) corrupt spool segment -------------------------------------------------------------


def test_d_corrupt_segment_is_skipped_and_counted_and_data_flows(e2e: Harness):
    c = e2e.collector()
    proxy = e2e.proxy(c.port)
    proxy.cut()  # the first boot never reaches the collector: all of it stays spooled
    a = e2e.agent("node-d", proxy.address, shutdown_timeout_s=0.5)
    wait_for(lambda: len(spooled_seqs(a.spool_dir, e2e.tmp_path).get(a.boot_id, [])) >= 30,
             "30 batches spooled", procs=(a,))  # fmt: skip
    old_boot = a.boot_id
    old_last = a.stop()
    segments = sorted(a.spool_dir.glob("seg-*.rts"))
    assert segments
    # One flipped run of bytes in the middle of the data, and a torn tail.
    seg = max(segments, key=lambda p: p.stat().st_size)
    data = bytearray(seg.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    del data[-5:]
    seg.write_bytes(bytes(data))

    proxy.restore()
    a.start()
    wait_applied(c, a, 10)
    wait_for(lambda: c.ledger().last_stats(a.agent_id)["dropped_corrupt"] > 0,
             "dropped_corrupt reported in-band", procs=(a, c))  # fmt: skip
    new_last = a.stop()
    # The old boot's batches after the hole were acked too: nothing is left behind.
    assert "stopped with" not in a.log(), a.log()

    ledger = c.ledger()
    old = ledger.seqs(a.agent_id, old_boot)
    gap = holes(old, old_last)
    corrupt = ledger.last_stats(a.agent_id)["dropped_corrupt"]
    assert 2 <= len(gap) <= 3, gap  # the flipped record (two, if it straddled), the torn tail
    assert gap[-1] == old_last  # the torn record was the last
    assert corrupt == len(gap)
    assert max(old.values()) == 1
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), new_last)
    assert a.starts == 2  # no crash loop: the second start ran until we stopped it
    report("d_corrupt_segment", old_boot_batches=old_last, lost=len(gap), dropped_corrupt=corrupt,
           collector_missing=c.metric("rooftop_collector_missing_total"),
           new_boot_batches=new_last)  # fmt: skip


# --- (e) silent partition --------------------------------------------------------------------


@TRANSPORTS
def test_e_silent_partition_is_detected_by_keepalive_and_loses_nothing(e2e: Harness):
    c = e2e.collector()
    proxy = e2e.proxy(c.port)
    a = e2e.agent("node-e", proxy.address, keepalive_time_s=0.5, keepalive_timeout_s=0.5)
    wait_applied(c, a, 10)
    connections = proxy.accepted
    proxy.freeze()
    frozen_s = time.monotonic()
    # No FIN, no RST: only an unanswered ping tells the agent; it then dials again.
    wait_for(lambda: proxy.accepted > connections, "a new connection after the partition",
             timeout_s=10, procs=(a, c))  # fmt: skip
    detected_s = time.monotonic() - frozen_s
    time.sleep(0.5)
    proxy.heal()
    wait_for(lambda: c.ledger().last_stats(a.agent_id)["reconnects"] >= 1, "reconnect reported",
             procs=(a, c))  # fmt: skip
    last = a.stop()

    ledger = c.ledger()
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), last)
    assert detected_s <= 0.5 + 0.5 + 1.0 + SCHEDULING_SLACK_S  # keepalive time + timeout + write
    report("e_silent_partition", detected_after_s=round(detected_s, 2), batches=last, lost=0,
           duplicates_dropped=c.metric("rooftop_collector_duplicates_total"),
           reconnects=ledger.last_stats(a.agent_id)["reconnects"])  # fmt: skip


# --- (f) collector restart -----------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_f_collector_restart_misses_nothing(e2e: Harness, how: str):
    c = e2e.collector()
    a = e2e.agent(f"node-f-{how}", c.address)
    wait_applied(c, a, 10)
    first_pid = c.pid
    t0 = time.monotonic()
    if how == "sigterm":
        assert c.terminate() == 0
    else:
        c.kill()
    stop_s = time.monotonic() - t0
    time.sleep(1.0)  # down: the agent spools
    c.start()  # same port, same record file, empty memory
    wait_for(lambda: c.ledger().last_stats(a.agent_id)["reconnects"] >= 1, "reconnect reported",
             procs=(a, c))  # fmt: skip
    last = a.stop()

    ledger = c.ledger()
    seqs = ledger.seqs(a.agent_id, a.boot_id)
    assert holes(seqs, last) == []
    twice = sorted(s for s, n in seqs.items() if n > 1)
    # Applied twice only where the first collector applied a batch whose ack never
    # reached the agent: its dedup memory died with it.
    first = {b.seq for b in ledger.of(a.agent_id) if b.collector_pid == first_pid}
    second = Counter(b.seq for b in ledger.of(a.agent_id) if b.collector_pid != first_pid)
    assert max(second.values()) == 1  # each collector applies a seq once
    assert set(twice) <= first
    assert len(twice) <= 64  # at most the agent's in-flight window
    report(f"f_collector_{how}", batches=last, lost=0, applied_twice=len(twice),
           stop_took_s=round(stop_s, 2),
           duplicates_dropped_after_restart=c.metric("rooftop_collector_duplicates_total"),
           missing=c.metric("rooftop_collector_missing_total"))  # fmt: skip


# --- (g, h, i) bad input from a raw client beside a real agent -----------------------------


def _records(n: int = 10) -> list[pb.TraceRecord]:
    now = time.time()
    return [record_to_proto(gpu(i % 8, now)) for i in range(n)]


def test_g_poison_batch_is_rejected_in_band_and_the_stream_goes_on(e2e: Harness):
    c = e2e.collector()
    a = e2e.agent("node-g", c.address)
    wait_applied(c, a, 5)
    good = batch(1, agent_id="raw-g", records=_records())
    poison = batch(2, agent_id="raw-g", records=_records())
    poison.records[3].gpu.busy_pct = float("nan")
    after = batch(3, agent_id="raw-g", records=_records())
    with AgentStream(c.address) as stream:
        stream.send(good, poison, after)
        acks = stream.wait_acked(3)
        rejected = [x for x in acks if x.rejected_seq]
    assert [(x.rejected_seq, x.error.split(":")[0]) for x in rejected] == [(2, "INVALID_ARGUMENT")]
    assert stream.error is None
    assert sorted(c.ledger().seqs("raw-g", "boot-1")) == [1, 3]
    assert c.metric("rooftop_collector_rejected_total", rooftop_reject_reason="invalid_value") == 1
    before = applied(c, a)
    wait_applied(c, a, before + 5)  # the real agent never noticed
    last = a.stop()
    assert_each_once(c.ledger().seqs(a.agent_id, a.boot_id), last)
    report("g_poison", rejected=1, error=rejected[0].error[:60], raw_applied=[1, 3],
           agent_batches=last, agent_lost=0)  # fmt: skip


def test_h_oversized_message_is_refused_and_the_collector_stays_healthy(e2e: Harness):
    limit = 1024 * 1024 + 128 * 1024
    c = e2e.collector(max_message_bytes=limit)
    a = e2e.agent("node-h", c.address)
    wait_applied(c, a, 5)
    huge = batch(1, agent_id="raw-h", records=_records())
    huge.hostname = "x" * (limit + 1)
    with AgentStream(c.address) as stream:
        stream.send(huge)
        stream.wait_done()
    assert stream.error is not None
    assert stream.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health(c.address) == health_pb2.HealthCheckResponse.SERVING
    with AgentStream(c.address) as stream:  # the next stream is served as usual
        stream.send(batch(1, agent_id="raw-h", records=_records()))
        stream.wait_acked(1)
    before = applied(c, a)
    wait_applied(c, a, before + 5)
    last = a.stop()
    assert_each_once(c.ledger().seqs(a.agent_id, a.boot_id), last)
    assert c.ledger().seqs("raw-h", "boot-1") == Counter({1: 1})
    report("h_oversized", status="RESOURCE_EXHAUSTED", health="SERVING", agent_batches=last,
           agent_lost=0)  # fmt: skip


def test_i_nan_negative_and_skewed_samples_are_rejected_or_clamped_and_counted(e2e: Harness):
    c = e2e.collector()  # max_future_skew_s: the default 300 s
    a = e2e.agent("node-i", c.address)
    wait_applied(c, a, 5)
    now = time.time()
    bad: dict[str, tuple[str, float]] = {
        "nan": ("busy_pct", float("nan")),
        "negative": ("power_w", -5.0),
        "over_100": ("dram_bw_pct", 150.0),
        "infinite": ("sm_clock_mhz", float("inf")),
    }
    batches = []
    for seq, (field_name, value) in enumerate(bad.values(), start=1):
        b = batch(seq, agent_id="raw-i", records=_records())
        setattr(b.records[4].gpu, field_name, value)
        batches.append(b)
    future = batch(5, agent_id="raw-i", records=_records())
    future.records[2].gpu.time.FromSeconds(int(now + 3600))  # a clock an hour ahead
    past = batch(6, agent_id="raw-i", records=_records())
    past.records[2].gpu.time.FromSeconds(int(now - 86400))  # a day late: kept as is
    with AgentStream(c.address) as stream:
        stream.send(*batches, future, past)
        acks = stream.wait_acked(6)
    rejected = sorted(x.rejected_seq for x in acks if x.rejected_seq)
    assert rejected == [1, 2, 3, 4]
    ledger = c.ledger()
    kept = {b.seq: b for b in ledger.of("raw-i")}
    assert sorted(kept) == [5, 6]
    assert kept[5].skewed == 1 and kept[6].skewed == 0
    assert kept[5].newest_sample_s is not None and kept[5].newest_sample_s <= kept[5].received_s
    assert c.metric("rooftop_collector_rejected_total", rooftop_reject_reason="invalid_value") == 4
    assert c.metric("rooftop_collector_skewed_total") == 1
    before = applied(c, a)
    wait_applied(c, a, before + 5)
    last = a.stop()
    assert_each_once(c.ledger().seqs(a.agent_id, a.boot_id), last)
    report("i_bad_values", rejected_batches=4, rejected_reason="invalid_value",
           skewed_clamped=1, past_kept=1, agent_batches=last, agent_lost=0)  # fmt: skip


def test_harness_runs_real_processes(e2e: Harness):
    """The harness itself: a graceful run is 1..N, each once, and the counters agree."""
    c = e2e.collector()
    a = e2e.agent("node-0", c.address)
    wait_applied(c, a, 5)
    assert os.path.basename(os.readlink(f"/proc/{a.pid}/exe")).startswith("python")
    last = a.stop()
    ledger = c.ledger()
    assert_each_once(ledger.seqs(a.agent_id, a.boot_id), last)
    assert c.metric("rooftop_collector_batches_total") == last
    assert c.metric("rooftop_collector_samples_total") == ledger.samples(a.agent_id, a.boot_id)
    assert c.terminate() == 0
