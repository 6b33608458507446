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
    allow_unauthenticated = false    # true: serve a mode that authenticates nobody off loopback
    max_message_bytes = 4194304      # bigger messages: RESOURCE_EXHAUSTED
    max_future_skew_s = 300          # sample times further ahead are clamped
    ack_every_batches = 32           # at most this many batches per ack (agent window: 64)
    ack_interval_s = 0.1             # ...and no batch waits longer for its ack
    forget_after_s = 900             # series of silent agents/GPUs then disappear
    disconnected_series_s = 10       # an agent's stream closed (moved): its GPU series go
                                     #   then; keep it at or below the scrape interval
    state_dir = "/var/lib/rooftop-collector"  # dedup marks survive a restart; unset: none
    max_seq_jump = 1000000           # a seq further past a boot's mark is rejected
    max_agents = 2048                # bounds under abuse (docs/OPERATOR-GUIDE.md): new
    max_gpus = 8192                  #   identities past them are refused and counted
    max_gpus_per_agent = 64
    max_engines = 8192
    max_engines_per_agent = 32
    max_label_bytes = 256            # a longer identity or label: the batch is rejected
    max_unread_acks = 1024           # acks queued for a client that does not read: closed
    max_connections = 4096           # TLS gate: open connections, then new ones refused
    max_handshakes = 128             # TLS gate: handshakes in progress at once

    [prometheus]
    listen = "127.0.0.1:9464"        # "" disables; port 0 picks a free one
    dcgm_names = false               # also write dcgm-exporter's DCGM_FI_* series
    max_connections = 16             # scrape connections served at once; more wait
    timeout_s = 10                   # to read a request, or to write a response

    [[otlp]]                         # or a single [otlp] table; none by default
    endpoint = "http://otel-collector:4317"
    protocol = "grpc"                # or "http/protobuf" (/v1/metrics is appended)
    interval_s = 10
    timeout_s = 10
    insecure = true
    headers = { "x-api-key" = "..." }

    [[remote_write]]                 # Prometheus remote write 1.0; none by default
    url = "http://prometheus:9090/api/v1/write"
    timeout_s = 10                   # one POST
    queue_max_samples = 500000       # then the oldest are dropped (counted)
    max_samples_per_send = 2000
    batch_send_deadline_s = 1        # the longest a sample waits for a full request
    min_backoff_s = 0.03             # retries of 5xx / 429 / network errors, doubling
    max_backoff_s = 5
    bearer_token_file = "rw-token"   # sent as Authorization: Bearer (re-read per send)
    ca_file = "ca.crt"               # for an https url; system CAs otherwise
    find_repeats = false             # true: ~6x smaller bodies, ~5x the CPU
    include = ["*"]                  # metric-name globs to send (all by default)...
    exclude = []                     # ...less these; a glob matching no name: an error

    [metrics]
    max_series_per_metric = 65536    # fits 1,000 nodes x 8 GPUs x 6 bound states

``[[otlp]]`` takes the agent's ``[otlp]`` keys and values (``rooftop.common.otlp``);
the standard ``OTEL_EXPORTER_OTLP_*`` variables fill in what a table leaves out, and
with no table ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone adds one export.

An unknown section or key is a ``ConfigError`` naming it: a typo must not silently
fall back to a default. Certificates, keys and token files are re-read when they
change (see ``rooftop.collector.ingest``); a token needs TLS (it is never accepted in the
clear), and plaintext without an explicit listen address binds to loopback only.

Every combination is one ``SecurityMode`` (docs/SECURITY.md has a row for each). A
mode that authenticates no agent (plaintext, or TLS with neither client certificates
nor a token) on an address other than loopback is refused unless
``allow_unauthenticated = true`` (``--allow-unauthenticated``) asks for it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from rooftop.collector.fleet import FleetLimits
from rooftop.collector.remote_write import RemoteWrite, check_series_patterns
from rooftop.common.configfile import located, read_toml
from rooftop.common.errors import ConfigError
from rooftop.common.otlp import OtlpExport, otlp_exports

