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
from rooftop.collector.config import _REMOTE_WRITE, _SCHEMA
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


def test_collector_example_documents_every_remote_write_key():
    text = EXAMPLES["collector"].read_text()
    block = re.split(r"^# \[\[remote_write\]\]", text, maxsplit=1, flags=re.M)[1]
    block = re.split(r"^# OTLP export", block, maxsplit=1, flags=re.M)[0]
    assert documented_keys(block) == set(_REMOTE_WRITE)


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
    # A certificate beside it is not enough: the example asks agents for a token.
    no_token = run("config", "check", str(path))
    assert no_token.exit_code == 1
    assert f"collector.token_file {tmp_path / 'token'}: unreadable" in no_token.stderr
    (tmp_path / "token").write_text("s3cret\n")
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
    ('[collector]\nlisten = "127.0.0.1:4850"\ntls_cert_file = "c.crt"\ntls_key_file = "c.key"\n',
     "collector.tls_cert_file {d}/c.crt: cannot read: No such file or directory"),
    ('[collector]\ntls_cert_file = "c.crt"\ntls_key_file = "c.key"\n',
     "collector.listen: TLS authenticates no agent, and 0.0.0.0:4850 is not loopback"),
    ('[collector]\ninsecure = true\nlisten = "10.0.0.5:4850"\n',
     "collector.listen: plaintext authenticates no agent, and 10.0.0.5:4850 is not loopback"),
]


@pytest.mark.parametrize(("text", "message"), COLLECTOR_REFUSALS)
def test_collector_check_refuses_what_the_collector_refuses(tmp_path: Path, text: str,
                                                            message: str):
    path = write(tmp_path, "collector.toml", text)
    message = message.format(d=tmp_path)
    checked = run("config", "check", str(path))
    assert checked.exit_code == 1
    assert checked.stderr.startswith("agentctl: error: ") and checked.stderr.count("\n") == 1
    assert message in checked.stderr
    # The daemon loads the same file and builds its ingest server: the same words.
    with pytest.raises(ConfigError) as daemon:
        IngestServer(Fleet(), load_collector(path, env={}))
    assert message in str(daemon.value)


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI")
def test_collector_check_refuses_a_missing_or_empty_token_file(tmp_path: Path):
    pki = Pki(tmp_path)
    pki.ca("ca")
    pki.issue("server", ca="ca", cn="localhost", usage="serverAuth")
    head = ('[collector]\nlisten = "127.0.0.1:0"\n'
            'tls_cert_file = "server.crt"\ntls_key_file = "server.key"\n')
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


# ---- no accidental open door; configs fail at check time, clearly (issue 14) ------------


