"""README, docs/ and deploy/ say what the code does: install path, spool size, no-driver lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rooftop.agent.config import AgentConfig
from rooftop.agent.spool import DEFAULT_MAX_BYTES
from tests.support import nvml_works

ROOT = Path(__file__).resolve().parent.parent
_MIB = 1024 * 1024


def operator_texts() -> dict[str, str]:
    """What an operator reads: README, docs/, deploy/, the shipped example configs."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    paths += [p for p in sorted((ROOT / "deploy").rglob("*")) if p.is_file()
              and p.suffix in {".toml", ".yaml", ".yml", ".service", ".md"}]
    paths += sorted((ROOT / "rooftop" / "data" / "config").glob("*.toml"))
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths}


def test_no_doc_installs_rooftop_from_a_package_index():
    # Not published: `pip install rooftop` would fetch someone else's package, if any.
    offending = {name: line for name, text in operator_texts().items()
                 for line in text.splitlines()
                 if re.search(r"pip3? install (-U |--upgrade )?['\"]?rooftop\b(?!/)", line)}
    assert offending == {}


def test_every_spool_size_figure_is_the_config_default():
    default = AgentConfig().spool_max_bytes
    assert default == DEFAULT_MAX_BYTES
    set_in_files: dict[str, int] = {}
    claims: list[tuple[str, str]] = []
    for name, text in operator_texts().items():
        for value in re.findall(r"spool_max_bytes\s*=\s*([0-9_]+)", text):
            set_in_files[name] = int(value.replace("_", ""))
        for line in text.splitlines():
            if "spool" in line and (size := re.search(r"(\d+) MiB ≈[^;|)]*", line)):
                claims.append((name, size[0].strip()))
    assert set_in_files and set(set_in_files.values()) == {default}, set_in_files
    # One sizing claim, word for word, wherever the default's size is put in hours.
    assert len({name for name, _ in claims}) >= 3 and {claim for _, claim in claims} == {
        f"{default // _MIB} MiB ≈ 20 h of 8 GPUs at 1 Hz, ≈ 3 h at 10 Hz"
    }, claims
    guide = operator_texts()["docs/OPERATOR-GUIDE.md"]
    # bench/bench_spool.py's table: records (the larger) first, then columns.
    assert re.search(r"^\| 8 × 1 Hz \(the default\) \| [^|]+ \| ≈ 20 h \|", guide, re.M)
    assert re.search(r"^\| 8 × 10 Hz \| [^|]+ \| ≈ 3 h ", guide, re.M)
    assert f"default {default // _MIB} MiB lasts" in guide


def _nvml_works() -> bool:
    probe = "import pynvml; pynvml.nvmlInit()"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.skipif(_nvml_works(), reason="an NVIDIA driver is present here")
@pytest.mark.skipif(nvml_works(), reason="an NVIDIA driver is present: diagnose prints verdicts")
def test_documented_missing_driver_line_is_what_agentctl_diagnose_prints():
    proc = subprocess.run([sys.executable, "-m", "rooftop", "diagnose"], capture_output=True,
                          text=True, check=False, timeout=60)
    printed = proc.stderr
    shown = {name: m for name, text in operator_texts().items()
             for m in re.findall(r"```console\n\$ agentctl diagnose\n(.*?)```", text, re.S)}
    assert {"README.md", "docs/OPERATOR-GUIDE.md"} <= set(shown)
    assert all(block == printed for block in shown.values()), (printed, shown)
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text(encoding="utf-8")
    assert f"`{printed.splitlines()[0]}`" in " ".join(runbook.split())  # quoted in prose


def test_security_mode_table_has_a_row_for_every_mode_the_collector_starts_in():
    from rooftop.collector.config import SecurityMode  # noqa: PLC0415

    text = (ROOT / "docs" / "SECURITY.md").read_text(encoding="utf-8")
    table = text.split("| mode | collector | agents |", 1)[1].split("\n\n", 1)[0]
    rows = {re.sub(r"\*\*|\s*\(recommended\)", "", line.split("|")[1]).strip():
            line.split("|")[-2].strip()
            for line in table.splitlines()[2:] if line.startswith("|")}
    assert set(rows) == {mode.value for mode in SecurityMode}
    for mode in SecurityMode:  # the last column: what happens off loopback
        assert (rows[mode.value] == "starts") == mode.authenticates, (mode, rows[mode.value])
