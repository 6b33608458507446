"""CollectorConfig from TOML: defaults, overrides, and every mistake named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rooftop.collector.config import CollectorConfig, OtlpExport, load_config
from rooftop.common.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return path


def test_defaults_need_plaintext_asked_for():
    with pytest.raises(ConfigError, match="insecure"):
        load_config()
    config = load_config(insecure=True)
    assert config.listen == "127.0.0.1:4850"  # plaintext: loopback unless a listen is given
    assert load_config(insecure=True, listen="0.0.0.0:4850").listen == "0.0.0.0:4850"
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.prometheus_listen == "127.0.0.1:9464"
    assert config.otlp == ()
    assert config.max_series_per_metric >= 8000 * 6


def test_full_file(tmp_path: Path):
    path = write(
        tmp_path,
        """
[collector]
listen = "127.0.0.1:7000"
tls_cert_file = "certs/collector.crt"
tls_key_file = "/etc/rooftop/collector.key"
tls_client_ca_file = "certs/ca.crt"
token_file = "token"
max_message_bytes = 1048576
max_future_skew_s = 60
ack_every_batches = 16
ack_interval_s = 0.05
forget_after_s = 300

[prometheus]
listen = "0.0.0.0:0"

[[otlp]]
endpoint = "127.0.0.1:4317"
protocol = "grpc"
interval_s = 5
insecure = true

[[otlp]]
endpoint = "http://127.0.0.1:4318"
protocol = "http/protobuf"
headers = { "x-api-key" = "k" }

[metrics]
max_series_per_metric = 100000
""",
    )
    config = load_config(path)
    assert config.listen == "127.0.0.1:7000"
    assert config.tls_cert_file == tmp_path / "certs" / "collector.crt"
    assert config.tls_key_file == Path("/etc/rooftop/collector.key")
    assert config.token_file == tmp_path / "token"
    assert config.max_future_skew_s == 60.0 and isinstance(config.max_future_skew_s, float)
    assert config.prometheus_listen == "0.0.0.0:0"
    assert config.otlp == (
        OtlpExport(endpoint="127.0.0.1:4317", protocol="grpc", interval_s=5.0, insecure=True),
        OtlpExport(
            endpoint="http://127.0.0.1:4318/v1/metrics",  # the base URL + the metrics path
            protocol="http/protobuf",
            headers=(("x-api-key", "k"),),
        ),
    )
    assert config.max_series_per_metric == 100000
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = "x"  # type: ignore[misc]


def test_single_otlp_table_and_overrides(tmp_path: Path):
    path = write(
        tmp_path,
        '[collector]\ninsecure = true\n[otlp]\nendpoint = "collector:4317"\n',
    )
    config = load_config(path, listen="127.0.0.1:0", prometheus_listen="")
    assert config.listen == "127.0.0.1:0"
    assert config.prometheus_listen == ""
    assert [e.endpoint for e in config.otlp] == ["collector:4317"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[collector]\nlisten_addr = 'x:1'\n", "unknown key collector.listen_addr"),
        ("[colector]\ninsecure = true\n", r"unknown section \[colector\]"),
        ("[otlp]\nendpoint = 'x:1'\nprotocl = 'grpc'\n", "unknown key otlp.protocl"),
        ("[[otlp]]\nendpoint = 'x:1'\n[[otlp]]\nfoo = 1\n", r"unknown key otlp\[1\].foo"),
        (
            "[collector]\ninsecure = true\nmax_message_bytes = '4MiB'\n",
            "max_message_bytes must be int",
        ),
        (
            "[collector]\ninsecure = true\nack_interval_s = true\n",
            "must be a number, not a boolean",
        ),
        ("[collector]\ninsecure = true\nlisten = 'nohost'\n", "collector.listen must be HOST:PORT"),
        ("[collector]\ninsecure = true\nmax_message_bytes = 0\n", "must be positive"),
        ("[collector]\ninsecure = true\n[otlp]\nendpoint = 'x:1'\nprotocol = 'udp'\n", "protocol"),
        ("[collector]\ninsecure = true\n[otlp]\ninterval_s = 5\n", "otlp.endpoint: required"),
        ("[collector]\ntls_cert_file = 'a.crt'\n", "go together"),
        ("[collector\n", "invalid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_dataclass_validation_is_explicit():
    config = CollectorConfig(listen="127.0.0.1:0", insecure=True)
    assert config.validated() is config
