"""agentctl config example / check: documented defaults, named errors, env overrides."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.agent.config import AgentConfig
from rooftop.cli import main
from rooftop.collector.config import _SCHEMA
from rooftop.config_check import EXAMPLES, detect_kind


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def documented_keys(text: str) -> set[str]:
    return set(re.findall(r"^\s*#?\s*([a-z_]+)\s*=", text, re.M))


def test_agent_example_documents_every_key():
    keys = documented_keys(EXAMPLES["agent"].read_text())
    flat = {k if k in keys else k.removeprefix("otlp_") for k in
            (f.name for f in dataclasses.fields(AgentConfig))}
    assert flat <= keys, sorted(flat - keys)


def test_collector_example_documents_every_key():
    keys = documented_keys(EXAMPLES["collector"].read_text())
    schema_keys = {k for table in _SCHEMA.values() for k in table}
    assert schema_keys <= keys, sorted(schema_keys - keys)


@pytest.mark.parametrize("kind", ["agent", "collector"])
def test_example_prints_and_checks_clean(tmp_path: Path, kind: str):
    result = run("config", "example", kind)
    assert result.exit_code == 0
    path = tmp_path / f"{kind}.toml"
    path.write_text(result.stdout)
    assert detect_kind(result.stdout) == kind
    checked = run("config", "check", str(path))
    assert checked.exit_code == 0, checked.output
    assert f"valid {kind} configuration" in checked.stdout


def test_agent_example_values_are_the_defaults(tmp_path: Path):
    from rooftop.agent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text(EXAMPLES["agent"].read_text())
    loaded = load_config(path, env={})
    assert loaded == dataclasses.replace(AgentConfig(), agent_id=loaded.agent_id)


def test_check_names_the_bad_key_and_its_line(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text('collectors = ["c:4850"]\ninsecure = true\nrate_hzz = 2\n')
    result = run("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}:3" in result.stderr and "rate_hzz" in result.stderr


def test_check_names_a_bad_collector_key_and_its_line(tmp_path: Path):
    path = tmp_path / "collector.toml"
    path.write_text('[collector]\ninsecure = true\nlisten_addr = "x"\n')
    result = run("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}:3" in result.stderr and "listen_addr" in result.stderr


def test_check_applies_environment_overrides(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text('collectors = ["c:4850"]\ninsecure = true\n')
    result = run("config", "check", str(path), env={"ROOFTOP_RATE_HZ": "10"})
    assert result.exit_code == 0
    assert "rate_hz = 10.0" in result.stdout


def test_collector_environment_overrides(tmp_path: Path):
    path = tmp_path / "collector.toml"
    path.write_text("[collector]\ninsecure = true\n")
    result = run("config", "check", str(path),
                 env={"ROOFTOP_PROMETHEUS_LISTEN": "127.0.0.1:19464"})
    assert result.exit_code == 0, result.output
    assert "prometheus_listen = '127.0.0.1:19464'" in result.stdout
    bad = run("config", "check", str(path), env={"ROOFTOP_COLLECTOR_INSECURE": "maybe"})
    assert bad.exit_code == 1 and "ROOFTOP_COLLECTOR_INSECURE" in bad.stderr
