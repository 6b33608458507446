"""CollectorConfig from TOML: defaults, overrides, and every mistake named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rooftop.collector.config import _SCHEMA, CollectorConfig, OtlpExport, SecurityMode, load_config
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
    # Off loopback plaintext authenticates nobody: only when that is asked for too.
    open_door = load_config(insecure=True, listen="0.0.0.0:4850", allow_unauthenticated=True)
    assert open_door.listen == "0.0.0.0:4850"
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
        ("[collector\n", "not valid TOML"),
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


# ---- the security mode: no accidental open door (issue 14, item 2) ----------------------

_TLS = '[collector]\nlisten = "{listen}"\ntls_cert_file = "c.crt"\ntls_key_file = "c.key"\n'


@pytest.mark.parametrize(
    ("extra", "mode"),
    [
        ("", SecurityMode.TLS),
        ('read_token_file = "r"\n', SecurityMode.TLS),  # guards Query only: Ingest stays open
        ('token_file = "t"\n', SecurityMode.TLS_TOKEN),
        ('tls_client_ca_file = "ca.crt"\n', SecurityMode.MTLS),
        ('tls_client_ca_file = "ca.crt"\ntoken_file = "t"\n', SecurityMode.MTLS_TOKEN),
    ],
)
def test_every_tls_combination_is_one_mode(tmp_path: Path, extra: str, mode: SecurityMode):
    config = load_config(write(tmp_path, _TLS.format(listen="127.0.0.1:4850") + extra), env={})
    assert config.security_mode is mode
    assert load_config(insecure=True, env={}).security_mode is SecurityMode.PLAINTEXT


@pytest.mark.parametrize("listen", ["0.0.0.0:4850", "[::]:4850", "10.0.0.5:4850", "node:4850"])
def test_tls_that_authenticates_nobody_is_refused_off_loopback(tmp_path: Path, listen: str):
    path = write(tmp_path, _TLS.format(listen=listen))
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    message = str(refused.value)
    assert message.startswith(f"{path}:2: collector.listen: TLS authenticates no agent")
    assert "token_file" in message and "tls_client_ca_file" in message
    assert "allow_unauthenticated = true" in message


def test_plaintext_off_loopback_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="plaintext authenticates no agent, and 0.0.0.0:4850"):
        load_config(insecure=True, listen="0.0.0.0:4850", env={})
    allowed = load_config(insecure=True, listen="0.0.0.0:4850", allow_unauthenticated=True, env={})
    assert allowed.allow_unauthenticated and allowed.security_mode is SecurityMode.PLAINTEXT


@pytest.mark.parametrize("listen", ["127.0.0.1:4850", "127.0.0.2:0", "[::1]:4850", "localhost:1"])
def test_unauthenticated_modes_on_loopback_need_no_opt_in(tmp_path: Path, listen: str):
    assert load_config(write(tmp_path, _TLS.format(listen=listen)), env={}).listen == listen


def test_allow_unauthenticated_from_file_and_environment(tmp_path: Path):
    path = write(tmp_path, _TLS.format(listen="0.0.0.0:4850") + "allow_unauthenticated = true\n")
    assert load_config(path, env={}).security_mode is SecurityMode.TLS
    bare = write(tmp_path, _TLS.format(listen="0.0.0.0:4850"))
    env = {"ROOFTOP_COLLECTOR_ALLOW_UNAUTHENTICATED": "true"}
    assert load_config(bare, env=env).allow_unauthenticated


def test_authenticating_modes_start_on_every_interface(tmp_path: Path):
    text = _TLS.format(listen="0.0.0.0:4850") + 'token_file = "t"\n'
    assert load_config(write(tmp_path, text), env={}).listen == "0.0.0.0:4850"


# ---- configs fail at load time, clearly (issue 14, item 7) ------------------------------


_FLOAT_KEYS = sorted(
    f"{section}.{key}"
    for section, table in _SCHEMA.items()
    for key, (_, typ) in table.items()
    if typ == (int, float) or typ is float
)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dotted", _FLOAT_KEYS)
def test_nan_and_inf_are_refused_for_every_float_key(tmp_path: Path, dotted: str, value: str):
    section, key = dotted.split(".")
    line = f"{key} = {value}\n"
    table = line if section == "collector" else f"[{section}]\n{line}"
    text = "[collector]\ninsecure = true\n" + table
    with pytest.raises(ConfigError, match=rf"{dotted} must be positive and finite"):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize("value", [1, 1024, 2**31, 99_999_999_999_999])
def test_absurd_max_message_bytes_is_a_range_error_naming_the_key(tmp_path: Path, value: int):
    path = write(tmp_path, f"[collector]\ninsecure = true\nmax_message_bytes = {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert str(refused.value) == (
        f"{path}:3: collector.max_message_bytes must be 65536 (64 KiB) to 1073741824 (1 GiB) "
        f"(got {value})"
    )


def test_value_errors_name_the_line_of_the_key(tmp_path: Path):
    path = write(tmp_path, "[collector]\ninsecure = true\n\nforget_after_s = -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: collector.forget_after_s must be positive"):
        load_config(path, env={})


def test_an_error_names_the_key_in_its_own_table(tmp_path: Path):
    # [prometheus] listen comes first; the bad collector.listen is on line 4.
    path = write(tmp_path, '[prometheus]\nlisten = "127.0.0.1:0"\n[collector]\nlisten = "nohost"\n'
                           "insecure = true\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: collector.listen must be HOST:PORT"):
        load_config(path, env={})


def test_an_otlp_error_names_the_line_in_its_own_table(tmp_path: Path):
    path = write(tmp_path, "[collector]\ninsecure = true\n"
                           '[[otlp]]\nendpoint = "a:4317"\nprotocol = "grpc"\n'
                           '[[otlp]]\nendpoint = "b:4317"\nprotocol = "http"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:8: otlp\[1\].protocol"):
        load_config(path, env={})


def test_a_non_utf8_file_names_its_line_and_byte_offset(tmp_path: Path):
    path = tmp_path / "collector.toml"
    path.write_bytes(b"[collector]\ninsecure = true\n# caf\xe9\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert str(refused.value) == (
        f"{path}:3: not UTF-8 text (byte offset 33: invalid continuation byte); "
        "save the file as UTF-8"
    )


def test_remote_write_tables_are_read_with_paths_beside_the_file(tmp_path: Path):
    path = write(
        tmp_path,
        "[collector]\ninsecure = true\n"
        '[[remote_write]]\nurl = "http://prom-a:9090/api/v1/write"\n'
        'bearer_token_file = "rw-token"\nmax_samples_per_send = 500\n'
        '[[remote_write]]\nurl = "https://mimir.example/api/v1/push"\nca_file = "/etc/ca.crt"\n'
        "find_repeats = true\n",
    )
    cfg = load_config(path, env={})
    first, second = cfg.remote_write
    assert first.url == "http://prom-a:9090/api/v1/write"
    assert first.bearer_token_file == tmp_path / "rw-token"
    assert first.max_samples_per_send == 500
    assert (second.ca_file, second.find_repeats) == (Path("/etc/ca.crt"), True)
    assert load_config(write(tmp_path, "[collector]\ninsecure = true\n"), env={}).remote_write == ()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('url = "prom:9090"', "remote_write.url must be an http:// or https:// URL"),
        ("timeout_s = 1", "remote_write.url must be an http"),
        ('url = "http://p/w"\nqueue = 5', "unknown key remote_write.queue"),
        ('url = "http://p/w"\ntimeout_s = nan', "remote_write.timeout_s must be positive"),
        ('url = "http://p/w"\nmax_samples_per_send = 0', "max_samples_per_send must be positive"),
        ('url = "http://p/w"\nfind_repeats = 1', "remote_write.find_repeats must be bool"),
        ('url = "http://p/w"\nmin_backoff_s = 9', "max_backoff_s must be at least min_backoff_s"),
        (
            'url = "http://p/w"\nqueue_max_samples = 10',
            "queue_max_samples must be at least max_samples_per_send",
        ),
    ],
)
def test_remote_write_mistakes_are_named_with_their_line(
    tmp_path: Path, table: str, message: str
):
    path = write(tmp_path, f"[collector]\ninsecure = true\n[[remote_write]]\n{table}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, env={})
    assert str(err.value).startswith(f"{path}:")
