"""The collector's configuration: a frozen ``CollectorConfig`` read from TOML.

::

    [collector]
    listen = "0.0.0.0:4850"          # gRPC ingest + Query (default 127.0.0.1:4850 if insecure)
    insecure = false                 # plaintext only when asked for explicitly
    tls_cert_file = "collector.crt"  # relative paths are relative to this file
    tls_key_file = "collector.key"
    tls_client_ca_file = "agents-ca.crt"  # set: mTLS, agent_id must match the cert
    token_file = "token"             # bearer token(s) agents must present, one per line
    read_token_file = "read-token"   # token(s) that may call Query but not Ingest
    max_message_bytes = 4194304      # bigger messages: RESOURCE_EXHAUSTED
    max_future_skew_s = 300          # sample times further ahead are clamped
    ack_every_batches = 32           # at most this many batches per ack (agent window: 64)
    ack_interval_s = 0.1             # ...and no batch waits longer for its ack
    forget_after_s = 900             # series of silent agents/GPUs then disappear

    [prometheus]
    listen = "127.0.0.1:9464"        # "" disables; port 0 picks a free one

    [[otlp]]                         # or a single [otlp] table; none by default
    endpoint = "http://otel-collector:4317"
    protocol = "grpc"                # or "http/protobuf" (/v1/metrics is appended)
    interval_s = 10
    timeout_s = 10
    insecure = true
    headers = { "x-api-key" = "..." }

    [metrics]
    max_series_per_metric = 65536    # fits 1,000 nodes x 8 GPUs x 6 bound states

``[[otlp]]`` takes the agent's ``[otlp]`` keys and values (``rooftop.common.otlp``);
the standard ``OTEL_EXPORTER_OTLP_*`` variables fill in what a table leaves out, and
with no table ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone adds one export.

An unknown section or key is a ``ConfigError`` naming it: a typo must not silently
fall back to a default. Certificates, keys and token files are re-read when they
change (see ``rooftop.collector.ingest``); a token needs TLS (it is never accepted in the
clear), and plaintext without an explicit listen address binds to loopback only.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rooftop.common.configfile import located
from rooftop.common.errors import ConfigError
from rooftop.common.otlp import OtlpExport, otlp_exports

__all__ = ["CollectorConfig", "OtlpExport", "load_config"]

DEFAULT_LISTEN = "0.0.0.0:4850"
# Plaintext (insecure) without an explicit listen address: this host only.
DEFAULT_INSECURE_LISTEN = "127.0.0.1:4850"
DEFAULT_PROMETHEUS = "127.0.0.1:9464"
MIB = 1024 * 1024

@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """Everything ``agentctl collector`` needs; see the module docstring for the file."""

    listen: str = DEFAULT_LISTEN
    insecure: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    token_file: Path | None = None
    read_token_file: Path | None = None
    max_message_bytes: int = 4 * MIB
    max_future_skew_s: float = 300.0
    ack_every_batches: int = 32
    ack_interval_s: float = 0.1
    forget_after_s: float = 900.0
    prometheus_listen: str = DEFAULT_PROMETHEUS
    otlp: tuple[OtlpExport, ...] = ()
    max_series_per_metric: int = 65_536

    def validated(self) -> CollectorConfig:
        """Check cross-field rules; returns self.

        Raises:
            ConfigError: naming the offending key.
        """
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("collector.tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("collector.tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.tls_cert_file is None and not self.insecure:
            raise ConfigError(
                "collector.insecure: no TLS certificate configured; set tls_cert_file and "
                "tls_key_file, or ask for plaintext explicitly (insecure = true, --insecure)"
            )
        tokens = {"token_file": self.token_file, "read_token_file": self.read_token_file}
        for key, path in tokens.items():
            if path is not None and self.tls_cert_file is None:
                raise ConfigError(
                    f"collector.{key}: a bearer token needs TLS (tls_cert_file and tls_key_file);"
                    " over plaintext it would travel in the clear"
                )
        positive = {
            "collector.max_message_bytes": self.max_message_bytes,
            "collector.ack_every_batches": self.ack_every_batches,
            "collector.ack_interval_s": self.ack_interval_s,
            "collector.forget_after_s": self.forget_after_s,
            "collector.max_future_skew_s": self.max_future_skew_s,
            "metrics.max_series_per_metric": self.max_series_per_metric,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive (got {value})")
        _check_address("collector.listen", self.listen)
        if self.prometheus_listen:
            _check_address("prometheus.listen", self.prometheus_listen)
        # Each OtlpExport checked itself when it was made.
        return self


def _check_address(key: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key} must be HOST:PORT (got {address!r})")


# TOML section -> {key: (field name, type)}
_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    "collector": {
        "listen": ("listen", str),
        "insecure": ("insecure", bool),
        "tls_cert_file": ("tls_cert_file", str),
        "tls_key_file": ("tls_key_file", str),
        "tls_client_ca_file": ("tls_client_ca_file", str),
        "token_file": ("token_file", str),
        "read_token_file": ("read_token_file", str),
        "max_message_bytes": ("max_message_bytes", int),
        "max_future_skew_s": ("max_future_skew_s", (int, float)),
        "ack_every_batches": ("ack_every_batches", int),
        "ack_interval_s": ("ack_interval_s", (int, float)),
        "forget_after_s": ("forget_after_s", (int, float)),
    },
    "prometheus": {"listen": ("prometheus_listen", str)},
    "metrics": {"max_series_per_metric": ("max_series_per_metric", int)},
}
_PATHS = {"tls_cert_file", "tls_key_file", "tls_client_ca_file", "token_file", "read_token_file"}


def _typed(key: str, value: Any, typ: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a `true` where a number goes is a mistake, not 1.
    if isinstance(value, bool) and typ is not bool:
        raise ConfigError(f"{key} must be a number, not a boolean")
    if not isinstance(value, typ):
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise ConfigError(f"{key} must be {names} (got {value!r})")
    return float(value) if isinstance(value, int) and typ == (int, float) else value


def parse_config(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> CollectorConfig:
    """Build a config from parsed TOML (not yet ``validated``).

    Args:
        data: the TOML document.
        base_dir: relative file paths are resolved against it (the config's folder).
        env: the ``OTEL_EXPORTER_OTLP_*`` variables for ``[[otlp]]``; None: none.

    Raises:
        ConfigError: an unknown section or key, or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    otlp = otlp_exports(data.get("otlp"), env=env or {}, many=True)
    for section, table in data.items():
        if section == "otlp":
            continue
        schema = _SCHEMA.get(section)
        if schema is None:
            raise ConfigError(f"unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{section} must be a table")
        for key, value in table.items():
            if key not in schema:
                raise ConfigError(f"unknown key {section}.{key}")
            name, typ = schema[key]
            value = _typed(f"{section}.{key}", value, typ)
            if name in _PATHS:
                path = Path(value).expanduser()
                value = (
                    (base_dir / path) if base_dir is not None and not path.is_absolute() else path
                )
            values[name] = value
    return CollectorConfig(otlp=otlp, **values)


ENV_PREFIX = "ROOFTOP_"
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``[section] key``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Overlay ``ROOFTOP_<SECTION>_<KEY>`` values on the parsed file, typed as the schema says."""
    for section, schema in _SCHEMA.items():
        for key, (_, typ) in schema.items():
            name = env_name(section, key)
            if name not in env:
                continue
            text = env[name].strip()
            value: Any = text
            types = typ if isinstance(typ, tuple) else (typ,)
            if bool in types:
                if text.lower() not in _BOOLS:
                    raise ConfigError(f"{name}: expected true or false, got {text!r}")
                value = _BOOLS[text.lower()]
            try:
                if int in types and float not in types:
                    value = int(text)
                elif float in types:
                    value = float(text)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}, got {text!r}") from None
            table = data.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value


def load_config(
    path: Path | None = None,
    *,
    listen: str | None = None,
    prometheus_listen: str | None = None,
    insecure: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> CollectorConfig:
    """Read ``path`` (defaults when None), then the environment, then flags; validate.

    Environment variables are ``ROOFTOP_<SECTION>_<KEY>`` (``ROOFTOP_COLLECTOR_LISTEN``,
    ``ROOFTOP_PROMETHEUS_LISTEN``, ...), typed as the key in the file, and for
    ``[[otlp]]`` the standard ``OTEL_EXPORTER_OTLP_*`` ones (``rooftop.common.otlp``).

    Plaintext (``insecure``) without a listen address given in the file or as
    ``listen`` binds to ``DEFAULT_INSECURE_LISTEN`` (loopback), not every interface.

    Raises:
        ConfigError: unreadable file, invalid TOML, unknown key, bad value.
    """
    explicit_listen = listen is not None
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
            data = tomllib.loads(text)
        except OSError as exc:
            raise ConfigError(f"cannot read collector config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    section = data.get("collector")
    explicit_listen |= isinstance(section, dict) and "listen" in section
    env = os.environ if env is None else env
    explicit_listen |= ENV_PREFIX + "COLLECTOR_LISTEN" in env
    _apply_env(data, env)
    try:
        config = parse_config(
            data, base_dir=Path(path).resolve().parent if path else None, env=env
        )
    except ConfigError as exc:
        raise located(exc, path, text) from None
    overrides: dict[str, Any] = {}
    if listen is not None:
        overrides["listen"] = listen
    if prometheus_listen is not None:
        overrides["prometheus_listen"] = prometheus_listen
    if insecure is not None:
        overrides["insecure"] = insecure
    config = dataclasses.replace(config, **overrides)
    if config.insecure and not explicit_listen:
        config = dataclasses.replace(config, listen=DEFAULT_INSECURE_LISTEN)
    return config.validated()
