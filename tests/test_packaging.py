"""The wheel: one top-level package, ``rooftop``, and entry points that name it.

Built from this checkout with pip (as a user would), installed into a fresh venv
without dependencies: enough to show what lands in site-packages and what imports.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = out.glob("rooftop-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the wheel installed (no dependencies)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return python


def test_the_wheel_installs_only_the_rooftop_package(wheel: Path):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"rooftop"}, sorted(top)
    for shipped in ("rooftop/py.typed", "rooftop/v1/telemetry_pb2.pyi",
                    "rooftop/data/config/agent.toml", "rooftop/data/config/collector.toml",
                    "rooftop/agent/data/h100-2026-11-22/gemv_b1.jsonl"):
        assert shipped in names, shipped
    assert not [n for n in names if "/tests/" in n or n.startswith(("tests/", "bench/"))]


def test_the_entry_points_name_the_rooftop_namespace(wheel: Path):
    with zipfile.ZipFile(wheel) as whl:
        (ep_name,) = [n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(ep_name).decode()
    assert "agentctl = rooftop.cli:main" in entry_points
    assert "rooftop = rooftop.agent.hooks.vllm:RooftopStatLogger" in entry_points


def test_in_a_fresh_venv_import_agent_fails_and_import_rooftop_works(installed: Path, tmp_path):
    python = installed
    probe = (
        "import importlib.util, rooftop, rooftop.agent.hooks.vllm;"
        "print(rooftop.__version__);"
        "print([m for m in ('agent', 'collector', 'protos', 'common')"
        " if importlib.util.find_spec(m) is not None])"
    )
    # cwd is an empty directory: nothing from the checkout is on sys.path.
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, check=True, timeout=60)
    version, stray = result.stdout.split("\n")[:2]
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert stray == "[]"
    failed = subprocess.run([str(python), "-c", "import agent"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "No module named 'agent'" in failed.stderr


def test_a_users_agent_module_does_not_shadow_the_vllm_plugin(installed: Path, tmp_path):
    # vLLM loads plugins by entry point inside the engine, whose cwd is the user's:
    # an agent.py there once shadowed the plugin's old top-level ``agent`` package.
    python = installed
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "agent.py").write_text("raise SystemExit('the user agent.py was imported')\n")
    (launch / "collector.py").write_text("raise SystemExit('the user collector.py was imported')\n")
    load = (
        "import sys; sys.path.insert(0, '');"
        "from importlib.metadata import entry_points;"
        "(ep,) = entry_points(group='vllm.stat_logger_plugins');"
        "print(ep.load().__module__)"
    )
    result = subprocess.run([str(python), "-c", load], cwd=launch, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rooftop.agent.hooks.vllm"