@pytest.fixture(scope="module")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``server.crt``/``server.key`` for localhost and an unrelated ``other.key``."""
    if OPENSSL is None:
        pytest.skip("needs the openssl CLI")
    root = tmp_path_factory.mktemp("pki")
    pki = Pki(root)
    pki.ca("ca")
    pki.issue("server", ca="ca", cn="localhost", usage="serverAuth")
    pki.issue("other", ca="ca", cn="other")
    return root


def test_example_without_a_token_refuses_to_open_the_door(tmp_path: Path, server_pki: Path):
    # The report: the example config, a certificate beside it and no token served TLS on
    # 0.0.0.0 to anyone. Drop the example's token_file: config check and start refuse.
    text = run("config", "example", "collector").stdout
    assert re.search(r"^token_file = ", text, re.M)  # the example itself asks for a token
    path = write(tmp_path, "collector.toml", re.sub(r"^token_file = .*$", "", text, flags=re.M)
                 .replace('"collector.crt"', f'"{server_pki / "server.crt"}"')
                 .replace('"collector.key"', f'"{server_pki / "server.key"}"'))
    expected = "collector.listen: TLS authenticates no agent, and 0.0.0.0:4850 is not loopback"
    for result in (run("config", "check", str(path)), run("collector", "--config", str(path))):
        assert result.exit_code == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
        assert f"agentctl: error: {path}:8: {expected}" in result.stderr
        assert "allow_unauthenticated = true (--allow-unauthenticated)" in result.stderr
    allowed = run("config", "check", str(path),
                  env={"ROOFTOP_COLLECTOR_ALLOW_UNAUTHENTICATED": "true"})
    assert allowed.exit_code == 0, allowed.output
    assert "allow_unauthenticated = true" in allowed.stdout


@pytest.mark.parametrize("kind", ["agent", "collector"])
def test_a_non_utf8_file_is_one_line_naming_the_byte_offset(tmp_path: Path, kind: str):
    path = tmp_path / f"{kind}.toml"
    head = b'collectors = ["c:1"]\n' if kind == "agent" else b"[collector]\n"
    path.write_bytes(head + b"# \xff\n")
    expected = (f"agentctl: error: {path}:2: not UTF-8 text (byte offset {len(head) + 2}: "
                "invalid start byte); save the file as UTF-8\n")
    assert run("config", "check", str(path)).stderr == expected
    assert run(kind, "--config", str(path)).stderr == expected


def test_check_refuses_a_key_that_does_not_match_the_certificate(tmp_path: Path,
                                                                server_pki: Path):
    crt, other = server_pki / "server.crt", server_pki / "other.key"
    collector = write(tmp_path, "c.toml", f'[collector]\nlisten = "127.0.0.1:0"\n'
                      f'tls_cert_file = "{crt}"\ntls_key_file = "{other}"\n')
    checked = run("config", "check", str(collector))
    assert checked.exit_code == 1
    assert checked.stderr == (f"agentctl: error: collector.tls_key_file {other} does not match "
                              f"tls_cert_file {crt}\n")
    agent = write(tmp_path, "a.toml", f'collectors = ["c:4850"]\ncert_file = "{crt}"\n'
                  f'key_file = "{other}"\n')
    checked = run("config", "check", str(agent))
    assert checked.exit_code == 1
    assert checked.stderr == f"agentctl: error: key_file {other} does not match cert_file {crt}\n"


def test_a_missing_token_file_names_key_and_path_without_errno(tmp_path: Path,
                                                              server_pki: Path):
    agent = write(tmp_path, "a.toml", f'collectors = ["c:4850"]\ntoken_file = "{tmp_path}/t"\n')
    collector = write(tmp_path, "c.toml", f'[collector]\ntls_cert_file = "{server_pki}/server.crt"'
                      f'\ntls_key_file = "{server_pki}/server.key"\ntoken_file = "t"\n')
    for path, key in ((agent, "token_file"), (collector, "collector.token_file")):
        stderr = run("config", "check", str(path)).stderr
        assert stderr.startswith(f"agentctl: error: {key} {tmp_path}/t: ")
        assert stderr.endswith("No such file or directory\n") and "Errno" not in stderr


def test_check_refuses_an_absurd_max_message_bytes_naming_the_key(tmp_path: Path):
    collector = write(tmp_path, "c.toml", "[collector]\ninsecure = true\n"
                      "max_message_bytes = 99999999999999\n")
    checked = run("config", "check", str(collector))
    assert checked.exit_code == 1
    assert f"{collector}:3: collector.max_message_bytes must be 65536" in checked.stderr
    agent = write(tmp_path, "a.toml", 'collectors = ["c:1"]\ninsecure = true\n'
                  "max_message_bytes = 99999999999999\n")
    checked = run("config", "check", str(agent))
    assert checked.exit_code == 1
    assert f"{agent}:3: max_message_bytes must be at most 1073741824" in checked.stderr


def test_check_prints_remote_write_and_refuses_a_missing_token_file(tmp_path: Path):
    path = tmp_path / "collector.toml"
    path.write_text(
        '[collector]\ninsecure = true\n[[remote_write]]\nurl = "http://prom:9090/api/v1/write"\n'
        'bearer_token_file = "rw-token"\n'
    )
    refused = run("config", "check", str(path), env={})
    assert refused.exit_code == 1
    missing = tmp_path / "rw-token"
    assert f"remote_write.bearer_token_file: {missing}: no such file" in refused.stderr
    (tmp_path / "rw-token").write_text("secret\n")
    ok = run("config", "check", str(path), env={})
    assert ok.exit_code == 0, ok.output
    assert '[[remote_write]]\nurl = "http://prom:9090/api/v1/write"' in ok.stdout