__all__ = ["CollectorConfig", "OtlpExport", "RemoteWrite", "SecurityMode", "load_config"]

DEFAULT_LISTEN = "0.0.0.0:4850"
# Plaintext (insecure) without an explicit listen address: this host only.
DEFAULT_INSECURE_LISTEN = "127.0.0.1:4850"
DEFAULT_PROMETHEUS = "127.0.0.1:9464"
MIB = 1024 * 1024
_LIMITS = FleetLimits()

# gRPC takes the limit as a C int; below 64 KiB not even a small batch fits.
MAX_MESSAGE_BYTES_RANGE = (64 * 1024, 1024 * MIB)


class SecurityMode(StrEnum):
    """How the collector authenticates agents; each value is a row of docs/SECURITY.md."""

    PLAINTEXT = "plaintext"
    TLS = "TLS"  # the server's certificate only: encrypted, but anyone may send
    TLS_TOKEN = "TLS + token"
    MTLS = "mTLS"
    MTLS_TOKEN = "mTLS + token"

    @property
    def authenticates(self) -> bool:
        """Whether an agent must prove who it is (a client certificate or a token)."""
        return self not in (SecurityMode.PLAINTEXT, SecurityMode.TLS)


def is_loopback(listen: str) -> bool:
    """Whether ``HOST:PORT`` listens on this host only (127.0.0.0/8, ::1, localhost)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


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
    allow_unauthenticated: bool = False
    max_message_bytes: int = 4 * MIB
    max_future_skew_s: float = 300.0
    ack_every_batches: int = 32
    ack_interval_s: float = 0.1
    forget_after_s: float = 900.0
    # Several collectors: the GPU series of an agent whose stream closed leave the
    # export this long after (it moved, or is down); at most the scrape interval.
    disconnected_series_s: float = 10.0
    state_dir: Path | None = None
    max_seq_jump: int = 1_000_000
    prometheus_listen: str = DEFAULT_PROMETHEUS
    prometheus_dcgm_names: bool = False
    otlp: tuple[OtlpExport, ...] = ()
    remote_write: tuple[RemoteWrite, ...] = ()
    max_series_per_metric: int = 65_536
    # Bounds under abuse (docs/OPERATOR-GUIDE.md); the fleet's are FleetLimits'.
    max_agents: int = _LIMITS.max_agents
    max_gpus: int = _LIMITS.max_gpus
    max_gpus_per_agent: int = _LIMITS.max_gpus_per_agent
    max_engines: int = _LIMITS.max_engines
    max_engines_per_agent: int = _LIMITS.max_engines_per_agent
    max_label_bytes: int = _LIMITS.max_label_bytes
    max_unread_acks: int = 1024
    max_connections: int = 4096
    max_handshakes: int = 128
    prometheus_max_connections: int = 16
    prometheus_timeout_s: float = 10.0

    def fleet_limits(self) -> FleetLimits:
        """The fleet's cardinality bounds from these settings."""
        return FleetLimits(
            max_agents=self.max_agents,
            max_gpus=self.max_gpus,
            max_gpus_per_agent=self.max_gpus_per_agent,
            max_engines=self.max_engines,
            max_engines_per_agent=self.max_engines_per_agent,
            max_label_bytes=self.max_label_bytes,
        )

    @property
    def security_mode(self) -> SecurityMode:
        """How agents must authenticate (the read-only token changes nothing for Ingest)."""
        if self.tls_cert_file is None:
            return SecurityMode.PLAINTEXT
        if self.tls_client_ca_file is not None:
            return SecurityMode.MTLS_TOKEN if self.token_file else SecurityMode.MTLS
        return SecurityMode.TLS_TOKEN if self.token_file else SecurityMode.TLS

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
            "collector.disconnected_series_s": self.disconnected_series_s,
            "collector.max_seq_jump": self.max_seq_jump,
            "collector.max_future_skew_s": self.max_future_skew_s,
            "metrics.max_series_per_metric": self.max_series_per_metric,
            "collector.max_agents": self.max_agents,
            "collector.max_gpus": self.max_gpus,
            "collector.max_gpus_per_agent": self.max_gpus_per_agent,
            "collector.max_engines": self.max_engines,
            "collector.max_engines_per_agent": self.max_engines_per_agent,
            "collector.max_label_bytes": self.max_label_bytes,
            "collector.max_unread_acks": self.max_unread_acks,
            "collector.max_connections": self.max_connections,
            "collector.max_handshakes": self.max_handshakes,
            "prometheus.max_connections": self.prometheus_max_connections,
            "prometheus.timeout_s": self.prometheus_timeout_s,
        }
        _check_positive(positive)
        low, high = MAX_MESSAGE_BYTES_RANGE
        if not low <= self.max_message_bytes <= high:
            raise ConfigError(
                f"collector.max_message_bytes must be {low} (64 KiB) to {high} (1 GiB) "
                f"(got {self.max_message_bytes})"
            )
        _check_address("collector.listen", self.listen)
        if self.prometheus_listen:
            _check_address("prometheus.listen", self.prometheus_listen)
        elif self.prometheus_dcgm_names:
            raise ConfigError(
                "prometheus.dcgm_names: the DCGM names are written on the Prometheus endpoint, "
                "which prometheus.listen = \"\" turns off"
            )
        _check_open_door(self)
        # Each OtlpExport checked itself when it was made.
        return self


