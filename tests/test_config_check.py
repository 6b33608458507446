"""agentctl config example / check: the daemons' own start-up checks, effective config as TOML.

``config check`` must refuse what the daemon refuses (no destination, plaintext not
asked for, TLS and token files missing) with the daemon's message, and print the
effective settings as TOML that loads back to them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.agent.config import AgentConfig
from rooftop.agent.config import load_config as load_agent
from rooftop.agent.daemon import Agent
from rooftop.cli import main
from rooftop.collector.config import _SCHEMA
from rooftop.collector.config import load_config as load_collector
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.common.errors import ConfigError
from rooftop.common.otlp import OTLP_KEYS
from rooftop.config_check import EXAMPLES, detect_kind
from tests.security.pki import OPENSSL, Pki


def run(*args: str, env: dict[str, str] | None = None):
    # ROOFTOP_* and OTEL_* of the environment running the tests must not leak in.
    unset: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("ROOFTOP_", "OTEL_"))
    }
    return CliRunner().invoke(main, list(args), env={**unset, **(env or {})})


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def documented_keys(text: str) -> set[str]:
    return set(re.findall(r"^\s*#?\s*([a-z_]+)\s*=", text, re.M))


def otlp_block(text: str) -> set[str]:
    """The keys documented under the (commented) OTLP table of an example."""
    block = re.split(r"^#? ?\[\[?otlp\]\]?", text, maxsplit=1, flags=re.M)[1]
    return documented_keys(block)


# ---- the examples ---------------------------------------------------------------------


def test_agent_example_documents_every_key():
    text = EXAMPLES["agent"].read_text()
    fields = {f.name for f in dataclasses.fields(AgentConfig)} - {"otlp"}
    assert fields <= documented_keys(text), sorted(fields - documented_keys(text))
    assert otlp_block(text) == set(OTLP_KEYS)


def test_collector_example_documents_every_key():
    text = EXAMPLES["collector"].read_text()
    schema_keys = {k for table in _SCHEMA.values() for k in table}
    assert schema_keys <= documented_keys(text), sorted(schema_keys - documented_keys(text))
    assert otlp_block(text) == set(OTLP_KEYS)


def test_agent_example_values_are_the_defaults(tmp_path: Path):
    loaded = load_agent(write(tmp_path, "agent.toml", EXAMPLES["agent"].read_text()), env={})
    assert loaded == dataclasses.replace(AgentConfig(), agent_id=loaded.agent_id)


def test_agent_example_checks_once_it_has_somewhere_to_send(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text(run("config", "example", "agent").stdout)
    assert detect_kind(path.read_text()) == "agent"
    refused = run("config", "check", str(path))
    assert refused.exit_code == 1
    assert "collectors: set at least one collector address" in refused.stderr
    ok = run("config", "check", str(path),
             env={"ROOFTOP_COLLECTORS": "c:4850", "ROOFTOP_INSECURE": "true"})
    assert ok.exit_code == 0, ok.output
    assert f"# {path}: valid agent configuration" in ok.stdout


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI")
def test_collector_example_checks_once_its_certificate_exists(tmp_path: Path):
    path = tmp_path / "collector.toml"
    path.write_text(run("config", "example", "collector").stdout)
    assert detect_kind(path.read_text()) == "collector"
    refused = run("config", "check", str(path))
    assert refused.exit_code == 1
    assert (f"collector.tls_cert_file {tmp_path / 'collector.crt'}: cannot read: "
            "No such file or directory") in refused.stderr
    pki = Pki(tmp_path)
    pki.ca("ca")
    pki.issue("collector", ca="ca", cn="localhost", usage="serverAuth")
    ok = run("config", "check", str(path))
    assert ok.exit_code == 0, ok.output
    assert "valid collector configuration" in ok.stdout


# ---- what the daemon refuses, config check refuses ----------------------------------


AGENT_REFUSALS = [
    ("collectors = []\n", "collectors: set at least one collector address"),
    ('collectors = ["c:4850"]\n', "insecure: TLS is not configured"),
    ('collectors = ["c:4850"]\nca_file = "{d}/missing-ca.crt"\n',
     "ca_file {d}/missing-ca.crt: cannot read: No such file or directory"),
    ('collectors = ["c:4850"]\ncert_file = "{d}/a.crt"\nkey_file = "{d}/a.key"\n',
     "cert_file {d}/a.crt: cannot read"),
    ('collectors = ["c:4850"]\nca_file = "{d}/ca.crt"\ntoken_file = "{d}/no-token"\n',
     "token_file {d}/no-token: cannot read"),
    ('collectors = ["c:4850"]\nca_file = "{d}/ca.crt"\ntoken_file = "{d}/empty-token"\n',
     "token_file {d}/empty-token holds no token"),
    ('insecure = true\ncollectors = ["c:4850"]\nbackend = "replay:{d}/gone.jsonl"\n',
     "backend: {d}/gone.jsonl: cannot read: No such file or directory"),
]


@pytest.mark.parametrize(("text", "message"), AGENT_REFUSALS)
def test_agent_check_refuses_what_the_agent_refuses(tmp_path: Path, text: str, message: str):
    (tmp_path / "ca.crt").write_text("roots\n")
    (tmp_path / "empty-token").write_text("# no token yet\n")
    path = write(tmp_path, "agent.toml", text.format(d=tmp_path))
    message = message.format(d=tmp_path)
    checked = run("config", "check", str(path))
    assert checked.exit_code == 1
    assert checked.stderr.startswith(f"agentctl: error: {message}")
    # The daemon, given the same file, stops with the same words.
    with pytest.raises(ConfigError) as daemon:
        Agent(load_agent(path, env={}), env={})
    assert str(daemon.value).startswith(message)


COLLECTOR_REFUSALS = [
    ("[collector]\n", "collector.insecure: no TLS certificate configured"),
    ('[collector]\ntls_cert_file = "c.crt"\ntls_key_file = "c.key"\n',
     "collector.tls_cert_file {d}/c.crt: cannot read: No such file or directory"),
]


@pytest.mark.parametrize(("text", "message"), COLLECTOR_REFUSALS)
def test_collector_check_refuses_what_the_collector_refuses(tmp_path: Path, text: str,
                                                            message: str):
    path = write(tmp_path, "collector.toml", text)
    message = message.format(d=tmp_path)
    checked = run("config", "check", str(path))
    assert checked.exit_code == 1
    assert checked.stderr.startswith(f"agentctl: error: {message}")
    # The daemon loads the same file and builds its ingest server: the same words.
    with pytest.raises(ConfigError) as daemon:
        IngestServer(Fleet(), load_collector(path, env={}))
    assert str(daemon.value).startswith(message)


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI")
def test_collector_check_refuses_a_missing_or_empty_token_file(tmp_path: Path):
    pki = Pki(tmp_path)
    pki.ca("ca")
    pki.issue("server", ca="ca", cn="localhost", usage="serverAuth")
    head = '[collector]\ntls_cert_file = "server.crt"\ntls_key_file = "server.key"\n'
    missing = write(tmp_path, "a.toml", head + 'token_file = "token"\n')
    assert (f"collector.token_file {tmp_path / 'token'}: unreadable"
            in run("config", "check", str(missing)).stderr)
    (tmp_path / "read-token").write_text("\n# none yet\n")
    empty = write(tmp_path, "b.toml", head + 'read_token_file = "read-token"\n')
    assert "collector.read_token_file" in run("config", "check", str(empty)).stderr
    assert "holds no token" in run("config", "check", str(empty)).stderr


# ---- the effective configuration, as TOML -------------------------------------------


def test_agent_check_prints_toml_that_loads_back_to_the_same_config(tmp_path: Path):
    path = write(tmp_path, "agent.toml",
                 'agent_id = "n1"\ncollectors = ["c:4850"]\ninsecure = true\n'
                 'spool_dir = "/tmp/spool \\"x\\""\n'
                 '[otlp]\nendpoint = "http://otel:4318"\nprotocol = "http/protobuf"\n')
    checked = run("config", "check", str(path), env={"ROOFTOP_RATE_HZ": "10"})
    assert checked.exit_code == 0, checked.output
    assert "Path(" not in checked.stdout and "OtlpExport(" not in checked.stdout
    assert "rate_hz = 10.0" in checked.stdout
    again = write(tmp_path, "again.toml", checked.stdout)
    assert load_agent(again, env={}) == load_agent(path, env={"ROOFTOP_RATE_HZ": "10"})


def test_collector_check_prints_toml_that_loads_back_to_the_same_config(tmp_path: Path):
    path = write(tmp_path, "collector.toml",
                 '[collector]\ninsecure = true\n[prometheus]\nlisten = ""\n'
                 '[[otlp]]\nendpoint = "otel:4317"\ninsecure = true\n'
                 '[[otlp]]\nendpoint = "https://otel:4318"\nprotocol = "http/protobuf"\n')
    env = {"ROOFTOP_COLLECTOR_FORGET_AFTER_S": "60"}
    checked = run("config", "check", str(path), env=env)
    assert checked.exit_code == 0, checked.output
    parsed = tomllib.loads(checked.stdout)
    assert parsed["collector"]["forget_after_s"] == 60.0
    assert [t["endpoint"] for t in parsed["otlp"]] == ["otel:4317", "https://otel:4318/v1/metrics"]
    again = write(tmp_path, "again.toml", checked.stdout)
    assert load_collector(again, env={}) == load_collector(path, env=env)


def test_check_redacts_otlp_header_values(tmp_path: Path):
    path = write(tmp_path, "agent.toml",
                 '[otlp]\nendpoint = "otel:4317"\nheaders = { "x-api-key" = "s3cret" }\n')
    checked = run("config", "check", str(path))
    assert checked.exit_code == 0, checked.output
    assert "s3cret" not in checked.stdout
    assert tomllib.loads(checked.stdout)["otlp"]["headers"] == {"x-api-key": "<redacted>"}


# ---- errors name the key and its line; the environment counts -----------------------


def test_check_names_the_bad_key_and_its_line(tmp_path: Path):
    path = write(tmp_path, "agent.toml", 'collectors = ["c:4850"]\ninsecure = true\nrate_hzz = 2\n')
    result = run("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}:3" in result.stderr and "rate_hzz" in result.stderr


def test_check_names_a_bad_collector_key_and_its_line(tmp_path: Path):
    path = write(tmp_path, "collector.toml", '[collector]\ninsecure = true\nlisten_addr = "x"\n')
    result = run("config", "check", str(path))
    assert result.exit_code == 1
    assert f"{path}:3" in result.stderr and "listen_addr" in result.stderr


def test_check_applies_collector_environment_overrides(tmp_path: Path):
    path = write(tmp_path, "collector.toml", "[collector]\ninsecure = true\n")
    result = run("config", "check", str(path),
                 env={"ROOFTOP_PROMETHEUS_LISTEN": "127.0.0.1:19464"})
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["prometheus"]["listen"] == "127.0.0.1:19464"
    bad = run("config", "check", str(path), env={"ROOFTOP_COLLECTOR_INSECURE": "maybe"})
    assert bad.exit_code == 1 and "ROOFTOP_COLLECTOR_INSECURE" in bad.stderr
