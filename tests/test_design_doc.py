"""docs/DESIGN.md is the design reference: every "DESIGN §N" citation must land on a heading.

Code, docs, tests and deploy files cite sections of the design as ``DESIGN §3`` or
``DESIGN §7, §9`` (subsections as ``§7.2``). A citation resolves when docs/DESIGN.md has
a heading ``## §N Title`` (``### §N.M Title`` for a subsection). The scan covers the
repository's tracked text files (``git ls-files``), so a citation added anywhere is held
to the document, and nothing may still point at the old external ``DESIGN.md`` under
``shared/``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"
THIS = Path(__file__).resolve()

# "DESIGN §7", "DESIGN §7.2", "DESIGN §7, §9", "DESIGN §7 and §9".
_CITATION = re.compile(r"DESIGN\s+§\s*\d+(?:\.\d+)?(?:\s*(?:,|and|&|/)\s*§\s*\d+(?:\.\d+)?)*")
_SECTION = re.compile(r"§\s*(\d+(?:\.\d+)?)")
_HEADING = re.compile(r"^(#{2,3}) §(\d+(?:\.\d+)?) \S", re.MULTILINE)
# Spelled in two parts so that this file does not match its own check.
_OLD_POINTER = "shared/" + "DESIGN.md"
_SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules"}


def _tracked_files() -> list[Path]:
    """The repository's tracked files that exist on disk (a tree walk outside git)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [
            p for p in ROOT.rglob("*")
            if p.is_file()
            and not any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in p.parts)
        ]
    paths = (ROOT / os.fsdecode(name) for name in out.split(b"\0") if name)
    return [p for p in paths if p.is_file()]  # files being moved may be gone from disk


def _text_files() -> Iterator[tuple[Path, str]]:
    """(path, text) of every tracked text file; binary and non-UTF-8 files are skipped."""
    for path in _tracked_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def cited_sections(text: str) -> list[str]:
    """Section numbers cited as "DESIGN §N" in ``text``, in order ("7", "9", "7.2")."""
    return [n for m in _CITATION.finditer(text) for n in _SECTION.findall(m.group(0))]


def headings(design_text: str) -> set[str]:
    """Section numbers with a heading: ``## §N Title`` for N, ``### §N.M Title`` for N.M."""
    return {
        number
        for hashes, number in _HEADING.findall(design_text)
        if (hashes == "##") == ("." not in number)
    }


def unresolved(citations: dict[str, list[str]], design_text: str) -> dict[str, list[str]]:
    """Per cited section without a heading, the places citing it."""
    present = headings(design_text)
    return {n: where for n, where in sorted(citations.items()) if n not in present}


def _citations_in_repository() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path, text in _text_files():
        if path == DESIGN:
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            for number in cited_sections(line):
                found.setdefault(number, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return found


def test_every_design_section_cited_in_the_repository_has_a_heading_in_docs_design_md():
    citations = _citations_in_repository()
    assert citations, "no 'DESIGN §N' citation found at all: the scan is broken"
    missing = unresolved(citations, DESIGN.read_text(encoding="utf-8"))
    assert not missing, "cited sections with no '## §N Title' heading in docs/DESIGN.md: " + (
        "; ".join(f"§{n} ← {', '.join(where)}" for n, where in missing.items())
    )


def test_a_citation_whose_heading_is_missing_is_reported(tmp_path: Path):
    doc = tmp_path / "DESIGN.md"
    doc.write_text("# Design\n\n## §3 The classifier\n\n### §7.2 The spool\n", encoding="utf-8")
    citations = {
        n: ["x.py:1"]
        for n in cited_sections("see DESIGN §3; DESIGN §7, §9 and DESIGN §7.2; DESIGN §4")
    }
    assert sorted(citations) == ["3", "4", "7", "7.2", "9"]
    assert sorted(unresolved(citations, doc.read_text(encoding="utf-8"))) == ["4", "7", "9"]
    # A subsection heading does not stand in for its section, nor the other way round.
    assert headings("### §7 Wrong level\n## §7.2 Wrong level\n") == set()


def test_design_doc_section_headings_are_unique():
    numbers = [n for _, n in _HEADING.findall(DESIGN.read_text(encoding="utf-8"))]
    assert numbers, "docs/DESIGN.md has no '## §N Title' headings"
    assert len(numbers) == len(set(numbers)), f"a section number is used twice: {numbers}"


def test_no_file_points_to_the_external_shared_design_md():
    offenders = [
        f"{path.relative_to(ROOT)}:{lineno}"
        for path, text in _text_files()
        if path != THIS
        for lineno, line in enumerate(text.splitlines(), start=1)
        if _OLD_POINTER in line
    ]
    assert not offenders, (
        f"these still point at {_OLD_POINTER}; the design reference is docs/DESIGN.md: "
        + ", ".join(offenders)
    )