def _check_positive(values: Mapping[str, float]) -> None:
    for key, value in values.items():
        # nan compares false with everything: "not > 0" catches it, isfinite inf.
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} must be positive and finite (got {value})")


def _check_open_door(config: CollectorConfig) -> None:
    # The open door: a mode that authenticates nobody, reachable from other hosts.
    mode = config.security_mode
    if mode.authenticates or config.allow_unauthenticated or is_loopback(config.listen):
        return
    fix = (
        "set token_file (TLS + token) or tls_client_ca_file (mTLS)"
        if mode is SecurityMode.TLS
        else "configure TLS with token_file or tls_client_ca_file"
    )
    raise ConfigError(
        f"collector.listen: {mode.value} authenticates no agent, and {config.listen} is "
        f"not loopback: anyone who can reach it may send telemetry and read the fleet; "
        f"{fix}, listen on 127.0.0.1, or set allow_unauthenticated = true "
        f"(--allow-unauthenticated) if that is intended"
    )


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
        "allow_unauthenticated": ("allow_unauthenticated", bool),
        "max_message_bytes": ("max_message_bytes", int),
        "max_future_skew_s": ("max_future_skew_s", (int, float)),
        "ack_every_batches": ("ack_every_batches", int),
        "ack_interval_s": ("ack_interval_s", (int, float)),
        "forget_after_s": ("forget_after_s", (int, float)),
        "disconnected_series_s": ("disconnected_series_s", (int, float)),
        "state_dir": ("state_dir", str),
        "max_seq_jump": ("max_seq_jump", int),
        "max_agents": ("max_agents", int),
        "max_gpus": ("max_gpus", int),
        "max_gpus_per_agent": ("max_gpus_per_agent", int),
        "max_engines": ("max_engines", int),
        "max_engines_per_agent": ("max_engines_per_agent", int),
        "max_label_bytes": ("max_label_bytes", int),
        "max_unread_acks": ("max_unread_acks", int),
        "max_connections": ("max_connections", int),
        "max_handshakes": ("max_handshakes", int),
    },
    "prometheus": {
        "listen": ("prometheus_listen", str),
        "dcgm_names": ("prometheus_dcgm_names", bool),
        "max_connections": ("prometheus_max_connections", int),
        "timeout_s": ("prometheus_timeout_s", (int, float)),
    },
    "metrics": {"max_series_per_metric": ("max_series_per_metric", int)},
}
_PATHS = {
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "token_file",
    "read_token_file",
    "state_dir",
}


