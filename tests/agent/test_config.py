"""AgentConfig: TOML, ROOFTOP_* env overrides, errors that name the key and line."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from rooftop.agent.config import CONFIG_ENV, ENV_VARS, AgentConfig, load_config
from rooftop.common.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config(env={})
    assert cfg.agent_id == socket.gethostname()
    assert cfg.rate_hz == 1.0 and cfg.window_s == 5.0
    assert cfg.spool_max_bytes == 256 * 1024 * 1024
    assert cfg.fsync_interval_s == 0.5
    assert cfg.backend == "nvml"
    assert cfg.keepalive_time_s == 30 and cfg.keepalive_timeout_s == 10
    assert cfg.batch_max_bytes == 1024 * 1024 and cfg.batch_max_samples == 500
    assert cfg.insecure is False


@pytest.mark.parametrize("fmt", ["auto", "records", "columns"])
def test_batch_format_is_auto_by_default_and_takes_each_format(tmp_path: Path, fmt: str):
    assert load_config(env={}).batch_format == "auto"
    assert load_config(write(tmp_path, f'batch_format = "{fmt}"\n'), env={}).batch_format == fmt


def test_an_unknown_batch_format_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="batch_format: 'column' is not one of auto, records"):
        load_config(env={}, overrides={"batch_format": "column"})


def test_toml_file_is_read_and_typed(tmp_path: Path):
    path = write(
        tmp_path,
        """
