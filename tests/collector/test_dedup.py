"""Dedup: out-of-order seqs applied once, forged seq jumps rejected, O(1) LRU, durable marks.

The bookkeeping alone (``Deduplicator``, ``MarkStore``), then against a real ingest
server on loopback with real client streams.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from rooftop.collector.config import CollectorConfig
from rooftop.collector.dedup import MAX_SEQ, Deduplicator, SeqCheck
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.collector.marks import MARKS_FILE, MarkStore
from tests.collector.helpers import AgentStream, batch, gpu, start_server, target

KEY = ("agent-1", "boot-1")
FORGED_SEQ = 2**63


def applied(d: Deduplicator, key: tuple[str, str], seqs: list[int]) -> list[int]:
    """What an ingest loop applies of ``seqs`` on one stream (check, then commit)."""
    out, last = [], -1
    for seq in seqs:
        if d.check(key, seq) is not SeqCheck.NEW:
            continue
        d.commit(key, seq, first_on_stream=last != seq - 1)
        last = seq
        out.append(seq)
    return out


# --- the bookkeeping --------------------------------------------------------------------------


def test_out_of_order_seqs_on_one_stream_are_each_applied_once():
    d = Deduplicator()
    assert applied(d, KEY, [1, 3, 2, 5, 4, 6]) == [1, 3, 2, 5, 4, 6]
    assert d.contiguous(KEY) == 6
    assert applied(d, KEY, [1, 3, 2, 5, 4, 6]) == [], "an exact repeat is a duplicate"


def test_an_applied_seq_above_a_gap_is_a_duplicate_and_the_gap_still_fills():
    d = Deduplicator()
    assert d.commit(KEY, 1, first_on_stream=True) == (1, 0, 0)
    assert d.commit(KEY, 3, first_on_stream=False) == (1, 0, 0)
    assert d.is_duplicate(KEY, 3) and not d.is_duplicate(KEY, 2)
    assert d.commit(KEY, 2, first_on_stream=False) == (3, 0, 0)
    assert d.acked(KEY) == 3


def test_a_gap_that_never_fills_is_given_up_on_but_a_late_seq_is_still_applied():
    d = Deduplicator(max_ahead=4)
    d.commit(KEY, 1, first_on_stream=True)
    for seq in range(3, 8):
        contiguous, skipped, _ = d.commit(KEY, seq, first_on_stream=False)
    assert (contiguous, skipped) == (7, 1)
    assert d.check(KEY, 2) is SeqCheck.NEW
    d.commit(KEY, 2, first_on_stream=True)
    assert d.check(KEY, 2) is SeqCheck.DUPLICATE


def test_a_seq_beyond_the_jump_bound_is_too_far_and_never_moves_the_mark():
    d = Deduplicator(max_seq_jump=1000)
    applied(d, KEY, [1, 2, 3])
    assert d.check(KEY, 3 + 1000) is SeqCheck.NEW
    assert d.check(KEY, 3 + 1001) is SeqCheck.TOO_FAR
    assert d.check(KEY, FORGED_SEQ) is SeqCheck.TOO_FAR
    assert d.contiguous(KEY) == 3


def test_a_seq_above_max_seq_is_too_far_even_for_a_boot_never_seen():
    d = Deduplicator()
    assert d.check(("other", "boot"), MAX_SEQ + 1) is SeqCheck.TOO_FAR
    assert d.check(("other", "boot"), 5_000_000) is SeqCheck.NEW


def test_a_boot_first_seen_mid_run_counts_nothing_missing():
    # A fresh collector cannot tell what an earlier one applied from what was dropped.
    d = Deduplicator()
    assert d.commit(KEY, 500, first_on_stream=True) == (500, 0, 0)


def test_a_resumed_gap_the_agent_saw_acked_elsewhere_is_not_missing():
    # Home applied 1..5; the agent was away while another collector acked 6..9.
    d = Deduplicator()
    applied(d, KEY, [1, 2, 3, 4, 5])
    assert d.commit(KEY, 10, first_on_stream=True, acked_seq=9) == (10, 0, 4)


def test_seqs_above_the_acked_seq_are_still_missing():
    # Acked elsewhere up to 7; 8 and 9 the agent's spool dropped.
    d = Deduplicator()
    applied(d, KEY, [1, 2, 3, 4, 5])
    assert d.commit(KEY, 10, first_on_stream=True, acked_seq=7) == (10, 2, 2)


def test_an_acked_seq_at_or_above_the_batch_seq_is_believed_only_up_to_seq_minus_1():
    d = Deduplicator()
    applied(d, KEY, [1, 2, 3, 4, 5])
    assert d.commit(KEY, 10, first_on_stream=True, acked_seq=FORGED_SEQ) == (10, 0, 4)
    assert d.contiguous(KEY) == 10, "acked_seq never moves the mark past the batch"


def test_an_acked_seq_never_makes_a_late_seq_of_the_gap_a_duplicate():
    # A forged acked_seq must not make the collector drop (and ack) a batch it never
    # applied: the gap stays a fillable hole whatever acked_seq claims.
    d = Deduplicator()
    applied(d, KEY, [1, 2])
    d.commit(KEY, 6, first_on_stream=True, acked_seq=5)
    assert [d.check(KEY, s) for s in (3, 4, 5)] == [SeqCheck.NEW] * 3


def test_eviction_forgets_the_least_recently_used_boot_and_stays_bounded():
    d = Deduplicator(max_keys=2)
    d.commit(("a", "1"), 1, first_on_stream=True)
    d.commit(("b", "1"), 1, first_on_stream=True)
    d.commit(("a", "1"), 2, first_on_stream=False)
    d.commit(("c", "1"), 1, first_on_stream=True)
    assert d.acked(("b", "1")) == 0 and d.acked(("a", "1")) == 2
    assert len(d) == 2


def test_holes_per_boot_are_bounded():
    d = Deduplicator(max_holes=3)
    # Every other seq: each resume leaves a one-seq hole.
    applied(d, KEY, list(range(1, 40, 2)))
    fillable = [s for s in range(2, 40, 2) if d.check(KEY, s) is SeqCheck.NEW]
    assert fillable == [34, 36, 38]


def test_durable_acks_report_only_marks_on_disk(tmp_path: Path):
    d = Deduplicator()
    store = MarkStore(tmp_path, d)
    applied(d, KEY, [1, 2, 3])
    assert d.acked(KEY) == 0, "nothing durable yet: nothing acked"
    assert store.flush()
    assert d.acked(KEY) == 3
    store.shutdown()


def test_marks_survive_a_restart(tmp_path: Path):
    d = Deduplicator()
    store = MarkStore(tmp_path, d)
    applied(d, KEY, [1, 2, 3])
    applied(d, ("agent-2", "boot-9"), [7])
    store.flush()
    applied(d, KEY, [4])
    store.shutdown()  # SIGTERM: the last change is written too

    again = Deduplicator()
    assert MarkStore(tmp_path, again).load() == 2
    assert again.contiguous(KEY) == 4 and again.acked(KEY) == 4
    assert again.is_duplicate(KEY, 4) and not again.is_duplicate(KEY, 5)
    assert again.restored_mark(KEY) == 4
    assert again.contiguous(("agent-2", "boot-9")) == 7


def test_a_torn_last_line_keeps_the_marks_before_it_in_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    lines = [json.dumps(["a", "1", 5]), json.dumps(["b", "1", 9]), '["c", "1", 1']
    (tmp_path / MARKS_FILE).write_text("\n".join(lines))
    d = Deduplicator()
    with caplog.at_level(logging.WARNING, logger="rooftop.collector.marks"):
        assert MarkStore(tmp_path, d).load() == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "line 3 is torn" in caplog.records[0].getMessage()
    assert d.contiguous(("b", "1")) == 9 and d.contiguous(("c", "1")) == 0
    # The rewrite dropped the torn tail: the file reads clean now.
    assert MarkStore(tmp_path, Deduplicator()).load() == 2


@pytest.mark.parametrize(
    "content", [b"\xff\xfe not json\n", b'{"a": 1}\n', b'["a", "1", -4]\n', b'["a", 1, 2]\n']
)
def test_a_corrupt_state_file_is_one_line_and_an_empty_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
):
    (tmp_path / MARKS_FILE).write_bytes(content)
    d = Deduplicator()
    with caplog.at_level(logging.WARNING, logger="rooftop.collector.marks"):
        assert MarkStore(tmp_path, d).load() == 0
    assert len(caplog.records) == 1 and "line 1 is corrupt" in caplog.records[0].getMessage()
    assert len(d) == 0


def test_an_unreadable_state_file_is_one_line_and_an_empty_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    (tmp_path / MARKS_FILE).mkdir()  # reading a directory fails with an OSError
    d = Deduplicator()
    with caplog.at_level(logging.WARNING, logger="rooftop.collector.marks"):
        assert MarkStore(tmp_path, d).load() == 0
    assert len(caplog.records) == 1 and "cannot read" in caplog.records[0].getMessage()


def test_the_log_is_compacted_to_the_live_marks(tmp_path: Path):
    d = Deduplicator()
    store = MarkStore(tmp_path, d, fsync=lambda fd: None)  # about size: skip the disk waits
    for seq in range(1, 12_001):
        applied(d, KEY, [seq])
        store.flush()
    store.shutdown()
    lines = (tmp_path / MARKS_FILE).read_text().splitlines()
    assert len(lines) <= 10_000, "compacted: not one line per change forever"
    again = Deduplicator()
    MarkStore(tmp_path, again).load()
    assert again.contiguous(KEY) == 12_000


# --- against a real ingest server -------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[IngestServer, Fleet]]:
    server, fleet = start_server(max_seq_jump=1000)
    yield server, fleet
    server.shutdown(timeout_s=1)


def test_out_of_order_batches_are_all_applied_and_a_repeat_is_a_duplicate(served):
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(*(batch(s, records=[gpu(0)]) for s in [1, 3, 2, 5, 4, 6]))
        stream.send(batch(4))
        stream.wait_acked(6)
    counts = fleet.counts()
    assert (counts.batches, counts.duplicates) == (6, 1)


def test_a_forged_seq_jump_is_rejected_in_band_counted_and_moves_nothing(served):
    server, fleet = served
    with AgentStream(target(server)) as victim:
        victim.send(*(batch(s) for s in range(1, 6)))
        victim.wait_acked(5)
    with AgentStream(target(server)) as attacker:
        attacker.send(batch(FORGED_SEQ), batch(5 + 1001))
        acks = attacker.wait(lambda a: len([x for x in a if x.rejected_seq]) == 2)
    rejected = [a for a in acks if a.rejected_seq]
    assert [a.rejected_seq for a in rejected] == [FORGED_SEQ, 5 + 1001]
    assert all(a.error.startswith("INVALID_ARGUMENT: seq") for a in rejected)
    assert all(a.acked_seq == 0 for a in rejected)
    counts = fleet.counts()
    assert dict(counts.rejected) == {"seq_jump": 2}
    assert counts.missing == 0
    assert server.servicer.dedup.contiguous(KEY) == 5
    with AgentStream(target(server)) as victim:
        victim.send(batch(6))
        assert victim.wait_acked(6)[-1].acked_seq == 6
    assert fleet.counts().batches == 6


def test_with_a_state_dir_acks_wait_for_durable_marks_and_a_restart_applies_nothing_twice(
    tmp_path: Path,
):
    config = CollectorConfig(listen="127.0.0.1:0", insecure=True, state_dir=tmp_path)
    server, fleet = start_server(config=config)
    try:
        with AgentStream(target(server)) as stream:
            stream.send(*(batch(s) for s in range(1, 41)))
            stream.wait_acked(40)
    finally:
        server.shutdown(timeout_s=1)
    assert (tmp_path / MARKS_FILE).exists()
    server, fleet = start_server(config=config)
    try:
        with AgentStream(target(server)) as stream:
            stream.send(*(batch(s) for s in range(1, 46)))
            assert stream.wait_acked(45)[-1].acked_seq == 45
        counts = fleet.counts()
        assert (counts.batches, counts.duplicates, counts.restored_duplicates) == (5, 40, 40)
    finally:
        server.shutdown(timeout_s=1)
