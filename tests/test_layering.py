"""The layering contracts (import-linter, pyproject's [tool.importlinter]) hold, and bite.

agentctl (cli, demo, config_check) sits above both roles; ``rooftop.agent`` and
``rooftop.collector`` never import each other; both sit on ``rooftop.common``, which
sits on the generated ``rooftop.v1``; the in-engine hooks import only the stdlib.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, check=False, timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "rooftop", tmp_path / "rooftop",
                    ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_repository_keeps_every_layering_contract():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "edge"),
    [
        ("rooftop/collector/_probe.py", "from rooftop.agent import sampler",
         "rooftop.collector._probe -> rooftop.agent.sampler (l.3)"),
        ("rooftop/agent/_probe.py", "import rooftop.collector.fleet",
         "rooftop.agent._probe -> rooftop.collector.fleet (l.3)"),
        ("rooftop/common/_probe.py", "from rooftop.agent import window",
         "rooftop.common._probe -> rooftop.agent.window (l.3)"),
        ("rooftop/agent/hooks/_probe.py", "import grpc",
         "rooftop.agent.hooks._probe -> grpc (l.3)"),
    ],
)
def test_a_new_import_across_the_layers_breaks_the_contract(tree_copy, module, line, edge):
    (tree_copy / module).write_text(f'"""A probe."""\n\n{line}\n')
    result = _lint(tree_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert edge in " ".join(result.stdout.split()), result.stdout
