"""The confidence a steady GPU shows at the shipped defaults is the one the docs print.

The agent classifies windows of ``rate_hz × window_s`` samples (1 Hz × 5 s = 5 as
shipped); DESIGN §3.4's model must give a clean window of that size a high
confidence, and README, DESIGN and INCIDENT must show that figure.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rooftop.agent.classifier import classify
from rooftop.agent.config import AgentConfig
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import GpuBackend
from rooftop.agent.sensors.fake import fake_backend
from rooftop.agent.sensors.replay import ReplayBackend
from rooftop.agent.trace import read_trace
from rooftop.agent.window import build_window
from rooftop.cli import main
from rooftop.common.model import Bound, GpuSample, Verdict

ROOT = Path(__file__).resolve().parents[2]
GEMV = ROOT / "rooftop" / "agent" / "data" / "h100-2026-11-22" / "gemv_b1.jsonl"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def documented_default_confidence() -> float:
    """The figure README states for a clean window at the agent's defaults."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"at the agent's defaults .*?clean window of one regime has\s+"
                      r"confidence \*\*([0-9.]+)\*\*", readme, re.S)
    assert match, "README no longer states the confidence at the agent's defaults"
    return float(match[1])


def window_at_defaults(backend: GpuBackend, clock: FakeClock, warmup_ticks: int) -> Verdict:
    config = AgentConfig()
    sampler = Sampler(backend, None, clock=clock)
    samples: list[GpuSample] = []
    for i in range(warmup_ticks + round(config.rate_hz * config.window_s)):
        records = sampler.tick()
        if i >= warmup_ticks:
            samples += [r for r in records if isinstance(r, GpuSample)]
        clock.now_s += 1 / config.rate_hz
    return classify(build_window(samples, sole_gpu=True))


def test_shipped_agent_configs_sample_at_the_agent_defaults():
    defaults = AgentConfig()
    deploy = tomllib.loads((ROOT / "deploy" / "config" / "agent.toml").read_text())
    manifest = (ROOT / "deploy" / "k8s" / "base" / "agent.yaml").read_text()
    k8s = next(d for d in yaml.safe_load_all(manifest) if d and d.get("kind") == "ConfigMap")
    in_k8s = tomllib.loads(k8s["data"]["agent.toml"])
    for shipped in (deploy, in_k8s):
        assert (shipped.get("rate_hz", defaults.rate_hz), shipped.get("window_s", defaults.window_s)
                ) == (defaults.rate_hz, defaults.window_s) == (1.0, 5.0)


@pytest.mark.parametrize("source", ["fake h100 gemv", "H100 recording gemv_b1"])
def test_a_clean_window_at_the_shipped_defaults_has_the_documented_confidence(source: str):
    clock = FakeClock()
    if source.startswith("fake"):
        backend: GpuBackend = fake_backend("h100", workloads="gemv", clock=clock)
        warmup = 1  # GPM needs two counter samples before its first reading
    else:
        backend = ReplayBackend(read_trace(GEMV))
        warmup = 1  # the recording opens before the kernel starts
    verdict = window_at_defaults(backend, clock, warmup)
    assert verdict.verdict is Bound.MEMORY and verdict.active_samples == 5
    assert verdict.evidence_value("dram_pct").provenance.value == "gpm"
    assert verdict.confidence == documented_default_confidence() == 0.9


def test_design_and_incident_docs_show_the_default_confidence():
    figure = documented_default_confidence()
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = design.split("### §3.4 Confidence", 1)[1].split("\n### ", 1)[0]
    assert f"has confidence **{figure:.2f}**" in section
    incident = (ROOT / "docs" / "INCIDENT.md").read_text(encoding="utf-8")
    confs = re.findall(r"(?:memory|compute|host)-bound\s+(?:-|cpu|pcie|starved)\s+([0-9.]+)",
                       incident)
    assert confs and {float(c) for c in confs} == {figure}


def test_readme_diagnose_example_is_what_agentctl_prints():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```console\n\$ agentctl diagnose --replay (\S+)\n(.*?)```", readme, re.S)
    assert block
    result = CliRunner().invoke(main, ["diagnose", "--replay", str(ROOT / block[1])])
    assert result.exit_code == 0, result.output
    printed = result.stdout.replace(str(ROOT / block[1]), block[1])
    assert printed == block[2]
