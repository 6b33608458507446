"""Credentials in the agent's and collector's configs: what is refused, and how it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.agent.config import ENV_VARS, load_config
from rooftop.agent.daemon import Agent
from rooftop.cli import main
from rooftop.collector.config import load_config as collector_config
from rooftop.common.errors import ConfigError
from tests.security.conftest import Certs


def test_agent_tls_keys_from_file_and_env(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text(
        'ca_file = "/etc/rooftop/ca.crt"\ncert_file = "/etc/rooftop/a.crt"\n'
        'key_file = "/etc/rooftop/a.key"\nserver_name = "collector.internal"\n'
    )
    cfg = load_config(path, env={"ROOFTOP_TOKEN_FILE": "/run/token"})
    assert cfg.ca_file == Path("/etc/rooftop/ca.crt") and cfg.key_file == Path("/etc/rooftop/a.key")
    assert cfg.token_file == Path("/run/token") and cfg.server_name == "collector.internal"
    assert ENV_VARS["ca_file"] == "ROOFTOP_CA_FILE"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cert_file": Path("a.crt")}, "cert_file and key_file go together"),
        ({"insecure": True, "token_file": Path("t")}, "never sent over plaintext"),
        ({"insecure": True, "ca_file": Path("ca.crt")}, "insecure = true .* contradicts ca_file"),
        ({"insecure": True, "server_name": "x"}, "contradicts server_name"),
    ],
)
def test_agent_refuses_contradictory_credentials(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=overrides)


def test_agent_needs_tls_or_explicit_plaintext(tmp_path: Path, certs: Certs):
    base = {"collectors": ("127.0.0.1:1",), "backend": "fake:h100", "spool_dir": tmp_path}
    with pytest.raises(ConfigError, match="insecure: TLS is not configured"):
        Agent(load_config(env={}, overrides=base), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        Agent(load_config(env={}, overrides={**base, "ca_file": certs.ca,
                                             "token_file": tmp_path / "none"}), env={})  # fmt: skip
    agent = Agent(load_config(env={}, overrides={**base, "ca_file": certs.ca}), env={})
    agent.backend.close()
    path = tmp_path / "a.toml"
    path.write_text(f'collectors = ["127.0.0.1:1"]\nbackend = "fake:h100"\nca_file = "{certs.ca}"\n'
                    f'token_file = "{tmp_path / "none"}"\nspool_dir = "{tmp_path}"\n')  # fmt: skip
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "token_file" in result.stderr and "cannot read" in result.stderr


def test_collector_read_token_and_tls_paths(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[collector]\ntls_cert_file = "c.crt"\ntls_key_file = "c.key"\n'
                    'token_file = "token"\nread_token_file = "read"\n')  # fmt: skip
    cfg = collector_config(path)
    assert cfg.read_token_file == tmp_path / "read"  # relative to the config file
    assert cfg.listen == "0.0.0.0:4850"  # TLS: every interface by default
    path.write_text('[collector]\ninsecure = true\nread_token_file = "read"\n')
    with pytest.raises(ConfigError, match="collector.read_token_file: a bearer token needs TLS"):
        collector_config(path)
    path.write_text('[collector]\ninsecure = true\nlisten = "0.0.0.0:9000"\n'
                    'allow_unauthenticated = true\n')
    assert collector_config(path).listen == "0.0.0.0:9000"  # explicit: as given
