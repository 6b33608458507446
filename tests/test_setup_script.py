"""scripts/setup.sh installs once per pyproject.toml, then returns without running pip.

Run in a copy of the two files it reads, with a stand-in ``.venv/bin/python`` that
logs each pip call instead of installing: no network, well under a second.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../pip-calls"
[ -z "${FAIL_PIP:-}" ] || { echo "pip: no route to the index" >&2; exit 1; }
"""


def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("agentctl", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return tmp_path


def setup(root: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    calls = root / ".venv" / "pip-calls"
    calls.unlink(missing_ok=True)
    proc = subprocess.run([str(root / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30, check=False)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_second_setup_does_not_run_pip_and_prints_nothing(tmp_path: Path):
    root = checkout(tmp_path)
    first, pip_calls = setup(root)
    assert first.returncode == 0, first.stderr
    assert any("install" in call and "-e .[dev,plot]" in call for call in pip_calls)
    assert first.stdout == ""
    again, pip_calls = setup(root)
    assert (again.returncode, pip_calls, again.stdout, again.stderr) == (0, [], "", "")


def test_a_changed_pyproject_or_force_installs_again(tmp_path: Path):
    root = checkout(tmp_path)
    setup(root)
    with (root / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency\n")
    assert setup(root)[1]
    assert setup(root)[1] == []
    assert setup(root, ROOFTOP_SETUP_FORCE="1")[1]


def test_failed_install_shows_pip_output_and_stamps_nothing(tmp_path: Path):
    root = checkout(tmp_path)
    failed, _ = setup(root, FAIL_PIP="1")
    assert failed.returncode == 1
    assert "no route to the index" in failed.stderr
    assert not (root / ".venv" / ".rooftop-setup").exists()
    assert setup(root)[1]  # tried again, not skipped
