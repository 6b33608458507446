"""The one writer of benchmark blocks into docs/PERFORMANCE.md.

Each ``bench/bench_X.py --write-docs`` owns the lines between its two markers,
``<!-- bench_X: begin (written by bench/bench_X.py --write-docs) -->`` and
``<!-- bench_X: end -->``; nothing else in the file changes.
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"


def markers(bench: str) -> tuple[str, str]:
    """The begin and end markers of ``bench``'s block (``bench`` = ``"bench_hook"``)."""
    return (
        f"<!-- {bench}: begin (written by bench/{bench}.py --write-docs) -->",
        f"<!-- {bench}: end -->",
    )


def write_block(bench: str, block: str, doc: Path = DOC) -> None:
    """Replace ``bench``'s block in ``doc`` with ``block``.

    Raises:
        SystemExit: the file does not hold exactly one pair of its markers, in order.
    """
    begin, end = markers(bench)
    text = doc.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{doc}: expected one {begin!r} … {end!r} pair")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    doc.write_text(f"{head}{begin}\n{block}\n{end}{tail}")
