"""The spool reader, fuzzed: a real spool file truncated, bit-flipped, overwritten.

Recovery must never raise (a bad file must not crash-loop the agent), and every record
that lies wholly before the damage is still there, byte for byte the batch it was.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from rooftop.agent.spool import Spool
from rooftop.v1 import telemetry_pb2 as pb

BOOT = "boot-a"
SEGMENT = "seg-0000000001.rts"


def _batch(seq: int) -> pb.Batch:
    b = pb.Batch(agent_id="node-1", boot_id=BOOT, seq=seq, hostname="n" * (seq % 7))
    for i in range(seq % 3 + 1):
        b.records.add().gpu.gpu_index = i
    return b


BATCHES = [_batch(seq) for seq in range(1, 13)]


def _real_segment() -> tuple[bytes, list[int]]:
    """A segment the real Spool wrote, and the offset where each record ends."""
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(Path(directory), fsync=lambda fd: None)
        for b in BATCHES:
            spool.append(b)
        spool.sync(force=True)
        spool.shutdown(timeout_s=1.0)
        data = (Path(directory) / SEGMENT).read_bytes()
    ends, pos = [], 0
    for b in BATCHES:
        pos = data.index(b.SerializeToString(), pos) + len(b.SerializeToString())
        ends.append(pos)
    assert ends[-1] == len(data)
    return data, ends


SEGMENT_BYTES, RECORD_ENDS = _real_segment()


@contextmanager
def _spool_over(data: bytes, acked: bytes | None = None) -> Iterator[Spool]:
    # A fresh directory per example (Hypothesis reuses a test's fixtures across examples).
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / SEGMENT).write_bytes(data)
        if acked is not None:
            (Path(directory) / "acked.json").write_bytes(acked)
        spool = Spool(Path(directory), fsync=lambda fd: None)
        try:
            yield spool
        finally:
            spool.shutdown(timeout_s=1.0)


def _recovered(data: bytes) -> list[pb.Batch]:
    with _spool_over(data) as spool:
        return spool.pending(limit=1000)


def _intact_before(damage_at: int) -> list[pb.Batch]:
    return [b for b, end in zip(BATCHES, RECORD_ENDS, strict=True) if end <= damage_at]


_AT = st.integers(0, len(SEGMENT_BYTES) - 1)


@given(st.integers(0, len(SEGMENT_BYTES)))
def test_a_truncated_spool_keeps_every_whole_record(size: int):
    assert _recovered(SEGMENT_BYTES[:size]) == _intact_before(size)


@given(_AT, st.integers(0, 7))
@example(0, 0)  # the first magic
@example(8, 7)  # the first body length
def test_a_flipped_bit_costs_at_most_the_record_it_hit(at: int, bit: int):
    data = bytearray(SEGMENT_BYTES)
    data[at] ^= 1 << bit
    recovered = _recovered(bytes(data))
    assert recovered[: len(_intact_before(at))] == _intact_before(at)
    assert len(recovered) >= len(BATCHES) - 1
    assert all(b in BATCHES for b in recovered)


@given(_AT, st.binary(min_size=1, max_size=64), st.booleans())
def test_overwritten_or_inserted_garbage_never_breaks_recovery(at: int, junk: bytes,
                                                              insert: bool):
    data = SEGMENT_BYTES[:at] + junk + SEGMENT_BYTES[at + (0 if insert else len(junk)) :]
    recovered = _recovered(data)
    assert recovered[: len(_intact_before(at))] == _intact_before(at)
    assert all(b in BATCHES for b in recovered)


@given(st.binary(max_size=512))
def test_any_bytes_as_a_segment_never_raise(data: bytes):
    _recovered(data)


@given(st.one_of(
    st.binary(max_size=64),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                           kids, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from([BOOT, "other"]), st.integers(-3, 20)).map(
        lambda v: json.dumps(v).encode()),
))
@example(b"[" * 100_000)  # nesting past the JSON decoder's recursion limit
@example(json.dumps({BOOT: 5}).encode())
def test_any_acked_file_never_breaks_recovery(acked: bytes):
    with _spool_over(SEGMENT_BYTES, acked) as spool:
        recovered = spool.pending(limit=1000)
    try:
        high = json.loads(acked).get(BOOT, 0)
    except (ValueError, AttributeError, RecursionError):
        high = 0
    high = high if isinstance(high, int) and not isinstance(high, bool) and high >= 0 else 0
    assert recovered == [b for b in BATCHES if b.seq > high]
