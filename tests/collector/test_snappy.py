"""The pure-Python snappy block codec the remote-write output sends with."""

from __future__ import annotations

import random

import pytest

from rooftop.collector.snappy import SnappyError, compress, decompress, literal_block


def corpus() -> list[bytes]:
    rng = random.Random(7)
    labels = b'__name__="hw_power_watts",host_name="gpu-node-17",hw_id="GPU-0001-uuid"' * 40
    return [
        b"",
        b"a",
        b"abcd",
        b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        bytes(rng.randrange(256) for _ in range(5000)),
        labels,
        bytes(rng.choice(b"abc") for _ in range(70_000)),
        b"x" * 200_000,
    ]


@pytest.mark.parametrize("encode", [compress, literal_block])
def test_every_block_decodes_to_what_was_encoded(encode) -> None:  # type: ignore[no-untyped-def]
    for data in corpus():
        assert decompress(encode(data)) == data


def test_repeated_label_text_compresses_several_fold() -> None:
    labels = corpus()[5]
    assert len(compress(labels)) * 5 < len(labels)


def test_a_literal_block_is_the_data_behind_a_short_header() -> None:
    data = bytes(range(256)) * 10
    assert len(literal_block(data)) <= len(data) + 8


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        (b"", "preamble"),
        (b"\x05\x10ab", "truncated literal"),
        (b"\x04\x0cabcd\x01\x09", "offset"),  # copy from 9 bytes back: only 4 exist
        (b"\x09\x0cabcd", "holds 4 bytes, preamble says 9"),
        (b"\xff\xff\xff\xff\x0f", "more than"),
    ],
)
def test_a_damaged_block_is_a_snappy_error_naming_the_problem(block: bytes, problem: str) -> None:
    with pytest.raises(SnappyError, match=problem):
        decompress(block, max_length=1 << 20)