agent_id = "gpu-17"
collectors = ["a:7443", "b:7443"]
insecure = true
backend = "fake:h100"
rate_hz = 10          # an integer is fine where a number is due
spool_dir = "/tmp/x"
spool_max_bytes = 1_048_576
spool_segment_bytes = 65536
""",
    )
    cfg = load_config(path, env={})
    assert cfg.agent_id == "gpu-17"
    assert cfg.collectors == ("a:7443", "b:7443")
    assert cfg.insecure is True
    assert cfg.rate_hz == 10.0 and isinstance(cfg.rate_hz, float)
    assert cfg.spool_dir == Path("/tmp/x")
    assert cfg.spool_max_bytes == 1_048_576


def test_env_overrides_file_and_overrides_win(tmp_path: Path):
    path = write(tmp_path, 'rate_hz = 2\ncollectors = ["a:1"]\n')
    env = {"ROOFTOP_RATE_HZ": "5", "ROOFTOP_COLLECTORS": "x:1, y:2", "ROOFTOP_INSECURE": "yes"}
    cfg = load_config(path, env=env, overrides={"backend": "fake:a100"})
    assert cfg.rate_hz == 5.0
    assert cfg.collectors == ("x:1", "y:2")
    assert cfg.insecure is True
    assert cfg.backend == "fake:a100"


def test_config_path_from_env(tmp_path: Path):
    path = write(tmp_path, 'agent_id = "from-env-file"\n')
    assert load_config(env={CONFIG_ENV: str(path)}).agent_id == "from-env-file"


def test_every_key_but_the_otlp_table_has_one_env_name():
    # [otlp] takes the standard OTEL_EXPORTER_OTLP_* variables (rooftop.common.otlp).
    keys = [f.name for f in dataclasses.fields(AgentConfig)]
    assert list(ENV_VARS) == [k for k in keys if k != "otlp"]
    assert all(name == "ROOFTOP_" + key.upper() for key, name in ENV_VARS.items())


def test_unknown_key_names_key_and_line(tmp_path: Path):
    path = write(tmp_path, 'agent_id = "a"\n\nrate_hzz = 1\n')
    with pytest.raises(ConfigError, match=r"agent\.toml:3: unknown key 'rate_hzz'"):
        load_config(path, env={})


def test_unknown_table_is_an_unknown_key(tmp_path: Path):
    path = write(tmp_path, 'rate_hz = 1\n[tls]\nca = "x"\n')
    with pytest.raises(ConfigError, match=r":2: unknown key 'tls'"):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('rate_hz = "fast"', "rate_hz"),
        ("insecure = 1", "insecure"),
        ("spool_max_bytes = 1.5", "spool_max_bytes"),
        ("batch_max_samples = true", "batch_max_samples"),
        ("collectors = [1, 2]", "collectors"),
        ("agent_id = 7", "agent_id"),
    ],
)
def test_bad_type_names_key_and_line(tmp_path: Path, line: str, key: str):
    path = write(tmp_path, f"# comment\n{line}\n")
    with pytest.raises(ConfigError, match=rf"agent\.toml:2: {key}: expected"):
        load_config(path, env={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="ROOFTOP_RATE_HZ: expected a number"):
        load_config(env={"ROOFTOP_RATE_HZ": "fast"})
    with pytest.raises(ConfigError, match="ROOFTOP_INSECURE: expected true or false"):
        load_config(env={"ROOFTOP_INSECURE": "maybe"})


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"rate_hz": 0}, "rate_hz"),
        ({"rate_hz": float("nan")}, "rate_hz"),
        ({"window_s": 0.5}, "window_s"),
        ({"backend": "cuda"}, "backend"),
        ({"spool_segment_bytes": 300 * 1024 * 1024}, "spool_segment_bytes"),
        ({"max_message_bytes": 1024 * 1024}, "max_message_bytes"),
        ({"fsync_interval_s": -1.0}, "fsync_interval_s"),
        ({"collectors": ("a b",)}, "collectors"),
        ({"hostname": "gpu node"}, "hostname"),
    ],
)
def test_out_of_range_values_name_the_key(values: dict, key: str):
    with pytest.raises(ConfigError, match=key):
        load_config(env={}, overrides=values)


def test_out_of_range_in_file_names_the_file_and_line(tmp_path: Path):
    path = write(tmp_path, "agent_id = 'n1'\nrate_hz = 0\n")
    with pytest.raises(ConfigError, match=r"agent\.toml:2: rate_hz must be > 0"):
        load_config(path, env={})


def test_invalid_toml_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="line 1"):
        load_config(write(tmp_path, "rate_hz = = 1\n"), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


@pytest.mark.parametrize(
    "backend", ["nvml", "fake:h100", "fake:a100", "fake:h100:gemv,gemm", "replay:/data/trace.jsonl"]
)
def test_backends_accepted(backend: str):
    assert load_config(env={}, overrides={"backend": backend}).backend == backend


def test_config_is_frozen():
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rate_hz = 3  # type: ignore[misc]


# ---- configs fail at load time, clearly (issue 14, item 7) ------------------------------

_FLOAT_KEYS = sorted(f.name for f in dataclasses.fields(AgentConfig) if f.type == "float")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", _FLOAT_KEYS)
def test_nan_and_inf_are_refused_for_every_float_key(tmp_path: Path, key: str, value: str):
    path = write(tmp_path, f"agent_id = 'n1'\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: {key} must be"):
        load_config(path, env={})


@pytest.mark.parametrize("key", ["interval_s", "timeout_s"])
def test_nan_is_refused_for_the_otlp_intervals(tmp_path: Path, key: str):
    path = write(tmp_path, f"[otlp]\nendpoint = 'otel:4317'\n{key} = nan\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: otlp.{key}: must be > 0 seconds"):
        load_config(path, env={})


def test_an_absurd_max_message_bytes_is_a_range_error(tmp_path: Path):
    path = write(tmp_path, "max_message_bytes = 99999999999999\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: max_message_bytes must be at most"):
        load_config(path, env={})


def test_an_otlp_error_names_the_line_in_the_otlp_table(tmp_path: Path):
    # The top-level insecure comes first; the [otlp] one at line 5 is the mistake.
    path = write(tmp_path, "insecure = true\ncollectors = ['c:1']\n[otlp]\n"
                           "endpoint = 'https://otel:4317'\ninsecure = true\n")
    with pytest.raises(ConfigError, match=rf"^{path}:5: otlp.insecure"):
        load_config(path, env={})


def test_a_non_utf8_file_names_the_line_and_byte_offset(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b"rate_hz = 1\n\xc3\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: not UTF-8 text \(byte offset 12: "):
        load_config(path, env={})


@pytest.mark.parametrize("key", ["agent_id", "hostname"])
@pytest.mark.parametrize("value", ["node\\u001b]0;pwned\\u0007", "node\\r\\nforged"])
def test_an_identity_with_control_characters_is_refused_at_start(
    tmp_path: Path, key: str, value: str
):
    # The collector would refuse every batch (bad_identity): the agent says so at once.
    path = write(tmp_path, f'{key} = "{value}"\ncollectors = ["c:4850"]\ninsecure = true\n')
    with pytest.raises(ConfigError, match=rf"{key}.*\\x1b|{key}.*\\r") as err:
        load_config(path, env={})
    assert "\x1b" not in str(err.value) and "\r" not in str(err.value)