def _path(value: str, base_dir: Path | None) -> Path:
    # A relative path in the file is relative to the file's folder.
    path = Path(value).expanduser()
    return (base_dir / path) if base_dir is not None and not path.is_absolute() else path


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
    remote_write = remote_writes(data.get("remote_write"), base_dir=base_dir)
    for section, table in data.items():
        if section in ("otlp", "remote_write"):
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
            values[name] = _path(value, base_dir) if name in _PATHS else value
    return CollectorConfig(otlp=otlp, remote_write=remote_write, **values)


# [[remote_write]] key -> (RemoteWrite field, type)
_REMOTE_WRITE: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "url": ("url", str),
    "timeout_s": ("timeout_s", (int, float)),
    "queue_max_samples": ("queue_max_samples", int),
    "max_samples_per_send": ("max_samples_per_send", int),
    "batch_send_deadline_s": ("batch_send_deadline_s", (int, float)),
    "min_backoff_s": ("min_backoff_s", (int, float)),
    "max_backoff_s": ("max_backoff_s", (int, float)),
    "bearer_token_file": ("bearer_token_file", str),
    "ca_file": ("ca_file", str),
    "find_repeats": ("find_repeats", bool),
    "include": ("include", list),
    "exclude": ("exclude", list),
}


_REMOTE_WRITE_PATHS = ("bearer_token_file", "ca_file")
_REMOTE_WRITE_POSITIVE = (
    "timeout_s",
    "queue_max_samples",
    "max_samples_per_send",
    "batch_send_deadline_s",
    "min_backoff_s",
    "max_backoff_s",
)


def remote_writes(tables: Any, *, base_dir: Path | None = None) -> tuple[RemoteWrite, ...]:
    """The ``[[remote_write]]`` destinations (a single ``[remote_write]`` table too).

    Raises:
        ConfigError: an unknown key, a wrong type, a missing or non-HTTP ``url``, a
            value out of range, an ``include``/``exclude`` glob that matches no metric
            remote write sends; the message names ``remote_write.<key>``.
    """
    if tables is None:
        return ()
    if isinstance(tables, dict):
        tables = [tables]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("remote_write must be a table or an array of tables")
    out: list[RemoteWrite] = []
    for table in tables:
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in _REMOTE_WRITE:
                raise ConfigError(f"unknown key remote_write.{key}")
            name, typ = _REMOTE_WRITE[key]
            value = _typed(f"remote_write.{key}", value, typ)
            if isinstance(value, list):
                value = tuple(value)  # include / exclude: frozen like the rest
            values[name] = _path(value, base_dir) if name in _REMOTE_WRITE_PATHS else value
        url = values.get("url", "")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"remote_write.url must be an http:// or https:// URL (got {url!r}), "
                "e.g. http://prometheus:9090/api/v1/write"
            )
        rw = RemoteWrite(**values)
        check_series_patterns(rw)  # a typo must not silently send (or keep) nothing
        _check_positive({f"remote_write.{key}": getattr(rw, key) for key in _REMOTE_WRITE_POSITIVE})
        if rw.max_backoff_s < rw.min_backoff_s:
            raise ConfigError("remote_write.max_backoff_s must be at least min_backoff_s")
        if rw.queue_max_samples < rw.max_samples_per_send:
            raise ConfigError(
                "remote_write.queue_max_samples must be at least max_samples_per_send"
            )
        out.append(rw)
    return tuple(out)


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
    allow_unauthenticated: bool | None = None,
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
        data, text = read_toml(Path(path))
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
    if allow_unauthenticated is not None:
        overrides["allow_unauthenticated"] = allow_unauthenticated
    config = dataclasses.replace(config, **overrides)
    if config.insecure and not explicit_listen:
        config = dataclasses.replace(config, listen=DEFAULT_INSECURE_LISTEN)
    try:
        return config.validated()
    except ConfigError as exc:
        # The line of the key in the file, when the file set it.
        raise located(exc, path, text) from None
